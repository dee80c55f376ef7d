"""Models: TLese-ResNet (inverted residuals + effective SE), torchvision baselines, dual-view fusion, weights.

    from tlese.models import create_model, list_models, load_partial
    model = create_model("tlese_mbv2", num_classes=4, in_chans=1, pretrained=True, views="dual")

The names below load on first use, so importing `tlese.models.commands` (for `tlese --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlese.models.registry import create_model, list_models, register_model
    from tlese.models.weights import LoadReport, load_partial

__all__ = ["LoadReport", "create_model", "list_models", "load_partial", "register_model"]


def __getattr__(name: str):
    if name in ("create_model", "list_models", "register_model"):
        from tlese.models import registry

        return getattr(registry, name)
    if name in ("LoadReport", "load_partial"):
        from tlese.models import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'tlese.models' has no attribute {name!r}")
