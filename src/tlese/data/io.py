"""Read mammograms and chest X-rays: DICOM (compressed included) and PNG, JPEG, PGM.

`read_image(path)` returns float32 pixels in the stored intensity scale (modality rescale and VOI LUT / window
applied when present, MONOCHROME1 inverted so that bright = dense tissue, no 8-bit quantisation) and an
`ImageHeader`; `read_image(path, keep_integers=True)` returns the decoded integers themselves when there is nothing
to apply (what preprocessing needs: no float32 copy of a 13-Mpix mammogram). Compressed DICOM frames go through the
fastest bit-exact decoder per transfer syntax (`FRAME_DECODERS`: imagecodecs for RLE, JPEG-LS, JPEG 2000 and JPEG
lossless, chosen by benchmarks/bench_decode.py), everything else through pydicom's decoders. `read_header(path)`
gives the header without decoding pixels. Every failure is an `ImageReadError` naming the file and the problem,
truncated or corrupt compressed data included.

The header carries only technical tags (view, side, photometric, size, bits, ...), never patient identifiers; the
SOPInstanceUID is kept only as a hash (`instance_hash`), to recognise one image stored twice.

Sides and views are parsed by `tlese.vocab` (the one vocabulary): views are the upper-case DICOM view codes (`CC`,
`MLO`, `ML`, `LM`, `XCCL`, `XCCM`, `FB`, `LMO`, `SIO`, `CV`, ...), kept as written: an exaggerated CC (`XCCL`) is
*not* silently turned into `CC`, because it shows a different part of the breast; `view_family()` maps it to `CC`
where a caller wants the coarse family (used by `check_header_against`, so a dataset saying CC for an XCCL image is
not a conflict).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlese.vocab import Side, side_and_view_in_text, side_code, view_code, view_family

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "PPM": "pgm", "TIFF": "tiff", "BMP": "bmp"}


class ImageReadError(ValueError):
    """An image could not be read or contradicts the dataset; the message is "<path>: <problem>"."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageHeader:
    """Technical description of one image (never patient identifiers).

    `view` / `side` are None when the file does not say (always for PNG/JPEG/PGM). `view_source` / `side_source`
    name the tag they came from (e.g. "ImageLaterality"), for error messages.
    """

    view: str | None
    side: str | None
    modality: str | None
    photometric: str
    rows: int
    cols: int
    bits_stored: int
    source_format: str
    transfer_syntax: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    manufacturer_model: str | None = None
    view_source: str | None = None
    side_source: str | None = None
    instance_hash: str | None = None  # sha256 of the DICOM SOPInstanceUID (never the UID itself)


# ---------------------------------------------------------------------------------------------------------------
# Public readers


def read_header(path: str | Path) -> ImageHeader:
    """Read the header of a DICOM or PIL-readable image without decoding its pixels."""
    path = Path(path)
    image = _open_pil(path) if _sniff(path) == "pil" else None
    if image is None:
        return _dicom_header(_read_dicom(path, stop_before_pixels=True), path)
    with image:
        return _pil_header(image, path)


def read_header_and_tags(path: str | Path, keywords: tuple[str, ...]) -> tuple[ImageHeader, dict[str, str | None]]:
    """`read_header` plus the text of the DICOM attributes named by `keywords` (None when absent or not a DICOM),
    from one read of the file."""
    path = Path(path)
    image = _open_pil(path) if _sniff(path) == "pil" else None
    if image is not None:
        with image:
            return _pil_header(image, path), dict.fromkeys(keywords)
    ds = _read_dicom(path, stop_before_pixels=True)
    return _dicom_header(ds, path), {keyword: _text(ds.get(keyword)) for keyword in keywords}


def read_image(path: str | Path, keep_integers: bool = False) -> tuple[np.ndarray, ImageHeader]:
    """Read pixels as float32 (H, W), bright = dense, in the stored intensity scale, plus the header.

    keep_integers: return the decoded integer array itself (no float32 copy of the full image; it may be
    read-only) when nothing is to be applied to it: grayscale, not MONOCHROME1, no modality rescale / LUT and no
    VOI LUT / window. Otherwise, and for float images, the float32 array as above.
    """
    path = Path(path)
    image = _open_pil(path) if _sniff(path) == "pil" else None
    if image is None:
        ds = _read_dicom(path, stop_before_pixels=False)
        header = _dicom_header(ds, path)
        return _dicom_pixels(ds, header, path, keep_integers), header
    with image:
        header = _pil_header(image, path)
        return _pil_pixels(image, path, keep_integers), header


def check_header_against(
    header: ImageHeader, expected_view: str | None, expected_side: str | None, path: str | Path
) -> None:
    """Raise ImageReadError when the file's view or side contradicts the dataset's; None on either side passes."""
    if header.side is not None and expected_side is not None:
        expected = Side.parse(expected_side)  # str or vocab.Side
        if expected is not None and expected != header.side:
            raise ImageReadError(
                path,
                f"laterality conflict: DICOM {header.side_source or 'header'} says {header.side}, "
                f"dataset says {expected.value}",
            )
    if header.view is not None and expected_view is not None:
        expected = view_code(expected_view)
        if expected is not None and view_family(expected) != view_family(header.view):
            raise ImageReadError(
                path,
                f"view conflict: DICOM {header.view_source or 'header'} says {header.view}, dataset says {expected}",
            )


# ---------------------------------------------------------------------------------------------------------------
# Format detection


def _sniff(path: Path) -> str:
    """'dicom' or 'pil'; raises for missing, empty or unreadable files."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot access file ({error.strerror})") from None
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as error:
        raise ImageReadError(path, f"cannot read file ({error.strerror})") from None
    if head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return "pil"


# ---------------------------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(path: Path, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # PACS exports sometimes lack the 128-byte preamble; accept them only if they parse as an image.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        except Exception:
            ds = None
        if ds is None or "Rows" not in ds or "Columns" not in ds:
            raise ImageReadError(path, "not a DICOM file or a supported image (PNG, JPEG, PGM)") from None
    except EOFError:
        raise ImageReadError(path, "truncated DICOM (file ends inside the header)") from None
    except Exception as error:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM ({type(error).__name__}: {error})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(path, "DICOM has no image (Rows/Columns missing)")
    if not stop_before_pixels and "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no Pixel Data (truncated or not an image object)")
    return ds


def _dicom_header(ds, path: Path) -> ImageHeader:
    side, side_source = _dicom_side(ds)
    view, view_source = _dicom_view(ds)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        pixel_spacing = None
    transfer_syntax = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        transfer_syntax = str(meta.TransferSyntaxUID)
    model = ds.get("ManufacturerModelName")
    uid = _text(ds.get("SOPInstanceUID"))
    return ImageHeader(
        view=view,
        side=side,
        modality=_text(ds.get("Modality")),
        photometric=_text(ds.get("PhotometricInterpretation")) or "MONOCHROME2",
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16),
        source_format="dicom",
        transfer_syntax=transfer_syntax,
        pixel_spacing=pixel_spacing,
        manufacturer_model=_text(model),
        view_source=view_source,
        side_source=side_source,
        instance_hash=hashlib.sha256(uid.encode()).hexdigest()[:32] if uid else None,
    )


def _dicom_side(ds) -> tuple[str | None, str | None]:
    """Laterality: ImageLaterality, then Laterality, then free-text descriptions ("L CC", "RIGHT MLO", "RMLO")."""
    for keyword in ("ImageLaterality", "Laterality"):
        side = side_code(_text(ds.get(keyword)))
        if side is not None:
            return side, keyword
    for keyword in ("SeriesDescription", "ProtocolName", "ViewPosition"):
        side, _ = side_and_view_in_text(_text(ds.get(keyword)))
        if side is not None:
            return side, keyword
    return None, None


def _dicom_view(ds) -> tuple[str | None, str | None]:
    """View: ViewPosition, ViewCodeSequence, a view code in PatientOrientation (CBIS-DDSM puts it there), text."""
    view = view_code(_text(ds.get("ViewPosition")))
    if view is not None:
        return view, "ViewPosition"
    for item in ds.get("ViewCodeSequence") or []:
        view = view_code(str(item.get("CodeMeaning", "")))
        if view is not None:
            return view, "ViewCodeSequence"
    orientation = ds.get("PatientOrientation")
    if orientation is not None:
        values = [orientation] if isinstance(orientation, str) else list(orientation)
        if len(values) == 1:  # a real PatientOrientation has two values (row, column directions)
            view = view_code(str(values[0]))
            if view is not None:
                return view, "PatientOrientation"
    for keyword in ("SeriesDescription", "ProtocolName"):
        _, view = side_and_view_in_text(_text(ds.get(keyword)))
        if view is not None:
            return view, keyword
    return None, None


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _dicom_pixels(ds, header: ImageHeader, path: Path, keep_integers: bool = False) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames, e.g. tomosynthesis) is not supported")
    raw = _decode(ds, path)
    if raw.ndim == 3:  # colour (secondary capture): luminance, pydicom already converted YBR to RGB
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        photometric = "RGB"
    else:
        photometric = header.photometric
    if raw.ndim != 2:
        raise ImageReadError(path, f"unexpected pixel array shape {raw.shape}")
    if keep_integers and photometric == "MONOCHROME2" and raw.dtype.kind in "ui" and not _has_luts(ds):
        return raw
    pixels = _apply_luts(raw, ds, path)
    if photometric == "MONOCHROME1":
        # Invert within the observed range so values stay in the same scale; bright = dense afterwards.
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (high + low) - pixels
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _decode(ds, path: Path) -> np.ndarray:
    """The stored pixel values: through this syntax's entry of FRAME_DECODERS when it applies, else pydicom."""
    from pydicom.pixels import get_decoder, pixel_array

    uid = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    plugin = ""
    if uid is not None and uid.is_compressed:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise ImageReadError(path, f"unsupported transfer syntax {uid.name} ({uid}): no decoder exists") from None
        fast = FRAME_DECODERS.get(str(uid))
        if fast is not None or uid in _MARKER_ENDED:
            frame = _single_frame(ds.PixelData, path)
            if uid in _MARKER_ENDED:
                _check_end_marker(frame, uid, path)
        if fast is not None:
            raw = fast.decode(frame, ds, path)
            if raw is not None:
                _check_bits_stored(raw, ds, path)
                return raw
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "no plugin"
            raise ImageReadError(path, f"cannot decode {uid.name}: no decoder installed ({missing})")
        if "pylibjpeg" in decoder.available_plugins:
            plugin = "pylibjpeg"
    unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
    # pydicom clears the bits above BitsStored by default, which turns 12-bit data labelled BitsStored 8 into a
    # wrong image without a word; keep them (unsigned data only: signed data needs the sign extension) and check.
    options = {"correct_unused_bits": False} if unsigned else {}
    try:
        raw = pixel_array(ds, decoding_plugin=plugin, **options)
    except ImageReadError:
        raise
    except BaseException as error:  # decoders raise ValueError/RuntimeError/... (a Rust one panics) for bad data
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise ImageReadError(path, f"cannot decode pixel data (truncated or corrupt?): {_reason(error)}") from None
    if unsigned:
        _check_bits_stored(raw, ds, path)
    return raw


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:400] or type(error).__name__


def _check_bits_stored(raw: np.ndarray, ds, path: Path) -> None:
    """Refuse unsigned pixel values that do not fit in BitsStored: the header's bit depth is wrong."""
    bits = int(ds.get("BitsStored") or 0)
    if not bits or raw.dtype.kind != "u" or bits >= raw.dtype.itemsize * 8:
        return
    largest = int(raw.max())
    if largest > 2**bits - 1:
        raise ImageReadError(path, f"pixel values up to {largest} do not fit BitsStored {bits} (largest valid value "
                                   f"{2**bits - 1}): the header's bit depth is wrong")


# ---------------------------------------------------------------------------------------------------------------
# Compressed frames: the fastest bit-exact decoder per transfer syntax, imagecodecs for all four measured. Median CPU
# ms per 13-Mpix CBIS-DDSM image (benchmarks/results/decode.md): RLE 15.5 (pylibjpeg-rle 28), JPEG-LS 127 and JPEG
# lossless 67 (pylibjpeg-libjpeg 497 and 311, and it decodes a truncated frame without a word), JPEG 2000 1064
# (pylibjpeg-openjpeg 1090; both are OpenJPEG). The frame is passed as a memoryview: no copy.

_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
# JPEG, JPEG-LS and JPEG 2000 codestreams end with the marker FF D9 (EOI / EOC); decoders of the JPEG family fill
# a truncated stream's missing rows silently, so its absence is checked before decoding.
_MARKER_ENDED = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                           "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


def _single_frame(pixel_data: bytes, path: Path) -> memoryview | bytes:
    """The one frame of single-frame encapsulated Pixel Data, without copying it when it is one fragment."""
    view = memoryview(pixel_data)
    fragments, position = [], 0
    while position + 8 <= len(view):
        tag, length = bytes(view[position: position + 4]), int.from_bytes(view[position + 4: position + 8], "little")
        position += 8
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM:
            raise ImageReadError(path, f"corrupt encapsulated pixel data (no item tag at byte {position - 8})")
        if position + length > len(view):
            raise ImageReadError(path, "encapsulated pixel data ends inside a fragment (truncated file?)")
        fragments.append(view[position: position + length])
        position += length
    if len(fragments) < 2:  # the first item is the Basic Offset Table
        raise ImageReadError(path, "encapsulated pixel data holds no frame (truncated file?)")
    return fragments[1] if len(fragments) == 2 else b"".join(fragments[1:])


def _check_end_marker(frame: memoryview | bytes, uid, path: Path) -> None:
    if bytes(frame[:12]) == b"\x00\x00\x00\x0cjP  \r\n\x87\n":  # JP2 file format: boxes may follow the codestream
        return
    # Within the last 16 bytes: odd-length fragments carry a padding byte, some writers add a few more. FF D9
    # cannot occur inside entropy-coded data (byte stuffing), so a cut stream never passes.
    if b"\xff\xd9" not in bytes(frame[-16:]):
        raise ImageReadError(path, f"{uid.name} frame has no end-of-image marker (FF D9): the pixel data is "
                                   "truncated or corrupt")


@dataclass(frozen=True)
class FrameDecoder:
    """How one transfer syntax's frames are decoded: `function(frame, rows, cols, bits_allocated)` returns the
    pixels (any shape with rows x cols values); it applies to single-sample unsigned 8- or 16-bit images."""

    name: str
    package: str
    function: Callable[[memoryview | bytes, int, int, int], np.ndarray]

    def describe(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{self.name} ({self.package} {version(self.package)})"
        except PackageNotFoundError:
            return f"{self.name} ({self.package} not installed: pydicom's decoders instead)"

    def decode(self, frame: memoryview | bytes, ds, path: Path) -> np.ndarray | None:
        """The frame's pixels (rows, cols), None when this decoder does not apply or is not installed; a frame
        that fails to decode, or decodes to the wrong size, raises ImageReadError."""
        bits = int(ds.get("BitsAllocated", 0) or 0)
        if (int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0) != 0
                or bits not in (8, 16)):
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        try:
            pixels = np.asarray(self.function(frame, rows, cols, bits))
        except ImportError:
            return None
        except BaseException as error:  # a Rust decoder panics with a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise ImageReadError(path, f"cannot decode {ds.file_meta.TransferSyntaxUID.name} pixel data (truncated "
                                       f"or corrupt?): {_reason(error)}") from None
        if pixels.size != rows * cols:
            raise ImageReadError(path, f"pixel data decodes to {pixels.size} values, expected {rows} x {cols} "
                                       "(truncated or corrupt?)")
        expected = np.dtype(np.uint16 if bits == 16 else np.uint8)
        if pixels.dtype.kind != "u":  # a codestream that disagrees with the header's sign: pydicom reconciles them
            return None
        if pixels.dtype.itemsize > expected.itemsize:
            raise ImageReadError(path, f"pixel data decodes to {pixels.dtype} values, more than BitsAllocated {bits}")
        return pixels.reshape(rows, cols).astype(expected, copy=False)


def _rle_imagecodecs(frame: memoryview | bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    from imagecodecs import dicomrle_decode

    dtype = "<u2" if bits == 16 else np.uint8
    return np.frombuffer(dicomrle_decode(frame, dtype), dtype=dtype)


def _imagecodecs(name: str) -> Callable[[memoryview | bytes, int, int, int], np.ndarray]:
    def decode(frame: memoryview | bytes, rows: int, cols: int, bits: int) -> np.ndarray:
        import imagecodecs

        return getattr(imagecodecs, name)(frame)

    return decode


# Transfer syntax UID -> decoder; syntaxes not listed (and images a decoder does not apply to) go through pydicom.
# The lossy variants (.57 any predictor, .81 near-lossless, .91) use the same codec as their lossless twins.
_RLE = FrameDecoder("imagecodecs.dicomrle_decode", "imagecodecs", _rle_imagecodecs)
_JPEG_LS = FrameDecoder("imagecodecs.jpegls_decode", "imagecodecs", _imagecodecs("jpegls_decode"))
_JPEG_2000 = FrameDecoder("imagecodecs.jpeg2k_decode", "imagecodecs", _imagecodecs("jpeg2k_decode"))
_JPEG_LOSSLESS = FrameDecoder("imagecodecs.jpeg8_decode", "imagecodecs", _imagecodecs("jpeg8_decode"))
FRAME_DECODERS: dict[str, FrameDecoder] = {
    "1.2.840.10008.1.2.5": _RLE,  # RLE Lossless
    "1.2.840.10008.1.2.4.80": _JPEG_LS,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG_LS,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _JPEG_2000,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _JPEG_2000,  # JPEG 2000 (lossless or lossy)
    "1.2.840.10008.1.2.4.70": _JPEG_LOSSLESS,  # JPEG Lossless, process 14, selection value 1
    "1.2.840.10008.1.2.4.57": _JPEG_LOSSLESS,  # JPEG Lossless, process 14, any predictor
}


def _has_luts(ds) -> bool:
    """Whether the header asks for a modality rescale / LUT or a VOI LUT / window (what `_apply_luts` applies)."""
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        return True
    try:
        return float(ds.get("RescaleSlope", 1) or 1) != 1.0 or float(ds.get("RescaleIntercept", 0) or 0) != 0.0
    except (TypeError, ValueError):
        return True  # let _apply_luts report the invalid tags


def _apply_luts(raw: np.ndarray, ds, path: Path) -> np.ndarray:
    """Modality rescale / LUT, then VOI LUT or window, in float32 (skipped when the tags are absent)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        if "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(raw, ds).astype(np.float32)
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            pixels = raw.astype(np.float32)
            if slope != 1.0 or intercept != 0.0:
                pixels = pixels * np.float32(slope) + np.float32(intercept)
        if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
            pixels = apply_voi_lut(pixels, ds, index=0, prefer_lut=True).astype(np.float32)
    except Exception as error:
        raise ImageReadError(path, f"invalid modality/VOI LUT tags ({type(error).__name__}: {error})") from None
    return pixels


# ---------------------------------------------------------------------------------------------------------------
# PNG / JPEG / PGM (PIL)

_PIL_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "I;16": 16, "I;16B": 16,
             "I;16L": 16, "I;16N": 16, "I": 16, "F": 32}


def _open_pil(path: Path):
    """An open PIL image, or None when PIL does not know the format (the caller then tries DICOM)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        return None  # maybe a DICOM without preamble and without a .dcm suffix
    except OSError as error:
        raise ImageReadError(path, f"cannot open image ({error})") from None


def _pil_header(image, path: Path) -> ImageHeader:
    cols, rows = image.size
    photometric = "RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK") else "MONOCHROME2"
    return ImageHeader(
        view=None,
        side=None,
        modality=None,
        photometric=photometric,
        rows=int(rows),
        cols=int(cols),
        bits_stored=_PIL_BITS.get(image.mode, 8),
        source_format=PIL_FORMATS.get(image.format or "", (image.format or "image").lower()),
    )


def _pil_pixels(image, path: Path, keep_integers: bool = False) -> np.ndarray:
    try:
        image.load()
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F", "L"):
            array = np.asarray(image)  # 16-bit modes stay 16-bit (no conversion through 8-bit "L")
        elif mode == "LA":
            array = np.asarray(image)[..., 0]
        else:  # RGB, RGBA, P, CMYK, 1: ITU-R 601 luminance through PIL
            array = np.asarray(image.convert("L"))
    except OSError as error:  # PIL's message for truncated files: "image file is truncated ..."
        raise ImageReadError(path, f"cannot decode image (truncated or corrupt?): {error}") from None
    if array.ndim != 2:
        raise ImageReadError(path, f"unexpected pixel array shape {array.shape} (mode {image.mode})")
    if keep_integers and array.dtype.kind in "ui":
        return array
    return np.ascontiguousarray(array, dtype=np.float32)
