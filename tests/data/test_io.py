"""Reading DICOM / PNG / JPEG / PGM: pixel values, header tags, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers import synthetic_breast, write_dicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from tlese.data.io import ImageReadError, check_header_against, read_header, read_image
from tlese.vocab import Side, View, view_family


@pytest.fixture
def pixels16() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, size=(40, 30), dtype=np.uint16)


# ---------------------------------------------------------------------------------------------------------------
# DICOM pixels


def test_dicom_keeps_16_bit_values(tmp_path, pixels16):
    path = write_dicom(tmp_path / "a.dcm", pixels16)
    pixels, header = read_image(path)
    assert pixels.dtype == np.float32 and pixels.shape == (40, 30)
    np.testing.assert_array_equal(pixels, pixels16.astype(np.float32))
    assert header.bits_stored == 16 and header.source_format == "dicom" and header.modality == "MG"


def test_rescale_is_applied(tmp_path, pixels16):
    path = write_dicom(tmp_path / "a.dcm", pixels16, rescale=(2.0, -100.0))
    pixels, _ = read_image(path)
    np.testing.assert_allclose(pixels, pixels16 * 2.0 - 100.0)


def test_window_is_applied(tmp_path, pixels16):
    path = write_dicom(tmp_path / "a.dcm", pixels16, window=(2000.0, 1000.0))
    pixels, _ = read_image(path)
    expected = pydicom.pixels.apply_voi_lut(pixels16.astype(np.float64), pydicom.dcmread(path))
    np.testing.assert_allclose(pixels, expected, rtol=1e-6)
    low, high = pixels16 < 1400, pixels16 > 2600  # outside the window: clipped flat
    assert np.ptp(pixels[low]) == 0 and np.ptp(pixels[high]) == 0 and pixels[high][0] > pixels[low][0]


def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path):
    breast = synthetic_breast(label=False)  # bright tissue on a dark background
    stored = (breast.max() - breast).astype(np.uint16)  # MONOCHROME1 stores the negative
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    pixels, header = read_image(path)
    assert header.photometric == "MONOCHROME1"
    tissue, background = pixels[120, 20], pixels[5, 150]
    assert tissue > background
    np.testing.assert_allclose(pixels, stored.max() + stored.min() - stored.astype(np.float32))


def test_rle_round_trip(tmp_path, pixels16):
    path = write_dicom(tmp_path / "rle.dcm", pixels16, transfer_syntax=RLELossless)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    pixels, header = read_image(path)
    np.testing.assert_array_equal(pixels, pixels16)
    assert header.transfer_syntax == RLELossless


def test_rle_round_trip_8_bit(tmp_path):
    image = np.arange(600, dtype=np.uint8).reshape(20, 30)
    pixels, _ = read_image(write_dicom(tmp_path / "rle8.dcm", image, transfer_syntax=RLELossless))
    np.testing.assert_array_equal(pixels, image)


def test_jpeg2000_lossless_round_trip(tmp_path, pixels16):
    from pydicom.pixels import get_encoder

    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed")
    image = np.tile(pixels16, (4, 4))  # openjpeg's default 6 resolution levels need >= 64 px
    path = write_dicom(tmp_path / "j2k.dcm", image, transfer_syntax=JPEG2000Lossless)
    pixels, _ = read_image(path)
    np.testing.assert_array_equal(pixels, image)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_reference_files_decode_like_uncompressed(name):
    """pydicom's bundled test files: JPEG-LS (pylibjpeg-libjpeg), JPEG 2000 (openjpeg), RLE, big-endian, implicit."""
    from pydicom.data import get_testdata_file

    reference, _ = read_image(get_testdata_file("MR_small.dcm"))
    pixels, _ = read_image(get_testdata_file(name))
    np.testing.assert_array_equal(pixels, reference)


# ---------------------------------------------------------------------------------------------------------------
# DICOM header: laterality and view


@pytest.mark.parametrize(
    "tags, side, view",
    [
        ({"image_laterality": "R", "laterality": "L", "view_position": "MLO"}, "R", "MLO"),
        ({"laterality": "L", "view_position": "CC"}, "L", "CC"),
        ({"series_description": "RIGHT MLO"}, "R", "MLO"),
        ({"series_description": "L CC"}, "L", "CC"),
        ({"series_description": "rmlo"}, "R", "MLO"),
        ({"image_laterality": "L", "view_code_meaning": "medio-lateral oblique"}, "L", "MLO"),
        ({"image_laterality": "B", "view_code_meaning": "cranio-caudal"}, None, "CC"),
        ({"view_position": "XCCL"}, None, "XCCL"),
        ({}, None, None),
    ],
)
def test_side_and_view_from_tags(tmp_path, tags, side, view):
    path = write_dicom(tmp_path / "h.dcm", np.zeros((4, 4), np.uint16), **tags)
    header = read_header(path)
    assert (header.side, header.view) == (side, view)


def test_view_family_groups_exaggerated_views():
    assert view_family("XCCL") == "CC" and view_family("xccm") == "CC" and view_family("MLO") == "MLO"
    assert view_family("ML") == "ML" and view_family(None) is None


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_read_header_does_not_decode_pixels(tmp_path, pixels16):
    path = write_dicom(tmp_path / "rle.dcm", pixels16, transfer_syntax=RLELossless, laterality="L")
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 100])  # pixel data cut short
    header = read_header(tmp_path / "cut.dcm")
    assert header.side == "L" and (header.rows, header.cols) == (40, 30)
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")


def test_header_has_no_identifiers(tmp_path):
    path = write_dicom(tmp_path / "h.dcm", np.zeros((4, 4), np.uint16), laterality="L")
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.StudyDate = "Doe^Jane", "SECRET123", "20200101"
    ds.save_as(path)
    assert not any("SECRET123" in str(value) or "Doe" in str(value) for value in vars(read_header(path)).values())


def test_check_header_against():
    header = read_header_like(side="R", view="XCCL")
    check_header_against(header, "CC", "R", "x.dcm")  # XCCL is a CC-family view
    check_header_against(header, View.CC, Side.R, "x.dcm")  # vocabulary enums work too
    check_header_against(header, None, None, "x.dcm")
    check_header_against(read_header_like(side=None, view=None), "MLO", "L", "x.dcm")
    with pytest.raises(ImageReadError, match=r"x\.dcm: laterality conflict: DICOM .*says R, dataset says L"):
        check_header_against(header, "CC", "L", "x.dcm")
    with pytest.raises(ImageReadError, match=r"x\.dcm: view conflict"):
        check_header_against(header, "MLO", "R", "x.dcm")
    with pytest.raises(ImageReadError, match="dataset says L"):
        check_header_against(header, None, Side.L, "x.dcm")


def read_header_like(side, view):
    from tlese.data.io import ImageHeader

    return ImageHeader(view=view, side=side, modality="MG", photometric="MONOCHROME2", rows=1, cols=1,
                       bits_stored=16, source_format="dicom", view_source="ViewPosition", side_source="Laterality")


# ---------------------------------------------------------------------------------------------------------------
# PNG / JPEG / PGM


def test_png_16_bit_keeps_precision(tmp_path, pixels16):
    values = (pixels16.astype(np.uint32) * 16).astype(np.uint16)  # up to 65520
    Image.fromarray(values).save(tmp_path / "a.png")
    pixels, header = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels, values)
    assert header.bits_stored == 16 and header.source_format == "png"
    assert (header.view, header.side) == (None, None)


def test_png_8_bit_jpeg_pgm_and_rgb(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "a.pgm")
    Image.fromarray(gray).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    for name, tolerance in [("a.png", 0), ("a.pgm", 0), ("rgb.png", 1), ("a.jpg", 6)]:
        pixels, header = read_image(tmp_path / name)
        assert pixels.shape == gray.shape and pixels.dtype == np.float32, name
        assert np.abs(pixels - gray).max() <= tolerance, name
    assert read_header(tmp_path / "a.jpg").source_format == "jpeg"
    assert read_header(tmp_path / "a.pgm").source_format == "pgm"


def test_pgm_16_bit(tmp_path, pixels16):
    values = pixels16 * 10
    header = f"P5 {values.shape[1]} {values.shape[0]} 65535\n".encode()
    (tmp_path / "a.pgm").write_bytes(header + values.astype(">u2").tobytes())
    pixels, _ = read_image(tmp_path / "a.pgm")
    np.testing.assert_array_equal(pixels, values)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear ImageReadError naming the file


def test_truncated_dicom(tmp_path, pixels16):
    data = write_dicom(tmp_path / "full.dcm", pixels16).read_bytes()
    for cut in (len(data) // 2, 200):  # inside the pixel data; inside the header
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
        assert caught.value.path == str(path) and str(path) in str(caught.value)


def test_zero_byte_file(tmp_path):
    for name in ("empty.dcm", "empty.png"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ImageReadError, match=rf"{name}: empty file"):
            read_image(tmp_path / name)
        with pytest.raises(ImageReadError, match="empty file"):
            read_header(tmp_path / name)


def test_non_image_files(tmp_path):
    for name in ("notes.txt", "fake.png", "fake.dcm"):
        path = tmp_path / name
        path.write_text("patient list, not an image\n" * 20)
        with pytest.raises(ImageReadError, match=rf"{name}: (not a DICOM|cannot|unreadable|DICOM has no)") as caught:
            read_image(path)
        assert caught.value.path == str(path)


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: cannot decode image"):
        read_image(tmp_path / "cut.png")


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.dcm: file not found"):
        read_image(tmp_path / "nothere.dcm")


def test_transfer_syntax_without_decoder(tmp_path):
    from pydicom.encaps import encapsulate

    path = write_dicom(tmp_path / "mpeg.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no pixel decoder exists
    ds.PixelData = encapsulate([b"\x00" * 32])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"mpeg\.dcm: unsupported transfer syntax"):
        read_image(path)


def test_missing_decoder_plugin_is_named(tmp_path, pixels16, monkeypatch):
    from pydicom.pixels.decoders import RLELosslessDecoder

    from tlese.data import io

    def not_installed(*args):
        raise ImportError("no module named rle")

    path = write_dicom(tmp_path / "rle.dcm", pixels16, transfer_syntax=RLELossless)
    monkeypatch.setitem(io.FRAME_DECODERS, RLELossless, io.FrameDecoder("gone", "gone", not_installed))
    monkeypatch.setattr(type(RLELosslessDecoder), "is_available", property(lambda self: False), raising=False)
    if RLELosslessDecoder.is_available:
        pytest.skip("cannot simulate a missing decoder in this pydicom version")
    with pytest.raises(ImageReadError, match=r"rle\.dcm: cannot decode RLE Lossless: no decoder installed"):
        read_image(path)


# ---------------------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.shared_data
def test_every_mini_mias_image_loads(mias_dir):
    files = sorted((mias_dir / "images").glob("*.png"))
    assert len(files) == 256
    for path in files:
        pixels, header = read_image(path)
        assert pixels.shape == (1024, 1024) and header.bits_stored == 8, path.name
        assert 0 <= pixels.min() < pixels.max() <= 255, path.name


def _expected_from_cbis_name(path) -> tuple[str, str]:
    """Side and view from the CBIS-DDSM pseudonymous series name ("Mass-Test_P_..._LEFT_CC"), independent of the
    tags read_header uses (Laterality, PatientOrientation)."""
    name = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).PatientID)
    side_word, view = name.upper().split("_")[-2:]
    return {"LEFT": "L", "RIGHT": "R"}[side_word], view


@pytest.mark.shared_data
def test_cbis_ddsm_dicoms_load_with_right_view_and_side(cbis_dicoms):
    assert len(cbis_dicoms) == 8
    found = set()
    for path in cbis_dicoms:
        side, view = _expected_from_cbis_name(path)
        header = read_header(path)
        assert (header.side, header.view) == (side, view), path.name  # file name only: no IDs in logs
        pixels, full_header = read_image(path)
        assert full_header == header
        assert pixels.shape == (header.rows, header.cols) and pixels.dtype == np.float32, path.name
        assert pixels.max() > 255, path.name  # 16-bit range kept
        found.add((side, view))
    assert found == {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}


@pytest.mark.parametrize("transfer_syntax", [None, RLELossless], ids=["native", "rle"])
def test_values_beyond_bits_stored_are_refused_not_masked(tmp_path, pixels16, transfer_syntax):
    # pydicom would silently clear the bits above BitsStored, leaving a wrong image
    path = write_dicom(tmp_path / "b.dcm", pixels16, transfer_syntax=transfer_syntax)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 8, 7
    ds.save_as(path)
    largest = int(pixels16.max())
    with pytest.raises(ImageReadError, match=rf"b\.dcm: pixel values up to {largest} do not fit BitsStored 8 "
                                             r"\(largest valid value 255\)"):
        read_image(path)
    ds.BitsStored, ds.HighBit = 12, 11  # the true depth reads exactly
    ds.save_as(path)
    np.testing.assert_array_equal(read_image(path)[0], pixels16)


def test_header_keeps_only_a_hash_of_the_sop_instance_uid(tmp_path, pixels16):
    import hashlib

    path = write_dicom(tmp_path / "u.dcm", pixels16)
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    header = read_header(path)
    assert header.instance_hash == hashlib.sha256(uid.encode()).hexdigest()[:32]
    assert uid not in repr(header)
