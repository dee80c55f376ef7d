"""Augmentation for prepared images (float tensors in [0, 1]), built on torchvision.transforms.v2.functional.

Mammography keeps the breast facing COMMON_SIDE, so it never flips horizontally (a flip would put the chest wall on
the other side, a pattern the model never sees at prediction time); it flips vertically (CC views are symmetric top
to bottom and MLO views vary in the pectoral angle). Evaluation transforms are the identity.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# Default magnitudes; every key can be overridden through `cfg`.
MAMMO_DEFAULTS = {
    "vflip_p": 0.5,  # probability of a vertical flip
    "rotate_deg": 10.0,  # rotation uniform in [-rotate_deg, rotate_deg]
    "scale_min": 0.9, "scale_max": 1.1,  # affine zoom
    "translate": 0.05,  # affine shift, fraction of width / height
    "crop_scale_min": 0.8,  # random resized crop keeps a fraction of the area in [crop_scale_min, 1]
    "brightness": 0.1,  # multiply by a factor in [1 - b, 1 + b]
    "contrast": 0.1,  # contrast factor in [1 - c, 1 + c]
    "gamma": 0.1,  # gamma in [1 - g, 1 + g]
}
CXR_DEFAULTS = {
    "hflip_p": 0.0,  # chest X-rays are not symmetric (heart on the left); enable deliberately
    "rotate_deg": 5.0,
    "scale_min": 0.95, "scale_max": 1.05,
    "translate": 0.05,
    "brightness": 0.1,
    "contrast": 0.1,
}
_DEFAULTS = {"mammo": MAMMO_DEFAULTS, "cxr": CXR_DEFAULTS}


def build_transforms(modality: str, train: bool, cfg: dict | None = None, seed: int | None = None):
    """A callable on a float tensor (C, H, W) or (V, C, H, W) returning the same shape, clamped to [0, 1].

    modality "mammo" or "cxr"; train False -> identity. cfg overrides magnitudes; valid keys: MAMMO_DEFAULTS for
    mammo, CXR_DEFAULTS for cxr (unknown keys raise ValueError listing them). With a seed the random parameters
    come from a private generator (reproducible; in DataLoader workers the stream also mixes in the worker's seed,
    so it differs per worker and epoch yet is fixed by the training seed); without one they come from torch's
    global generator. Views of a (V, C, H, W) tensor are augmented
    independently.
    """
    if modality not in _DEFAULTS:
        raise ValueError(f"modality must be one of {sorted(_DEFAULTS)}, got {modality!r}")
    defaults = _DEFAULTS[modality]
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {modality} augmentation key(s) {unknown}; valid: {sorted(defaults)}")
    if not train:
        return Identity()
    return RandomAugment({**defaults, **cfg}, seed)


class Identity:
    """Evaluation transform: returns the input unchanged."""

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return image

    def __repr__(self) -> str:
        return "Identity()"


class RandomAugment:
    """Random geometric + intensity augmentation with the magnitudes in `settings` (see build_transforms)."""

    def __init__(self, settings: dict, seed: int | None = None):
        self.settings = settings
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._worker: int | None = None
        self._draw: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"RandomAugment({self.settings}, seed={self.seed})"

    def _rng(self) -> torch.Generator | None:
        if self._draw is not None:
            return self._draw
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        # In a DataLoader worker, mix in the worker's seed: it differs per worker and per epoch (drawn from the
        # main process's seeded RNG), so workers and epochs do not replay the same augmentations.
        stream = info.seed if info is not None else -1
        if self._generator is None or stream != self._worker:
            self._generator = torch.Generator().manual_seed((self.seed * 1_000_003 + stream + 1) % (2**63))
            self._worker = stream
        return self._generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self._rng()))

    def _chance(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self._rng())) < p

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Augment `image`; with `seed`, this draw depends on that seed alone (the training sampler gives one per item
        and epoch, so a resumed run replays exactly the augmentations of an uninterrupted one)."""
        if image.ndim not in (3, 4):
            raise ValueError(f"expected a (C, H, W) or (V, C, H, W) tensor, got shape {tuple(image.shape)}")
        self._draw = None if seed is None else torch.Generator().manual_seed(int(seed) % (2**63))
        try:
            if image.ndim == 4:
                return torch.stack([self._one(view) for view in image])
            return self._one(image)
        finally:
            self._draw = None

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        s = self.settings
        height, width = image.shape[-2:]
        if s.get("crop_scale_min", 1.0) < 1.0:
            image = self._resized_crop(image, s["crop_scale_min"])
        if self._chance(s.get("vflip_p", 0.0)):
            image = F.vertical_flip(image)
        if self._chance(s.get("hflip_p", 0.0)):
            image = F.horizontal_flip(image)
        angle = self._uniform(-s["rotate_deg"], s["rotate_deg"])
        scale = self._uniform(s["scale_min"], s["scale_max"])
        shift = [round(self._uniform(-s["translate"], s["translate"]) * width),
                 round(self._uniform(-s["translate"], s["translate"]) * height)]
        image = F.affine(image, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                         interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
        image = F.adjust_brightness(image, self._uniform(1 - s["brightness"], 1 + s["brightness"]))
        image = F.adjust_contrast(image, self._uniform(1 - s["contrast"], 1 + s["contrast"]))
        if s.get("gamma", 0.0) > 0:
            image = F.adjust_gamma(image.clamp(0.0, 1.0), self._uniform(1 - s["gamma"], 1 + s["gamma"]))
        return image.clamp(0.0, 1.0)

    def _resized_crop(self, image: torch.Tensor, scale_min: float) -> torch.Tensor:
        """Crop a random box of area fraction in [scale_min, 1] (aspect within 10 % of the image's) and resize back."""
        height, width = image.shape[-2:]
        area = self._uniform(scale_min, 1.0)
        aspect = math.exp(self._uniform(math.log(0.9), math.log(1.1)))
        crop_h = min(height, max(1, round(height * math.sqrt(area / aspect))))
        crop_w = min(width, max(1, round(width * math.sqrt(area * aspect))))
        top = int(self._uniform(0, height - crop_h + 1)) if crop_h < height else 0
        left = int(self._uniform(0, width - crop_w + 1)) if crop_w < width else 0
        return F.resized_crop(image, top, left, crop_h, crop_w, [height, width],
                              interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
