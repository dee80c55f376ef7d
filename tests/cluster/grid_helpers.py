"""The tiny grid the cluster tests submit: its experiment file."""

from __future__ import annotations

from pathlib import Path

import yaml

GRID_RECIPE = {"epochs": 2, "batch_size": 8, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": False,
               "accelerator": "cpu", "val_fraction": 0.25}
GRID_ARMS = [{"name": "cxr_plain", "model": "lite0_plain", "transfer": "cxr"},
             {"name": "plain_scratch", "model": "lite0_plain", "transfer": "scratch"}]


def write_grid_config(path: Path, data: dict, **changes) -> Path:
    """2 arms (one with a chest X-ray stage 1) x 2 folds x 1 repeat, 32 px, 2 epochs (so a requeued cell can resume
    from its first)."""
    config = {"name": "grid", "seed": 0, "output_dir": str(path.parent / "runs"),
              "cache_dir": str(path.parent / "cache"), "image_size": 32, "views": "dual", "folds": 2,
              "bootstrap": 20, "prepare_workers": 1,
              "target": {"adapter": "cmmd", "root": str(data["mammo_root"]), "task": "synth_subtype4"},
              "cxr": {"adapter": "darkcovidnet", "root": str(data["cxr_root"]), "task": "synth_cxr3"},
              "cxr_recipe": dict(GRID_RECIPE, epochs=1), "target_recipe": dict(GRID_RECIPE), "arms": GRID_ARMS}
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path
