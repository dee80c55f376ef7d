"""Mammogram / CXR preprocessing: mask, crop, orientation, resize, normalisation, the one path, real files."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import synthetic_breast, write_dicom
from PIL import Image

from tlese.data.io import ImageReadError, read_image
from tlese.data.preprocess import (
    PREPROCESS_OVERRIDES,
    PREPROCESS_VERSION,
    CropToBreast,
    FindBreast,
    NormaliseIntensity,
    OrientToCommonSide,
    Pad,
    PreprocessParams,
    Resize,
    Sample,
    UnusableImageError,
    breast_box,
    breast_mask,
    crop_to_breast,
    infer_side,
    normalise_intensity,
    orient_to_common_side,
    prepare_file,
    preprocess_image,
    preprocess_steps,
    preprocess_with_info,
    resize_keep_aspect_pad,
    run_steps,
)
from tlese.vocab import COMMON_SIDE, Side

COMMON_IS_LEFT = COMMON_SIDE == Side.L


def _ellipse(height=240, width=160):
    rows, cols = np.mgrid[0:height, 0:width]
    return ((rows - height / 2) / (height * 0.42)) ** 2 + (cols / (width * 0.6)) ** 2 <= 1.0


def _faces_common_side(mask: np.ndarray) -> bool:
    """The breast's chest wall is on COMMON_SIDE: that image edge (outer 10 % of columns) is covered more than the
    opposite one, and the centre of mass is not beyond the middle (a breast filling the width sits mid-image)."""
    band = max(1, mask.shape[1] // 10)
    near, far = mask[:, :band].mean(), mask[:, -band:].mean()
    centre = np.nonzero(mask)[1].mean() / (mask.shape[1] - 1)
    if not COMMON_IS_LEFT:
        near, far, centre = far, near, 1.0 - centre
    return near > far and centre < 0.55


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def test_params_round_trip_and_fingerprint():
    params = PreprocessParams(size=256, low_pct=1.0)
    assert PreprocessParams.from_dict(params.to_dict()) == params
    assert params.fingerprint() == PreprocessParams(size=256, low_pct=1.0).fingerprint()
    assert params.fingerprint() != PreprocessParams(size=512, low_pct=1.0).fingerprint()
    assert params.to_dict()["modality"] == "mammo" and isinstance(PREPROCESS_VERSION, int)


@pytest.mark.parametrize("bad", [{"modality": "ct"}, {"size": 4}, {"low_pct": 60.0, "high_pct": 40.0}])
def test_params_validation(bad):
    with pytest.raises(ValueError):
        PreprocessParams(**bad)


def test_params_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown preprocessing parameter.*'colour'.*valid"):
        PreprocessParams.from_dict({"size": 64, "colour": True})


def test_build_is_the_one_rule_for_parameters():
    assert PreprocessParams.build(256) == PreprocessParams(size=256)
    assert set(PREPROCESS_OVERRIDES) == set(PreprocessParams.build(64).to_dict()) - {"size", "modality"}
    typed = PreprocessParams.build(64, "cxr", {"crop": False, "low_pct": 1, "high_pct": 99.0})
    text = PreprocessParams.build(64, "cxr", {"crop": "no", "low_pct": "1", "high_pct": " 99 "})  # --param values
    assert typed == text == PreprocessParams(size=64, modality="cxr", crop=False, low_pct=1.0, high_pct=99.0)
    assert PreprocessParams.build(64, overrides={"orient": "TRUE", "mask_background": 0}).mask_background is False


@pytest.mark.parametrize(("overrides", "message"), [
    ({"colour": True}, r"unknown preprocessing parameter\(s\) \['colour'\]; valid: \['crop', 'orient', "
                       r"'keep_aspect', 'low_pct', 'high_pct', 'mask_background'\]"),
    ({"size": 128}, r"\['size'\] \(size are set by their own argument, not as overrides\)"),
    ({"crop": "maybe"}, r"crop: expected true or false, got 'maybe'"),
    ({"low_pct": "low"}, r"low_pct: expected a number, got 'low'"),
    ({"low_pct": True}, r"low_pct: expected a number, got True"),
    ({"low_pct": 90, "high_pct": 10}, r"need 0 <= low_pct < high_pct <= 100"),
])
def test_build_rejects_bad_overrides_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        PreprocessParams.build(64, "mammo", overrides)


# ---------------------------------------------------------------------------------------------------------------
# Mask and crop


@pytest.mark.parametrize("background", [0.0, 1500.0])
def test_mask_finds_breast_and_ignores_label(background):
    image = synthetic_breast(background=background, label=True)
    original = image.copy()
    mask = breast_mask(image)
    truth = _ellipse()
    assert mask.shape == image.shape and mask.dtype == bool
    assert mask[truth].mean() > 0.98  # breast kept
    assert not mask[8:28, -40:-10].any()  # burned-in label dropped
    assert mask[~truth].mean() < 0.02
    np.testing.assert_array_equal(image, original)  # input untouched


def test_mask_handles_label_touching_breast_by_thin_bridge():
    image = synthetic_breast(label=True)
    image[18, 40:130] = image.max()  # a 1-pixel marker line joining the label to the breast
    mask = breast_mask(image)
    assert not mask[8:28, -40:-10].any()


def test_crop_keeps_breast_and_drops_empty_background():
    image = np.zeros((300, 400), np.float32)
    image[50:250, 0:200] = synthetic_breast(height=200, width=200, label=False)
    r0, r1, c0, c1 = breast_box(image)
    cropped = crop_to_breast(image)
    np.testing.assert_array_equal(cropped, image[r0:r1, c0:c1])
    truth = image > 100
    assert truth[r0:r1, c0:c1].sum() >= 0.98 * truth.sum()
    assert cropped.shape[0] < 240 and cropped.shape[1] < 260


def test_blank_image_keeps_everything_but_is_refused_as_model_input():
    image = np.zeros((50, 40), np.float32)
    assert not breast_mask(image).any()
    assert crop_to_breast(image).shape == (50, 40)
    # an all-zero model input would train silently on nothing: the one path refuses it with the reason
    with pytest.raises(UnusableImageError, match=r"constant image \(all pixels 0\)"):
        preprocess_image(image, "L", PreprocessParams(size=32))


# ---------------------------------------------------------------------------------------------------------------
# Orientation


def test_orient_flips_right_breasts_only():
    left, right = synthetic_breast(side="L"), synthetic_breast(side="R")
    flip_target = right if COMMON_IS_LEFT else left
    keep_target = left if COMMON_IS_LEFT else right
    np.testing.assert_array_equal(orient_to_common_side(flip_target, "R" if COMMON_IS_LEFT else "L"),
                                  flip_target[:, ::-1])
    kept = orient_to_common_side(keep_target, COMMON_SIDE)
    np.testing.assert_array_equal(kept, keep_target)
    assert kept is not keep_target  # a copy, never the input


@pytest.mark.parametrize("side", ["L", "R"])
def test_orient_infers_unknown_side_from_mass(side):
    image = synthetic_breast(side=side)
    assert infer_side(breast_mask(image)) == side
    oriented = orient_to_common_side(image, None)
    assert _faces_common_side(breast_mask(oriented))


def test_orient_rejects_bad_side():
    with pytest.raises(ValueError, match="side must be L, R"):
        orient_to_common_side(np.zeros((4, 4), np.float32), "up")


# ---------------------------------------------------------------------------------------------------------------
# Resize and intensity


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_resize_keep_aspect_pad(shape):
    image = np.ones(shape, np.float32)
    out = resize_keep_aspect_pad(image, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    rows, cols = np.nonzero(out > 0.5)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert abs(height / width - shape[0] / shape[1]) < 0.1
    left = resize_keep_aspect_pad(image, 64, anchor="left")
    assert np.nonzero(left > 0.5)[1].min() == 0


def test_normalise_intensity_uses_mask_percentiles():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = np.zeros_like(image, bool)
    mask[5:] = True  # values 50..99
    out = normalise_intensity(image, mask, 0.0, 100.0)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
    assert np.all(out[:5] == 0.0) and out[5, 0] == 0.0 and out[9, 9] == 1.0
    assert np.all(normalise_intensity(np.full((4, 4), 7.0), None) == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The one path


def test_preprocess_image_output_contract():
    image = synthetic_breast(side="R", background=800.0)
    original = image.copy()
    out = preprocess_image(image, "R", PreprocessParams(size=96))
    assert out.shape == (96, 96) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.9
    assert _faces_common_side(out > 0.05)
    np.testing.assert_array_equal(image, original)


def test_left_and_mirrored_right_give_the_same_input():
    left = synthetic_breast(side="L", seed=3)
    params = PreprocessParams(size=64)
    np.testing.assert_allclose(preprocess_image(left, "L", params), preprocess_image(left[:, ::-1], "R", params),
                               atol=1e-5)


def test_label_is_removed_from_model_input():
    image = synthetic_breast(label=True)
    image[100:110, 140:150] = image.max() * 2  # a marker inside the crop box but outside the breast
    out = preprocess_image(image, "L", PreprocessParams(size=240, crop=False, keep_aspect=False))
    assert out[105 * 240 // 240, 145 * 240 // 160] == 0.0
    kept = preprocess_image(image, "L", PreprocessParams(size=240, crop=False, keep_aspect=False,
                                                         mask_background=False))
    assert kept[105, 145 * 240 // 160] > 0.9


def test_cxr_path_neither_crops_nor_flips():
    image = np.zeros((100, 80), np.float32)
    image[:, 60:] = 1000.0  # bright on the right: a mammogram path would flip or crop this
    out = preprocess_image(image, None, PreprocessParams(size=50, modality="cxr"))
    assert out.shape == (50, 50)
    assert out[:, 40:44].mean() > 0.9 and out[:, 6:30].max() == 0.0  # 80 wide -> 40 wide, centred at 5..45


def test_prepare_file_checks_laterality_and_view(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", synthetic_breast(side="R").astype(np.uint16), image_laterality="R",
                       view_position="CC")
    params = PreprocessParams.build(64)
    out, info = prepare_file(path, None, None, params)  # side from the file
    assert _faces_common_side(out > 0.05)
    assert info["flipped"] and info["header"].side == "R" and set(info["seconds"]) == {"read", "preprocess"}
    np.testing.assert_array_equal(out, preprocess_image(read_image(path)[0], "R", params))  # the same composition
    np.testing.assert_array_equal(prepare_file(path, Side.R, "cc", params)[0], out)
    with pytest.raises(ImageReadError, match=r"r\.dcm: laterality conflict"):
        prepare_file(path, "L", None, params)
    with pytest.raises(ImageReadError, match=r"r\.dcm: view conflict"):
        prepare_file(path, "R", "MLO", params)
    with pytest.raises(ValueError, match="side must be L, R or missing"):
        prepare_file(path, "up", None, params)


# ---------------------------------------------------------------------------------------------------------------
# The composition is made of the steps


def _names(params: PreprocessParams) -> list[str]:
    return [type(step).__name__ for step in preprocess_steps(params)]


def test_the_composition_lists_its_steps_in_order():
    assert _names(PreprocessParams.build(64)) == [
        "CheckUsable", "FindBreast", "CheckBreastFound", "CropToBreast", "Resize", "GrowMask", "NormaliseIntensity",
        "ZeroBackground", "OrientToCommonSide", "Pad"]
    assert _names(PreprocessParams.build(64, overrides={"crop": False, "orient": False, "mask_background": False})) \
        == ["CheckUsable", "FindBreast", "CheckBreastFound", "Resize", "NormaliseIntensity", "Pad"]
    assert _names(PreprocessParams.build(64, "cxr")) == [
        "CheckUsable", "CheckContrast", "Resize", "NormaliseIntensity", "Pad"]
    assert repr(preprocess_steps(PreprocessParams.build(64))[-1]) == "Pad(size=64, anchor='left')"


def test_preprocess_with_info_is_exactly_its_steps():
    image = synthetic_breast(side="R", background=600.0, seed=4)
    params = PreprocessParams.build(80)
    out, info = preprocess_with_info(image, "R", params)
    sample = Sample.of(image, "R")
    for step in preprocess_steps(params):
        sample = step(sample)
    np.testing.assert_array_equal(out, sample.pixels)
    assert info == sample.info() and info["flipped"] and info["crop_box"] == breast_box(image)


def test_the_array_functions_are_the_steps():
    image = synthetic_breast(side="R", seed=6)
    found = FindBreast()(Sample(image))
    np.testing.assert_array_equal(crop_to_breast(image), CropToBreast()(found).pixels)
    np.testing.assert_array_equal(orient_to_common_side(image, None), OrientToCommonSide()(found).pixels)
    assert found.facing == infer_side(breast_mask(image)) == "R"
    np.testing.assert_array_equal(resize_keep_aspect_pad(image, 50, "left"),
                                  run_steps((Resize(50), Pad(50, "left")), Sample(image)).pixels)


def test_steps_check_their_arguments_and_their_order():
    with pytest.raises(ValueError, match="anchor must be 'center' or 'left'"):
        Pad(64, "right")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        Resize(0)
    with pytest.raises(ValueError, match="need 0 <= low_pct < high_pct <= 100"):
        NormaliseIntensity(50.0, 20.0)
    with pytest.raises(ValueError, match="expected a 2-D pixel array"):
        Sample(np.zeros((2, 3, 4), np.float32))
    image = synthetic_breast()
    with pytest.raises(ValueError, match="CropToBreast needs the breast mask: run FindBreast before it"):
        CropToBreast()(Sample(image))
    with pytest.raises(ValueError, match="OrientToCommonSide needs a side or the breast mask"):
        OrientToCommonSide()(Sample(image))
    with pytest.raises(ValueError, match="Pad to 32: the image is larger"):
        Pad(32)(Sample(image))
    large = synthetic_breast(height=1200, width=800)  # its mask is found at a third of its resolution
    with pytest.raises(ValueError, match="needs the mask at the image's resolution: run Resize before it"):
        NormaliseIntensity()(FindBreast()(Sample(large)))
    with pytest.raises(ValueError, match="CropToBreast works on the input's pixels: run it before Resize"):
        CropToBreast()(Resize(64)(FindBreast()(Sample(large))))
    original = image.copy()
    run_steps(preprocess_steps(PreprocessParams.build(64)), Sample.of(image, "L"))
    np.testing.assert_array_equal(image, original)  # no step modifies its input


# ---------------------------------------------------------------------------------------------------------------
# Real data


def _reference_mask(pixels: np.ndarray) -> np.ndarray:
    """Independent breast mask, made differently from breast_mask: plain Otsu threshold on a ~256-px copy, an
    opening wide enough to cut thin film-edge strips and marker lines, largest component."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    stride = max(1, max(pixels.shape) // 256)
    small = pixels[::stride, ::stride]
    opened = ndimage.binary_opening(small > threshold_otsu(small), structure=np.ones((5, 5), bool))
    labels, _ = ndimage.label(opened)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == sizes.argmax()
    return np.repeat(np.repeat(mask, stride, 0), stride, 1)[: pixels.shape[0], : pixels.shape[1]]


def _check_real_image(pixels: np.ndarray, side: str, name: str) -> bool:
    """Crop keeps the breast, output faces COMMON_SIDE; returns False when the image content faces the other way
    from its laterality label (then the output faces the other way too: a given side is trusted)."""
    out, info = preprocess_with_info(pixels, side, PreprocessParams(size=128))
    assert out.shape == (128, 128) and 0.0 <= out.min() and out.max() <= 1.0, name
    assert info["flipped"] == (side != COMMON_SIDE.value), name
    r0, r1, c0, c1 = info["crop_box"]  # the same box as breast_box(pixels), without computing the mask twice
    weights = pixels * _reference_mask(pixels)  # the breast's pixel mass
    kept = weights[r0:r1, c0:c1].sum() / weights.sum()
    assert kept >= 0.98, f"{name}: crop keeps only {kept:.3f} of the breast's pixel mass"
    if info["facing"] != side:
        return False
    assert _faces_common_side(out > 0.05), f"{name} ({side}) does not face {COMMON_SIDE.value} after preprocessing"
    return True


@pytest.mark.shared_data
def test_cbis_ddsm_crop_and_orientation(cbis_dicoms):
    for path in cbis_dicoms:
        pixels, header = read_image(path)
        assert header.side in ("L", "R"), path.name
        assert _check_real_image(pixels, header.side, path.name), f"{path.name}: image faces the other way"
        assert preprocess_with_info(pixels, header.side)[1]["crop_box"] == breast_box(pixels), path.name


# mini-MIAS mdb151 (labelled R) and mdb152 (L) are stored facing the opposite way to every other film of their
# side; every statistic of the breast shape agrees (chest-wall edge, centre of mass), so the pair is a
# label/scan anomaly of the data set, reported here rather than hidden.
MIAS_FACING_THE_OTHER_WAY = {"mdb151", "mdb152"}


@pytest.mark.shared_data
def test_mini_mias_crop_and_orientation(mias_dir):
    import pandas as pd

    labels = pd.read_csv(mias_dir / "labels.csv")
    assert len(labels) == 256
    mismatched = set()
    for row in labels.itertuples():
        pixels = np.asarray(Image.open(mias_dir / row.file), dtype=np.float32)
        if not _check_real_image(pixels, row.side, row.image_id):
            mismatched.add(row.image_id)
    assert mismatched == MIAS_FACING_THE_OTHER_WAY


# ---------------------------------------------------------------------------------------------------------------
# Pixels that cannot give a model input are refused with the reason


@pytest.mark.parametrize(
    ("pixels", "modality", "reason"),
    [
        (np.zeros((1, 1), np.float32), "mammo", r"image too small \(1 x 1 pixels"),
        (np.full((60, 50), 812.0, np.float32), "cxr", r"constant image \(all pixels 812\)"),
        (np.where(np.random.default_rng(0).random((200, 150)) < 0.001, 4000.0, 0.0).astype(np.float32), "mammo",
         r"no breast found \(the breast mask covers 0\.0% of the image\)"),
        (np.random.default_rng(1).normal(100, 5, (200, 150)).astype(np.float32), "mammo", r"no breast found"),
        (np.where(np.random.default_rng(2).random((200, 150)) < 0.001, 4000.0, 0.0).astype(np.float32), "cxr",
         r"no contrast in the image \(its 0\.5-99\.5 percentile window is flat at 0\)"),
        (np.full((60, 50), np.nan, np.float32), "mammo", r"not finite"),
    ],
    ids=["1x1", "constant", "hot-pixels", "noise", "flat-cxr", "nan"],
)
def test_unusable_pixels_are_refused_with_the_reason(pixels, modality, reason):
    with pytest.raises(UnusableImageError, match=reason):
        preprocess_image(pixels, None, PreprocessParams(size=32, modality=modality))


def test_prepare_skips_unusable_images_with_their_reason_and_prepares_the_rest(tmp_path):
    import pandas as pd
    import pydicom

    from tlese.data.cache import prepare_table

    files = {"blank.png": np.zeros((120, 90), np.uint8), "tiny.png": np.full((1, 1), 7, np.uint8),
             "good.png": synthetic_breast().astype(np.uint16)}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(tmp_path / name)
    twelve_bit = (synthetic_breast() / synthetic_breast().max() * 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "bits.dcm", twelve_bit, image_laterality="L")
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 8, 7  # the header claims 8 bits for 12-bit data
    ds.save_as(path)
    table = pd.DataFrame({"path": [str(tmp_path / name) for name in [*files, "bits.dcm"]], "side": "L"})
    with pytest.warns(UserWarning, match="skipped 3 of 4"):
        prepared, summary = prepare_table(table, PreprocessParams(size=32), tmp_path / "cache", workers=1,
                                          progress=False, root=tmp_path, max_skipped_fraction=1.0)
    assert prepared["path"].tolist() == [str(tmp_path / "good.png")]
    assert summary.skipped == [
        ("blank.png", "constant image (all pixels 0)"),
        ("tiny.png", "image too small (1 x 1 pixels; at least 32 per side)"),
        ("bits.dcm", "pixel values up to 4095 do not fit BitsStored 8 (largest valid value 255): the header's bit "
                     "depth is wrong"),
    ]
    with pytest.raises(ImageReadError, match=r"blank\.png: constant image"):
        prepare_file(tmp_path / "blank.png", "L", None, PreprocessParams.build(32))


# ---------------------------------------------------------------------------------------------------------------
# Integer input (read_image(..., keep_integers=True), what prepare_file reads) gives the float32 path's output exactly


def _same_output(a: tuple[np.ndarray, dict], b: tuple[np.ndarray, dict]) -> bool:
    return a[0].dtype == b[0].dtype == np.float32 and np.array_equal(a[0], b[0]) and a[1] == b[1]


def _prepared_like_the_float_path(path, params: PreprocessParams, side=None) -> None:
    image, info = prepare_file(path, side, None, params)
    integers, _ = read_image(path, keep_integers=True)
    pixels, header = read_image(path)
    assert integers.dtype.kind == "u" and pixels.dtype == np.float32, path  # the test compares two real paths
    expected = preprocess_with_info(pixels.astype(np.float32), side or header.side, params)
    assert np.array_equal(image, expected[0]), path
    assert {key: info[key] for key in expected[1]} == expected[1], path


@pytest.mark.shared_data
def test_prepare_file_on_a_cbis_dicom_equals_the_float32_path(cbis_dicoms):
    for size in (512, 96):
        _prepared_like_the_float_path(cbis_dicoms[0], PreprocessParams.build(size))


@pytest.mark.shared_data
def test_prepare_file_on_a_mini_mias_png_equals_the_float32_path(mias_dir):
    for path in sorted((mias_dir / "images").glob("*.png"))[:2]:
        _prepared_like_the_float_path(path, PreprocessParams.build(256))


@pytest.mark.shared_data
def test_prepare_file_on_a_chest_x_ray_png_equals_the_float32_path(cxr_dir):
    for path in sorted((cxr_dir / "images").rglob("*.png"))[:2]:
        _prepared_like_the_float_path(path, PreprocessParams.build(224, "cxr"))


@pytest.mark.parametrize("modality", ["mammo", "cxr"])
@pytest.mark.parametrize("overrides", [{}, {"crop": False, "mask_background": False}, {"keep_aspect": False}])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int32])
def test_integer_and_float32_input_give_identical_output(modality, overrides, dtype):
    scale = 0.08 if dtype == np.uint8 else 7.0  # 8-bit: peak ~ 200; 16-bit: ~ 20000
    image = (synthetic_breast(600, 380, side="R", background=300.0, seed=3) * scale).astype(dtype)
    params = PreprocessParams.build(128, modality, overrides)
    for side in (None, "R"):
        assert _same_output(preprocess_with_info(image, side, params),
                            preprocess_with_info(image.astype(np.float32), side, params))


def test_integer_input_is_refused_for_the_same_reasons():
    flat = np.full((64, 64), 700, np.uint16)
    for pixels in (flat, flat.astype(np.float32)):
        with pytest.raises(UnusableImageError, match="constant image"):
            preprocess_image(pixels, None)
    with pytest.raises(UnusableImageError, match="no contrast in the image"):
        stray = flat.copy()
        stray[0, 0] = 9
        preprocess_image(stray, None, PreprocessParams.build(64, "cxr"))


def test_keep_integers_returns_the_decoded_integers_only_when_nothing_is_applied(tmp_path):
    stored = (synthetic_breast(label=False) * 10).astype(np.uint16)
    plain, _ = read_image(write_dicom(tmp_path / "plain.dcm", stored), keep_integers=True)
    assert plain.dtype == np.uint16 and np.array_equal(plain, stored)
    for name, kwargs in [("rescale", {"rescale": (2.0, -10.0)}), ("window", {"window": (3000.0, 4000.0)}),
                         ("m1", {"photometric": "MONOCHROME1"})]:
        path = write_dicom(tmp_path / f"{name}.dcm", stored, **kwargs)
        pixels, _ = read_image(path, keep_integers=True)
        assert pixels.dtype == np.float32 and np.array_equal(pixels, read_image(path)[0]), name
    for name, array in [("8bit", (stored // 64).astype(np.uint8)), ("16bit", stored)]:
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        pixels, _ = read_image(tmp_path / f"{name}.png", keep_integers=True)
        assert pixels.dtype == array.dtype and np.array_equal(pixels, array), name
