"""Model registry: `@register_model` backbone builders (table in `registration`), `create_model` wraps them to the
package contract."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from tlese.models import baselines, tlese_resnet  # noqa: F401  (the built-in models register on import)
from tlese.models.classifier import ImageClassifier, channel_stats
from tlese.models.dual_view import DualViewClassifier
from tlese.models.registration import REGISTRY, ModelEntry, register_model
from tlese.models.weights import load_pretrained

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model"]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in REGISTRY if fnmatch.fnmatch(name, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return REGISTRY[name]


VIEW_MODES = ("single", "dual")


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool | str | os.PathLike = False,
    views: str = "single",
    fusion: str = "mean_logits",
    weights_dir: str | os.PathLike | None = None,
    drop_rate: float = 0.0,
    **kw: Any,
) -> ImageClassifier:
    """Build a registered model that takes images in [0, 1] and returns logits `(B, num_classes)`.

    pretrained: False (random init), True (the entry's ImageNet source; torchvision files are looked up in
        `weights_dir`, $TLESE_WEIGHTS_DIR, then torch hub's cache) or a weights file path.
    views: "single" -> input `(B, C, H, W)`; "dual" -> `(B, 2, C, H, W)` in CC, MLO order, fused by `fusion`.
    kw: passed to the backbone builder (e.g. `gate_init` for the ESE models).
    """
    entry = get_entry(name)
    if views not in VIEW_MODES:
        raise ValueError(f"views must be one of {VIEW_MODES}, got {views!r}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    backbone = entry.build_backbone(in_chans=in_chans, **kw)
    cfg = {
        "model": name,
        "mean": channel_stats(entry.source.mean, in_chans),
        "std": channel_stats(entry.source.std, in_chans),
        "input_range": (0.0, 1.0),
        "source": None,
        "first_conv": f"backbone.{backbone.first_conv}",
    }
    if views == "single":
        model = ImageClassifier(backbone, num_classes, cfg, drop_rate)
    else:
        model = DualViewClassifier(backbone, num_classes, cfg, drop_rate, fusion=fusion)
    if pretrained:
        load_pretrained(model, entry.source, pretrained, weights_dir)
    return model
