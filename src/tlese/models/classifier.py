"""The single-view classifier every registered model is wrapped in: normalise -> backbone -> linear head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# How far outside [0, 1] an input may stray (resampling overshoot, float noise) before the range check fails.
INPUT_RANGE_TOLERANCE = 0.05


def channel_stats(rgb_stats: tuple[float, float, float], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean or std: the RGB stats for 3 channels, their mean for 1 (the stem is folded), else cycled."""
    if in_chans == 1:
        return (sum(rgb_stats) / 3.0,)
    return tuple(rgb_stats[i % 3] for i in range(in_chans))


class ImageClassifier(nn.Module):
    """`(B, C, H, W)` in [0, 1] -> logits `(B, num_classes)`.

    The backbone maps a normalised image to pooled features `(B, num_features)` and carries `num_features`,
    `gradcam_layer` (relative name) and `first_conv`. The normalisation buffers are not persistent, so checkpoints
    hold only weights and load across channel counts; `pretrained_cfg` records them.
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pretrained_cfg: dict[str, Any],
        drop_rate: float = 0.0,
        head_width: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.num_classes = num_classes
        self.in_chans = len(pretrained_cfg["mean"])
        self.drop_rate = drop_rate
        self.head = nn.Linear(head_width * self.num_features, num_classes)
        self.pretrained_cfg = dict(pretrained_cfg)
        self.gradcam_layer = f"backbone.{backbone.gradcam_layer}"
        self.check_input = True  # switch off for benchmarks: the check costs a device sync
        shape = (1, self.in_chans, 1, 1)
        self.register_buffer("mean", torch.tensor(pretrained_cfg["mean"]).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(pretrained_cfg["std"]).view(shape), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Check (unless `check_input` is off) and normalise a `[0, 1]` image batch with the backbone's stats."""
        if self.check_input:
            _check_range(x)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` in [0, 1] -> pooled features `(N, num_features)`."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        return self.backbone(self.normalise(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(features, self.drop_rate, self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_range(x: torch.Tensor) -> None:
    if x.is_meta or x.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low < -INPUT_RANGE_TOLERANCE or high > 1.0 + INPUT_RANGE_TOLERANCE:
        raise ValueError(
            f"model input must be float in [0, 1] (the model normalises itself); observed min {low:.4g}, "
            f"max {high:.4g}. Scale images to [0, 1], or set model.check_input = False to skip this check."
        )
