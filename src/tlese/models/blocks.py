"""Small reusable layers: conv-BN-activation, the effective squeeze-excitation gate, the inverted residual block."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# Where a block puts its ESE gate: nowhere, on the expanded channels after the depthwise conv (as SE in
# MobileNetV3/EfficientNet), or on its output before the residual add (as VoVNetV2). Which blocks of a backbone are
# gated is data on its architecture table (`tlese_resnet.Stage.ese`), not a list of names here.
BLOCK_PLACEMENTS = ("none", "expanded", "output")

# Initial gate: ESE starts as a near-identity so ImageNet features are barely disturbed (measurements in
# docs/models.md), yet with its pre-activation (6 * 0.95 - 3 = 2.7) clear of the hard-sigmoid's saturation point
# (3 -> gate 1), where the gradient is zero and the gate never learns.
DEFAULT_GATE_INIT = 0.95


def check_placement(placement: str) -> str:
    """`placement` if it is one of `BLOCK_PLACEMENTS`, else ValueError listing them."""
    if placement not in BLOCK_PLACEMENTS:
        raise ValueError(f"unknown ESE placement {placement!r}; valid: {', '.join(BLOCK_PLACEMENTS)}")
    return placement


class SamePad2d(nn.Module):
    """TensorFlow "SAME" padding (extra pixel bottom/right), computed from the input size at run time.

    Weights ported from TensorFlow (EfficientNet-Lite) were trained with it; symmetric padding shifts strided convs
    by one pixel.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._total(x.shape[-2])
        pad_w = self._total(x.shape[-1])
        return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])

    def _total(self, size: int) -> int:
        return max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation; `act_layer=None` gives a linear conv-BN (the bottleneck projection).

    `padding="symmetric"` pads (k-1)//2 on every side (torchvision); `"same"` pads as TensorFlow for strided convs.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.ReLU6,
        bn_eps: float = 1e-5,
        padding: str = "symmetric",
    ) -> None:
        if padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', got {padding!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        pad = (kernel_size - 1) // 2
        if padding == "same" and stride > 1:  # for stride 1 and odd kernels, SAME is symmetric
            layers["pad"] = SamePad2d(kernel_size, stride)
            pad = 0
        layers["conv"] = nn.Conv2d(in_chs, out_chs, kernel_size, stride, pad, groups=groups, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_chs, eps=bn_eps)
        if act_layer is not None:
            layers["act"] = act_layer(inplace=True)
        super().__init__(layers)


class EffectiveSE(nn.Module):
    """Effective squeeze-excitation (Lee & Park, CenterMask / VoVNetV2; timm's `EffectiveSEModule`).

    `x * hardsigmoid(conv1x1(mean_hw(x)))` with one C->C conv with bias and no channel reduction, so no channel
    information is lost in the squeeze. `gate_init` in (0, 1) starts every gate at that value (zero weights,
    bias = 6 * gate_init - 3); `None` keeps PyTorch's default conv init (random gates around 0.5).
    """

    def __init__(self, channels: int, gate_init: float | None = DEFAULT_GATE_INIT) -> None:
        super().__init__()
        if gate_init is not None and not 0.0 < gate_init < 1.0:
            # gate 1 needs pre-activation >= 3, where hardsigmoid is flat: weight and bias would get no gradient
            raise ValueError(f"gate_init must be in (0, 1) (hard-sigmoid saturates at 1), got {gate_init}")
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Hardsigmoid()
        if gate_init is not None:
            nn.init.zeros_(self.fc.weight)
            nn.init.constant_(self.fc.bias, 6.0 * gate_init - 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x.mean(dim=(2, 3), keepdim=True)))


def ese_modules(model: nn.Module) -> list[tuple[str, EffectiveSE]]:
    """Every ESE gate in `model`, as `(qualified name, module)`, found by type (not by name)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EffectiveSE)]


def ese_state_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of `model` that belong to ESE gates."""
    return {f"{name}.{key}" for name, m in ese_modules(model) for key in m.state_dict()}


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual with linear bottleneck: [1x1 expand] -> kxk depthwise -> 1x1 project (no act).

    `ese` (a block placement, `BLOCK_PLACEMENTS`) puts an EffectiveSE gate on the expanded channels
    (`"expanded"`) or on the block output before the residual add (`"output"`); with `"none"` the attribute
    `ese` is an `nn.Identity`, so the state-dict names are the same in every variant.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: int = 6,
        kernel_size: int = 3,
        ese: str = "none",
        gate_init: float | None = DEFAULT_GATE_INIT,
        act_layer: type[nn.Module] = nn.ReLU6,
        bn_eps: float = 1e-5,
        padding: str = "symmetric",
    ) -> None:
        super().__init__()
        check_placement(ese)
        hidden = in_chs * expand_ratio
        conv = dict(act_layer=act_layer, bn_eps=bn_eps, padding=padding)
        self.use_residual = stride == 1 and in_chs == out_chs
        self.ese_on_expanded = ese == "expanded"
        self.expand = ConvBNAct(in_chs, hidden, 1, **conv) if expand_ratio != 1 else nn.Identity()
        self.dw = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, **conv)
        gated = hidden if self.ese_on_expanded else out_chs
        self.ese = EffectiveSE(gated, gate_init) if ese != "none" else nn.Identity()
        self.project = ConvBNAct(hidden, out_chs, 1, act_layer=None, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(self.expand(x))
        if self.ese_on_expanded:
            out = self.ese(out)
        out = self.project(out)
        if not self.ese_on_expanded:
            out = self.ese(out)  # nn.Identity without ESE
        return x + out if self.use_residual else out
