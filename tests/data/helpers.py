"""Tiny generators for test fixtures: a synthetic breast image and a minimal DICOM writer (no patient data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_breast(
    height: int = 240,
    width: int = 160,
    side: str = "L",
    background: float = 0.0,
    label: bool = True,
    seed: int = 0,
    peak: float = 3000.0,
) -> np.ndarray:
    """A half-ellipse "breast" against the chest wall (left edge for L, right for R) with texture, a noisy
    background at `background` and, if `label`, a bright burned-in label block in the opposite top corner."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre_row, radius_rows, radius_cols = height / 2, height * 0.42, width * 0.6
    inside = ((rows - centre_row) / radius_rows) ** 2 + (cols / radius_cols) ** 2 <= 1.0
    image = background + rng.normal(0, peak * 0.01, size=(height, width)).astype(np.float32)
    tissue = peak * (0.5 + 0.3 * np.sin(rows / 7.0) * np.cos(cols / 5.0)) * (1.0 - 0.4 * cols / width)
    image = np.where(inside, background + tissue, image)
    if label:
        image[8:28, width - 40: width - 10] = background + peak * 1.6
    image = np.clip(image, 0, None).astype(np.float32)
    return image[:, ::-1].copy() if side == "R" else image


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    laterality: str | None = None,
    image_laterality: str | None = None,
    view_position: str | None = None,
    view_code_meaning: str | None = None,
    series_description: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
) -> Path:
    """Write `pixels` (uint8/uint16 2-D) as a Digital Mammography DICOM; `transfer_syntax` compresses it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    if laterality:
        ds.Laterality = laterality
    if image_laterality:
        ds.ImageLaterality = image_laterality
    if view_position:
        ds.ViewPosition = view_position
    if series_description:
        ds.SeriesDescription = series_description
    if view_code_meaning:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X", "SCT", view_code_meaning
        ds.ViewCodeSequence = [item]
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    array = np.ascontiguousarray(pixels)
    bits = 16 if array.dtype == np.uint16 else 8
    ds.set_pixel_data(array, photometric_interpretation=photometric, bits_stored=bits)
    if transfer_syntax:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path
