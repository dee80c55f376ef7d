"""Dual-view classifier: one shared backbone over the CC and MLO image of a breast, fused into one prediction.

It subclasses the single-view classifier, so both carry the same `backbone.` / `head.` state-dict names and a
single-view chest X-ray checkpoint loads straight into a dual-view mammography model (`weights.load_partial`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tlese.models.classifier import ImageClassifier
from tlese.vocab import DUAL_VIEW_ORDER


@dataclass(frozen=True)
class Fusion:
    """How per-view features `(B, V, F)` become logits: `head_width` x F head inputs, `fuse(features, head)`."""

    head_width: int
    fuse: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    description: str


def _mean_logits(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return head(features).mean(dim=1)


def _concat(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return head(features.flatten(1))


def _mean_features(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return head(features.mean(dim=1))


NUM_VIEWS = len(DUAL_VIEW_ORDER)

FUSIONS: dict[str, Fusion] = {
    "mean_logits": Fusion(1, _mean_logits, "one head per view (shared), logits averaged"),
    "mean_features": Fusion(1, _mean_features, "features averaged, then one head"),
    "concat": Fusion(NUM_VIEWS, _concat, f"features concatenated in view order {[v.value for v in DUAL_VIEW_ORDER]}"),
}


class DualViewClassifier(ImageClassifier):
    """`(B, 2, C, H, W)` in [0, 1], views in `tlese.vocab.DUAL_VIEW_ORDER` (CC, MLO) -> logits `(B, num_classes)`.

    Both views go through the backbone as one batch of `B * 2` images (row-major: breast 0 CC, breast 0 MLO, ...),
    so a Grad-CAM hook on `gradcam_layer` fires once and sees `(B * 2, ...)` activations.
    """

    num_views = NUM_VIEWS

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pretrained_cfg: dict[str, Any],
        drop_rate: float = 0.0,
        fusion: str = "mean_logits",
    ) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        super().__init__(backbone, num_classes, pretrained_cfg, drop_rate, head_width=FUSIONS[fusion].head_width)
        self.fusion = fusion

    def forward_views(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 2, C, H, W)` -> per-view pooled features `(B, 2, num_features)`."""
        if x.ndim != 5 or x.shape[1] != NUM_VIEWS:
            raise ValueError(
                f"dual-view input must be (B, {NUM_VIEWS}, {self.in_chans}, H, W) with views "
                f"{[v.value for v in DUAL_VIEW_ORDER]}, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        return self.forward_features(x.flatten(0, 1)).view(batch, NUM_VIEWS, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.dropout(self.forward_views(x), self.drop_rate, self.training)
        return FUSIONS[self.fusion].fuse(features, self.head)
