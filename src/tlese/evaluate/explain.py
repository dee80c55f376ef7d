"""Grad-CAM (Selvaraju et al. 2017) through forward hooks on a layer chosen by name, for every registered model.

Every model names its default layer in `model.gradcam_layer` (the last convolutional feature map before pooling).
Dual-view models run both views through the backbone as one batch, so the maps come back per view: `(B, 2, H, W)`.
A map is an aid for reading a prediction, not a segmentation: at 96-512 px inputs the last feature map is 3-16
cells wide, so a map is coarse by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` (as in `model.named_modules()`); unknown names raise with close valid ones."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    top = sorted({key.split(".")[0] for key in modules if key})
    close = sorted(key for key in modules if key and key.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])[:10]
    hint = f"; names ending like it: {close}" if close else ""
    raise ValueError(f"no layer named {name!r} in {type(model).__name__}; top-level modules: {top}{hint}")


def grad_cam(model: nn.Module, images: torch.Tensor, class_index: int | list[int] | torch.Tensor | None = None,
             layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps and the logits they explain.

    images: the model's input, `(B, C, H, W)` or dual-view `(B, 2, C, H, W)`, in [0, 1].
    class_index: the class to explain per image (int, list or tensor of B); default the predicted class.
    layer: module name; default `model.gradcam_layer`.
    Returns `(maps, logits)`: maps `(B, H, W)` or `(B, 2, H, W)`, each case scaled to [0, 1] by its maximum (over
    both views of a breast, so their brightness compares; all zero when no location supports the class); logits
    `(B, num_classes)`. The model's mode and its parameters' gradients
    are left as they were.
    """
    name = layer or getattr(model, "gradcam_layer", None)
    if not name:
        raise ValueError(f"{type(model).__name__} names no gradcam_layer; pass layer=")
    target = find_layer(model, name)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"layer {name!r} must output a (N, C, h, w) feature map, got "
                             f"{type(output).__name__}{tuple(getattr(output, 'shape', ()))}")
        captured["activations"] = output

    was_training = model.training
    handle = target.register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            # gradients flow even through a frozen model; torch.autograd.grad leaves parameters' .grad untouched
            logits = model(images.detach().clone().requires_grad_(True))
            chosen = _class_indices(class_index, logits)
            score = logits.gather(1, chosen[:, None]).sum()
            activations = captured.get("activations")
            if activations is None:
                raise ValueError(f"layer {name!r} was not used by the forward pass")
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
        model.train(was_training)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # one weight per channel: its average gradient
    maps = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if images.ndim == 5:  # (B * V, H, W) -> (B, V, H, W), in the order the model flattened the views
        maps = maps.view(images.shape[0], images.shape[1], *maps.shape[-2:])
    # One scale per case: the views of a breast share their maximum, so a view with little evidence stays dim.
    peak = maps.flatten(1).amax(dim=1).view(-1, *[1] * (maps.ndim - 1))
    maps = torch.where(peak > 1e-12, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))
    return maps, logits.detach()


def _class_indices(class_index, logits: torch.Tensor) -> torch.Tensor:
    batch, num_classes = logits.shape
    if class_index is None:
        return logits.argmax(dim=1)
    chosen = torch.as_tensor(class_index, dtype=torch.long, device=logits.device).reshape(-1)
    if chosen.numel() == 1:
        chosen = chosen.expand(batch)
    if chosen.numel() != batch:
        raise ValueError(f"class_index needs 1 or {batch} values, got {chosen.numel()}")
    if (chosen < 0).any() or (chosen >= num_classes).any():
        raise ValueError(f"class_index must be in [0, {num_classes - 1}], got {chosen.tolist()}")
    return chosen


def save_overlay(images: np.ndarray, maps: np.ndarray, path: str | Path, title: str | None = None,
                 view_names: list[str] | None = None, alpha: float = 0.4) -> Path:
    """Write a PNG: per view, the grey image and the same image under its map (jet colour map), in one row.

    images and maps: `(H, W)` for one view or `(V, H, W)` for several, values in [0, 1].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, maps = np.asarray(images, dtype=np.float32), np.asarray(maps, dtype=np.float32)
    if images.shape != maps.shape or images.ndim not in (2, 3):
        raise ValueError(f"images and maps must have the same (H, W) or (V, H, W) shape, got {images.shape} and "
                         f"{maps.shape}")
    if images.ndim == 2:
        images, maps = images[None], maps[None]
    names = view_names or [""] * len(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2 * len(images), figsize=(3 * len(images) * 2, 3.4), squeeze=False)
    for index, (image, cam, name) in enumerate(zip(images, maps, names)):
        plain, overlay = axes[0, 2 * index], axes[0, 2 * index + 1]
        for axis in (plain, overlay):
            axis.imshow(image, cmap="gray", vmin=0, vmax=1)
            axis.axis("off")
        overlay.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        plain.set_title(name, fontsize=8)
        overlay.set_title(f"{name} Grad-CAM".strip(), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
