"""Mammogram / chest X-ray preprocessing: the ONE path from a file or decoded pixels to model input, shared by
training (through the cache) and prediction.

The path is a composition of named steps (`preprocess_steps(params)`), each a small class named by what it does,
that takes a `Sample` (the image so far and what earlier steps found) and returns a new one:

- mammography: CheckUsable -> FindBreast -> CheckBreastFound -> CropToBreast -> Resize -> GrowMask ->
  NormaliseIntensity -> ZeroBackground -> OrientToCommonSide -> Pad (left). `crop`, `mask_background` and `orient`
  (see `PreprocessParams`) leave their steps out.
- chest X-ray: CheckUsable -> CheckContrast -> Resize -> NormaliseIntensity -> Pad (centre).

`preprocess_with_info` / `preprocess_image` run that composition on pixels; `prepare_file(path, side, view,
params)` is the one "file -> model input": read, check the header against the expected side and view, run the
composition. The array functions `breast_mask`, `breast_box`, `crop_to_breast`, `orient_to_common_side`,
`resize_keep_aspect_pad` run the same step classes on their own. Everything is pure: array in, new array out,
inputs never modified; integer input (what `read_image(..., keep_integers=True)` returns) gives exactly the
output of its float32 copy, without that full-size copy (Resize converts only the crop). Pixels that cannot give
a meaningful input (too small, constant, not finite, no breast found, no contrast) raise `UnusableImageError` with
the reason, rather than becoming an all-zero or noise-stretched image.

Parameters are made by one rule, `PreprocessParams.build(size, modality, overrides)`; the keys an override may
set are `PREPROCESS_OVERRIDES` (`tlese prepare --param KEY=VALUE`, an experiment's `preprocess:` section).

Orientation convention (checked on CBIS-DDSM and mini-MIAS): in a stored mammogram a LEFT breast has its chest wall
at the left image edge, so its tissue mass lies in the left half; a right breast is the mirror image. Orienting to
COMMON_SIDE = L therefore flips right breasts horizontally. When the side is unknown it is inferred from the
mask (`infer_side`). A given side is trusted (predictable, like a radiologist's hanging protocol); an image
whose content faces the other way (mini-MIAS mdb151/mdb152 do) is reported by `tlese.data.cache` as a facing
mismatch rather than silently re-flipped. After a mammogram is prepared the chest
wall is at column 0 and the padding (when the breast is narrower than tall) is on the right.

Speed: the mask is computed on a strided copy whose longer side is about `MASK_MAX_SIDE` pixels (a full-field
mammogram of 4600 x 2900 becomes ~512 x 320), and the crop box is mapped back to full resolution; resizing uses
torch's antialiased bilinear interpolation in float32 (no 8-bit round trip). The mask is found once and carried
through the steps; the orientation flip (exact) comes after the resize, so it costs a copy of the small image only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from tlese.data.io import ImageReadError, check_header_against, read_image
from tlese.vocab import COMMON_SIDE, MODALITIES, Side

# Bump when the output of preprocess_image changes for the same parameters: it invalidates every cache.
PREPROCESS_VERSION = 1
# The one default model input side, in pixels (the experiment config's `image_size` and `PreprocessParams.size` take
# it from here). 512, as the real-data config (configs/cmmd_subtype.yaml) and `tlese prepare` already used: a cropped
# full-field mammogram (~4600 px tall at ~0.1 mm) shrinks ~9x, so a 5-10 mm calcification cluster stays ~6-12 px
# wide (3-6 px at 256). Small inputs (the demo's 96 px) stay a per-experiment choice, recorded in each model spec.
DEFAULT_IMAGE_SIZE = 512
MASK_MAX_SIDE = 512
# Refusal limits: below MIN_IMAGE_SIDE pixels the 5 x 5 mask opening leaves nothing to find; a breast mask under
# MIN_BREAST_FRACTION of the image is noise or a label, not a breast (mini-MIAS breasts cover 15 % or more).
MIN_IMAGE_SIDE = 32
MIN_BREAST_FRACTION = 0.02
# GrowMask grows the breast mask by this many pixels on every side before the background is zeroed, so the skin line
# is kept.
MASK_GROW_PIXELS = 2

# The keys `PreprocessParams.build` accepts as overrides (all fields but size and modality), with their meaning.
PREPROCESS_OVERRIDES: dict[str, str] = {
    "crop": "crop mammograms to the breast (true/false)",
    "orient": "flip breasts to face COMMON_SIDE (true/false)",
    "keep_aspect": "resize keeping the aspect ratio and pad with 0; false stretches to size x size (true/false)",
    "low_pct": "lower percentile of the intensity window, inside the breast (whole image for cxr), mapped to 0",
    "high_pct": "upper percentile of the intensity window, mapped to 1",
    "mask_background": "zero mammogram pixels outside the (slightly grown) breast mask, removing burned-in labels "
                       "and markers (true/false)",
}
_TRUE_WORDS, _FALSE_WORDS = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})


class UnusableImageError(ValueError):
    """Decoded pixels that cannot give a meaningful model input; `reason` says why (e.g. "constant image")."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that determines a prepared image; recorded with every cache and model bundle.

    Make one with `PreprocessParams.build(size, modality, overrides)` (the one rule: the CLI's `--param` and an
    experiment's `preprocess:` section go through it), and read a recorded one back with `from_dict`.

    size: output is (size, size). modality: "mammo" or "cxr". The other fields are the overrides, see
    `PREPROCESS_OVERRIDES`: crop (mammograms to the breast), orient (flip breasts to COMMON_SIDE), keep_aspect
    (resize keeping the aspect ratio and pad with 0, else stretch), low_pct / high_pct (percentile window inside
    the breast mask, whole image for cxr, mapped to [0, 1]), mask_background (zero mammogram pixels outside the
    slightly grown breast mask, which removes burned-in labels and markers inside the crop box so a model cannot
    learn from them).
    """

    size: int = DEFAULT_IMAGE_SIZE
    crop: bool = True
    orient: bool = True
    keep_aspect: bool = True
    low_pct: float = 0.5
    high_pct: float = 99.5
    modality: str = "mammo"
    mask_background: bool = True

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if int(self.size) != self.size or self.size < 8:
            raise ValueError(f"size must be an integer >= 8, got {self.size!r}")
        if not 0.0 <= self.low_pct < self.high_pct <= 100.0:
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {self.low_pct}, {self.high_pct}")

    @classmethod
    def build(cls, size: int, modality: str = "mammo", overrides: Mapping[str, object] | None = None
              ) -> PreprocessParams:
        """The parameters for output side `size` and `modality`, with `overrides` (keys of PREPROCESS_OVERRIDES)
        replacing the defaults.

        Values may be typed (YAML) or text (the command line): booleans as true/false, yes/no, on/off or 1/0,
        percentiles as numbers. An unknown key, or size / modality given as an override, raises ValueError listing
        the valid keys; a bad value raises ValueError naming the key.
        """
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(PREPROCESS_OVERRIDES), key=str)
        if unknown:
            fixed = [key for key in unknown if key in ("size", "modality")]
            why = f" ({' and '.join(fixed)} are set by their own argument, not as overrides)" if fixed else ""
            raise ValueError(f"unknown preprocessing parameter(s) {unknown}{why}; valid: {list(PREPROCESS_OVERRIDES)}")
        defaults = {field.name: field.default for field in fields(cls)}
        values = {key: _override_value(key, value, defaults[key]) for key, value in overrides.items()}
        return cls(size=size, modality=modality, **values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessParams:
        """Read back what `to_dict` recorded (a cache's params.json, a model bundle); unknown keys raise."""
        valid = [field.name for field in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown preprocessing parameter(s) {unknown}; valid: {valid}")
        return cls(**values)

    def fingerprint(self) -> str:
        """Short stable hash of the parameters and PREPROCESS_VERSION (names the cache folder)."""
        payload = json.dumps({"version": PREPROCESS_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _override_value(key: str, value: object, default: object) -> object:
    """`value` as the type of the field's default: bool from bool or its words, float from a number or its text."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(f"preprocessing parameter {key}: expected true or false, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"preprocessing parameter {key}: expected a number, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Breast mask: the low-resolution mask every mammography step works from


def _mask_stride(shape: tuple[int, int], max_side: int = MASK_MAX_SIDE) -> int:
    return max(1, math.ceil(max(shape) / max_side))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) over a `bins`-bin histogram of `values`."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts, dtype=np.float64)
    weight_high = weight_low[-1] - weight_low
    cumulative = np.cumsum(counts * centres, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = cumulative / weight_low
        mean_high = (cumulative[-1] - cumulative) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


def _lowres_mask(small: np.ndarray) -> np.ndarray:
    """Breast mask of a small image: Otsu threshold -> opening -> largest component -> hole fill.

    The threshold sits a third of the way from the background level to Otsu's threshold: Otsu alone separates
    background from *dense* tissue and cuts off the dim fatty periphery and skin line. The opening detaches burned-in
    labels and markers joined to the breast by thin bridges; keeping the largest component drops them.
    """
    from scipy import ndimage

    smooth = ndimage.uniform_filter(small.astype(np.float32, copy=False), size=3)
    low, high = np.percentile(smooth, [1, 99.9])
    if high <= low:
        return np.zeros(small.shape, dtype=bool)
    clipped = np.clip(smooth, low, high)  # saturated labels must not drag Otsu's threshold up
    otsu = otsu_threshold(clipped)
    background = np.median(clipped[clipped <= otsu])
    foreground = (clipped > background + (otsu - background) / 3.0).astype(np.uint8)
    # Opening with a 5 x 5 square via separable min/max filters (several times faster than binary_opening).
    foreground = ndimage.maximum_filter(ndimage.minimum_filter(foreground, size=5), size=5).astype(bool)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros(small.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return _fill_holes(labels == int(np.argmax(sizes)))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border (faster than ndimage.binary_fill_holes)."""
    from scipy import ndimage

    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def _mask_and_stride(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    stride = _mask_stride(pixels.shape)
    return _lowres_mask(pixels[::stride, ::stride]), stride


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop_box(pixels: np.ndarray, small_mask: np.ndarray, stride: int) -> tuple[int, int, int, int]:
    """Full-resolution crop box around the low-resolution mask, one low-res pixel of margin each side."""
    box = _bbox(small_mask)
    height, width = pixels.shape
    if box is None:  # nothing found: keep the whole image rather than guess
        return 0, height, 0, width
    r0, r1, c0, c1 = box
    return (max(0, (r0 - 1) * stride), min(height, (r1 + 1) * stride),
            max(0, (c0 - 1) * stride), min(width, (c1 + 1) * stride))


# ---------------------------------------------------------------------------------------------------------------
# Orientation and resizing


def infer_side(mask: np.ndarray) -> str | None:
    """Which way the breast in `mask` faces: "L" when its chest wall is at the left, "R" at the right; None for an
    empty mask.

    The chest wall is a straight edge the breast covers fully, the other side ends in the curved skin line: inside
    the mask's bounding box, the outer 5 % of columns on each side are compared (robust both for a breast centred
    in the film, as in mini-MIAS, and for one filling the whole width); a tie falls back to the centre of mass.
    """
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size == 0:
        return None
    coverage = mask[:, columns[0]: columns[-1] + 1].sum(axis=0, dtype=np.float64)
    band = max(1, round(coverage.size * 0.05))
    left_edge, right_edge = coverage[:band].mean(), coverage[-band:].mean()
    if left_edge != right_edge:
        return Side.L.value if left_edge > right_edge else Side.R.value
    centre = (coverage * np.arange(coverage.size)).sum() / coverage.sum()
    return Side.L.value if centre < (coverage.size - 1) / 2.0 else Side.R.value


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize in float32 (full precision, no 8-bit round trip) through torch.

    torch reads the strided crop without copying and was 2.5-3x faster than PIL's "F" mode here (~25 ms vs ~70 ms
    for a cropped full-field mammogram to 512); the price is importing torch once per worker process.
    """
    import torch

    if pixels.shape == (height, width):
        return pixels.astype(np.float32, copy=True)
    if pixels.dtype != np.float32 or any(step < 0 for step in pixels.strides):
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    shrinking = height < pixels.shape[0] or width < pixels.shape[1]
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(pixels)[None, None], size=(height, width), mode="bilinear", align_corners=False,
        antialias=shrinking,
    )
    return resized[0, 0].numpy()


def _fit(shape: tuple[int, int], size: int) -> tuple[int, int]:
    height, width = shape
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def _pad(image: np.ndarray, size: int, anchor: str) -> np.ndarray:
    """Place `image` on a zero (size, size) canvas: anchor "left" (chest wall at column 0) or "center"."""
    canvas = np.zeros((size, size), dtype=np.float32)
    height, width = image.shape
    top = (size - height) // 2
    left = 0 if anchor == "left" else (size - width) // 2
    canvas[top: top + height, left: left + width] = image
    return canvas


# ---------------------------------------------------------------------------------------------------------------
# The steps


@dataclass(frozen=True)
class Sample:
    """What flows between the steps: the image so far and what earlier steps found about it.

    pixels: the image (2-D). side: the side the caller gave, trusted (None: inferred from the mask). mask: the breast
    mask, at 1 / mask_stride of the image's resolution until `Resize`, at the image's own afterwards (None before
    `FindBreast` and for chest X-rays). crop_box: (r0, r1, c0, c1) of the image in the input's pixels. facing: the
    side the breast faces, from the mask (None when unknown). flipped: whether the image was mirrored. resized:
    whether Resize has run (the pixels are no longer the input's).
    """

    pixels: np.ndarray
    side: Side | None = None
    mask: np.ndarray | None = None
    mask_stride: int = 1
    crop_box: tuple[int, int, int, int] | None = None
    facing: str | None = None
    flipped: bool = False
    resized: bool = False
    resized_shape: tuple[int, int] | None = None  # (height, width) after Resize, before Pad
    pad_offset: tuple[int, int] | None = None  # (top, left) of the resized image on Pad's canvas

    def __post_init__(self):
        _check_2d(self.pixels)
        if self.crop_box is None:
            object.__setattr__(self, "crop_box", (0, self.pixels.shape[0], 0, self.pixels.shape[1]))

    @classmethod
    def of(cls, pixels: np.ndarray, side: object = None) -> Sample:
        """The start of the path: `pixels` with the caller's side ('L'/'R'/a Side; None, NaN or '' when unknown;
        anything else raises ValueError)."""
        return cls(pixels=pixels, side=Side.parse(side, strict=True))

    def replace(self, **changes) -> Sample:
        return dataclasses.replace(self, **changes)

    def info(self) -> dict:
        """What preprocessing found: facing, flipped and crop_box (see `preprocess_with_info`)."""
        info = {"facing": self.facing, "flipped": bool(self.flipped), "crop_box": tuple(self.crop_box)}
        # The geometry that maps a model-input pixel back to the original image (heatmaps at prediction time).
        if self.resized_shape is not None:
            info["resized_shape"] = tuple(self.resized_shape)
        if self.pad_offset is not None:
            info["pad_offset"] = tuple(self.pad_offset)
        return info

    def require_mask(self, step: str, full_resolution: bool = False) -> np.ndarray:
        """The breast mask, or ValueError saying `step` needs FindBreast (and Resize, for `full_resolution`) first."""
        if self.mask is None:
            raise ValueError(f"{step} needs the breast mask: run FindBreast before it")
        if full_resolution and self.mask.shape != self.pixels.shape:
            raise ValueError(f"{step} needs the mask at the image's resolution: run Resize before it")
        return self.mask


class Step:
    """One preprocessing step: `step(sample)` returns a new Sample and never modifies its input."""

    def __call__(self, sample: Sample) -> Sample:  # pragma: no cover - every step overrides it
        raise NotImplementedError


def _check_percentiles(low_pct: float, high_pct: float) -> None:
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")


def _check_size(size: int, name: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")


@dataclass(frozen=True)
class CheckUsable(Step):
    """Refuse pixels too small (under `min_side` per side), not finite or constant."""

    min_side: int = MIN_IMAGE_SIDE

    def __post_init__(self):
        _check_size(self.min_side, "min_side")

    def __call__(self, sample: Sample) -> Sample:
        pixels = sample.pixels
        height, width = pixels.shape
        if min(height, width) < self.min_side:
            raise UnusableImageError(f"image too small ({height} x {width} pixels; at least {self.min_side} per side)")
        low, high = float(pixels.min()), float(pixels.max())  # NaN propagates through min/max
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UnusableImageError("pixel values are not finite (NaN or infinity)")
        if low == high:
            raise UnusableImageError(f"constant image (all pixels {low:g})")
        return sample


@dataclass(frozen=True)
class CheckContrast(Step):
    """Refuse an image whose percentile window (on the strided copy the mask would use) is flat. Chest X-rays are
    checked before resizing too: antialiasing smears a few hot pixels on a blank frame into a window."""

    low_pct: float = 0.5
    high_pct: float = 99.5

    def __post_init__(self):
        _check_percentiles(self.low_pct, self.high_pct)

    def __call__(self, sample: Sample) -> Sample:
        stride = _mask_stride(sample.pixels.shape)
        _percentile_window(sample.pixels[::stride, ::stride].ravel(), self.low_pct, self.high_pct, "the image")
        return sample


@dataclass(frozen=True)
class FindBreast(Step):
    """Find the breast mask (at low resolution, see `MASK_MAX_SIDE`) and the side the breast faces."""

    def __call__(self, sample: Sample) -> Sample:
        small, stride = _mask_and_stride(sample.pixels)
        return sample.replace(mask=small, mask_stride=stride, facing=infer_side(small))


@dataclass(frozen=True)
class CheckBreastFound(Step):
    """Refuse an image whose breast mask covers less than `min_fraction` of it (noise or a label, not a breast)."""

    min_fraction: float = MIN_BREAST_FRACTION

    def __post_init__(self):
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be within [0, 1], got {self.min_fraction}")

    def __call__(self, sample: Sample) -> Sample:
        covered = float(sample.require_mask("CheckBreastFound").mean())
        if covered < self.min_fraction:
            raise UnusableImageError(f"no breast found (the breast mask covers {covered:.1%} of the image)")
        return sample


@dataclass(frozen=True)
class CropToBreast(Step):
    """Crop to the breast's bounding box plus one low-resolution pixel each side (the whole image when the mask is
    empty); the mask is cropped alike."""

    def __call__(self, sample: Sample) -> Sample:
        mask, stride = sample.require_mask("CropToBreast"), sample.mask_stride
        if sample.resized:
            raise ValueError("CropToBreast works on the input's pixels: run it before Resize")
        r0, r1, c0, c1 = _crop_box(sample.pixels, mask, stride)
        top, _, left, _ = sample.crop_box
        return sample.replace(
            pixels=sample.pixels[r0:r1, c0:c1],
            mask=mask[r0 // stride: -(-r1 // stride), c0 // stride: -(-c1 // stride)],
            crop_box=(top + r0, top + r1, left + c0, left + c1),
        )


@dataclass(frozen=True)
class Resize(Step):
    """Resize so the longer side is `size` keeping the aspect ratio (`keep_aspect`), else to (size, size); the
    mask, when there is one, is resized to the same shape."""

    size: int
    keep_aspect: bool = True

    def __post_init__(self):
        _check_size(self.size)

    def __call__(self, sample: Sample) -> Sample:
        shape = _fit(sample.pixels.shape, self.size) if self.keep_aspect else (self.size, self.size)
        resized = _resize(sample.pixels, *shape)
        mask = None if sample.mask is None else _resize(sample.mask.astype(np.float32), *resized.shape) > 0.5
        return sample.replace(pixels=resized, mask=mask, mask_stride=1, resized=True,
                              resized_shape=tuple(resized.shape))


@dataclass(frozen=True)
class GrowMask(Step):
    """Grow the mask by `pixels` on every side (so the skin line is kept when the background is zeroed)."""

    pixels: int = MASK_GROW_PIXELS

    def __post_init__(self):
        if isinstance(self.pixels, bool) or int(self.pixels) != self.pixels or self.pixels < 0:
            raise ValueError(f"pixels must be an integer >= 0, got {self.pixels!r}")

    def __call__(self, sample: Sample) -> Sample:
        from scipy import ndimage

        mask = sample.require_mask("GrowMask", full_resolution=True)
        grown = ndimage.maximum_filter(mask.astype(np.uint8), size=2 * self.pixels + 1).astype(bool)
        return sample.replace(mask=grown)


@dataclass(frozen=True)
class NormaliseIntensity(Step):
    """Map the [low_pct, high_pct] percentile window of the pixels inside the mask (all pixels when there is no
    mask or it is empty) to [0, 1]. A flat window is refused (UnusableImageError): stretching it would blow a few
    stray pixels up to the whole range (`normalise_intensity` is the lenient twin for arrays)."""

    low_pct: float = 0.5
    high_pct: float = 99.5

    def __post_init__(self):
        _check_percentiles(self.low_pct, self.high_pct)

    def __call__(self, sample: Sample) -> Sample:
        pixels = sample.pixels
        where = "the image" if sample.mask is None else "the breast"
        mask = None if sample.mask is None else sample.require_mask("NormaliseIntensity", full_resolution=True)
        values = pixels[mask] if mask is not None and mask.any() else pixels.ravel()
        low, high = _percentile_window(values, self.low_pct, self.high_pct, where)
        return sample.replace(pixels=_apply_window(pixels, low, high))


@dataclass(frozen=True)
class ZeroBackground(Step):
    """Set the pixels outside the mask to 0 (nothing when the mask is empty)."""

    def __call__(self, sample: Sample) -> Sample:
        mask = sample.require_mask("ZeroBackground", full_resolution=True)
        if not mask.any():
            return sample
        pixels = sample.pixels.copy()
        pixels[~mask] = 0.0
        return sample.replace(pixels=pixels)


@dataclass(frozen=True)
class OrientToCommonSide(Step):
    """Mirror the image (and mask) left-right when the breast faces away from COMMON_SIDE: by the caller's side
    when given (trusted), else by the side FindBreast inferred; no flip when neither is known."""

    def __call__(self, sample: Sample) -> Sample:
        if sample.side is None and sample.mask is None:
            raise ValueError("OrientToCommonSide needs a side or the breast mask: give a side or run FindBreast first")
        side = sample.side.value if sample.side is not None else sample.facing
        if side is None or side == COMMON_SIDE.value:
            return sample
        mask = None if sample.mask is None else sample.mask[:, ::-1]
        return sample.replace(pixels=sample.pixels[:, ::-1], mask=mask, flipped=not sample.flipped)


@dataclass(frozen=True)
class Pad(Step):
    """Place the image on a zero (size, size) canvas: `anchor` "left" (against the left edge, where an oriented
    mammogram's chest wall is, centred vertically) or "center"."""

    size: int
    anchor: str = "center"

    def __post_init__(self):
        _check_size(self.size)
        if self.anchor not in ("center", "left"):
            raise ValueError(f"anchor must be 'center' or 'left', got {self.anchor!r}")

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample.pixels.shape
        if height > self.size or width > self.size:
            raise ValueError(f"Pad to {self.size}: the image is larger ({height} x {width}); run Resize before it")
        mask = None
        if sample.mask is not None and sample.mask.shape == sample.pixels.shape:
            mask = _pad(sample.mask.astype(np.float32), self.size, self.anchor) > 0.5
        top = (self.size - height) // 2
        left = 0 if self.anchor == "left" else (self.size - width) // 2  # as _pad places it
        return sample.replace(pixels=_pad(sample.pixels, self.size, self.anchor), mask=mask, pad_offset=(top, left))


# ---------------------------------------------------------------------------------------------------------------
# The one composition


def preprocess_steps(params: PreprocessParams) -> tuple[Step, ...]:
    """The steps `preprocess_with_info` runs for `params`, in order (see the module docstring)."""
    if params.modality == "cxr":
        return (CheckUsable(), CheckContrast(params.low_pct, params.high_pct), Resize(params.size, params.keep_aspect),
                NormaliseIntensity(params.low_pct, params.high_pct), Pad(params.size, "center"))
    steps: list[Step] = [CheckUsable(), FindBreast(), CheckBreastFound()]
    if params.crop:
        steps.append(CropToBreast())
    steps.append(Resize(params.size, params.keep_aspect))
    if params.mask_background:
        steps.append(GrowMask())
    steps.append(NormaliseIntensity(params.low_pct, params.high_pct))
    if params.mask_background:
        steps.append(ZeroBackground())
    if params.orient:
        steps.append(OrientToCommonSide())
    steps.append(Pad(params.size, "left"))
    return tuple(steps)


def run_steps(steps: tuple[Step, ...] | list[Step], sample: Sample) -> Sample:
    """`sample` through `steps`, in order."""
    for step in steps:
        sample = step(sample)
    return sample


def preprocess_image(pixels: np.ndarray, side: str | None, params: PreprocessParams | None = None) -> np.ndarray:
    """Decoded pixels (bright = dense, any scale, float or integer: an integer image and its float32 copy give the
    same output, bit for bit) -> model input float32 (size, size) in [0, 1].

    The composition `preprocess_steps(params)`, used at training time (through the cache) and at prediction time.
    Raises UnusableImageError for pixels too small, constant or not finite, with no breast found, or without
    contrast.
    """
    return preprocess_with_info(pixels, side, params)[0]


def preprocess_with_info(
    pixels: np.ndarray, side: str | None, params: PreprocessParams | None = None
) -> tuple[np.ndarray, dict]:
    """`preprocess_image` plus what it found: {"facing": side the image content faces (mammo; None for cxr or a
    blank image), "flipped": bool, "crop_box": (r0, r1, c0, c1)}."""
    sample = run_steps(preprocess_steps(params or PreprocessParams()), Sample.of(pixels, side))
    return sample.pixels, sample.info()


def prepare_file(
    path: str | Path, side: str | Side | None, view: str | None, params: PreprocessParams
) -> tuple[np.ndarray, dict]:
    """File -> model input: read the file, check its header against the expected `side` and `view` (either None:
    not checked), run the composition (side None: the file's own laterality tag, else inferred).

    Returns the image and `preprocess_with_info`'s info plus "header" (the file's `ImageHeader`) and "seconds"
    ({"read": reading and decoding, "preprocess": the rest}). Raises ImageReadError naming the file when it cannot
    be read, contradicts `side` / `view`, or its pixels are unusable; ValueError when `side` is not a side.
    """
    expected = Side.parse(side, strict=True)
    started = time.perf_counter()
    pixels, header = read_image(path, keep_integers=True)  # the steps take integers: no float32 copy of the image
    read = time.perf_counter()
    check_header_against(header, view, expected, path)
    try:
        image, info = preprocess_with_info(pixels, expected or header.side, params)
    except UnusableImageError as error:
        raise ImageReadError(path, error.reason) from None
    info.update(header=header, seconds={"read": read - started, "preprocess": time.perf_counter() - read})
    return image, info


# ---------------------------------------------------------------------------------------------------------------
# The steps on their own, on arrays


def breast_mask(pixels: np.ndarray) -> np.ndarray:
    """Boolean breast mask, same shape as `pixels` (computed at low resolution, robust to labels and background)."""
    sample = FindBreast()(Sample(pixels))
    stride = sample.mask_stride
    full = np.repeat(np.repeat(sample.mask, stride, axis=0), stride, axis=1)
    return np.ascontiguousarray(full[: pixels.shape[0], : pixels.shape[1]])


def breast_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(row_start, row_stop, col_start, col_stop) of the breast in full-resolution pixels, with a small margin;
    the whole image when no breast is found."""
    return run_steps((FindBreast(), CropToBreast()), Sample(pixels)).crop_box


def crop_to_breast(pixels: np.ndarray) -> np.ndarray:
    """Copy of `pixels` cropped to `breast_box(pixels)`."""
    return run_steps((FindBreast(), CropToBreast()), Sample(pixels)).pixels.copy()


def orient_to_common_side(pixels: np.ndarray, side: str | None) -> np.ndarray:
    """Copy of `pixels` mirrored so that the breast faces COMMON_SIDE.

    side "L"/"R" (or a tlese.vocab.Side) is trusted; side None is inferred from the breast mask (see the module
    docstring for the convention).
    """
    sample = Sample.of(pixels, side)
    steps = (OrientToCommonSide(),) if sample.side is not None else (FindBreast(), OrientToCommonSide())
    return run_steps(steps, sample).pixels.copy()


def resize_keep_aspect_pad(pixels: np.ndarray, size: int, anchor: str = "center") -> np.ndarray:
    """Resize so the longer side is `size`, keeping the aspect ratio, and pad with 0 to (size, size).

    anchor "center" centres the image; "left" keeps it against the left edge (used for oriented mammograms, so the
    chest wall stays at column 0) and centres it vertically.
    """
    sample = Sample(pixels)
    return run_steps((Resize(size, keep_aspect=True), Pad(size, anchor)), sample).pixels


def normalise_intensity(
    pixels: np.ndarray, mask: np.ndarray | None, low_pct: float = 0.5, high_pct: float = 99.5
) -> np.ndarray:
    """Map the [low_pct, high_pct] percentile window of the pixels inside `mask` (all pixels if None) to [0, 1].

    Lenient, unlike the NormaliseIntensity step: a flat window (constant image) falls back to min/max and then to
    all zeros.
    """
    values = pixels[mask] if mask is not None else pixels.ravel()
    if values.size == 0:
        values = pixels.ravel()
    try:
        low, high = _percentile_window(values, low_pct, high_pct, "the image")
    except UnusableImageError:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.float32)
    return _apply_window(pixels, low, high)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _percentile_window(values: np.ndarray, low_pct: float, high_pct: float, where: str) -> tuple[float, float]:
    """The [low_pct, high_pct] percentiles of `values`; a flat window raises UnusableImageError naming `where`.

    Integer values are taken as float32 first, so an integer image and its float32 copy give the same window."""
    if values.dtype.kind in "uib":
        values = values.astype(np.float32)
    low, high = (float(v) for v in np.percentile(values, [low_pct, high_pct]))
    if high <= low:
        raise UnusableImageError(f"no contrast in {where} (its {low_pct:g}-{high_pct:g} percentile "
                                 f"window is flat at {low:g})")
    return low, high


def _apply_window(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (pixels.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _check_2d(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D pixel array, got {getattr(pixels, 'shape', type(pixels))}")
    if pixels.size == 0:
        raise ValueError("expected a non-empty pixel array")
