"""Data layer: read images (io), preprocess and cache them, build tables, tasks, folds and torch datasets."""
