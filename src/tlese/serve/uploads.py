"""Uploads for `tlese serve`: the request limits, a streaming multipart reader that writes into the request's own
folder, and the checks every uploaded file passes before `predict` sees it.

Every check reads headers only: content is sniffed from the first bytes (`DICM` at byte 128 followed by a plausible
file meta group, or a bare DICOM data set that starts plausibly: `tlese.predict.inputs.looks_like_bare_dicom`; PNG /
JPEG / zip magic), never taken from the file name or the declared content type, and before any parser runs (a body
of zeros is refused from its first bytes); image sizes come from the DICOM
Rows / Columns / NumberOfFrames or the PNG / JPEG header before anything is decoded (decompression bombs); a DICOM's
pixel data must be complete (a truncated transfer is the sender's to repeat). Zip archives are opened with
`tlese.predict.inputs.safe_extract_zip` (no traversal, links, bombs) and their members checked like uploads.

A bad upload is a `ServiceError` (an HTTP 4xx status, a short code and a message naming the upload by the name it
was given, never by a header value). Members of a zip that are no image at all (a DICOMDIR, a text file) are not an
error: they are listed as refused inputs, as `tlese predict` lists them in a folder.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from tlese.predict.inputs import UnsafeArchiveError, looks_like_bare_dicom, safe_extract_zip
from tlese.serve.limits import Limits
from tlese.vocab import Side, view_code

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0: the end of encapsulated pixel data
SUFFIXES = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg", "zip": ".zip"}
MAX_FIELD_BYTES = 1024
MAX_NAME = 120
FIELDS = ("side", "view", "heatmaps", "sr")
CHUNK = 2**20


class ServiceError(Exception):
    """A request answered with an HTTP error: `status` (4xx / 5xx), a short `code` and a plain-words `detail`."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class RequestDeadline(Exception):
    """The request's deadline (from its first byte) passed while its body was still being awaited."""


def storage_error(error: OSError) -> ServiceError:
    """A server-side storage fault as the client's answer: 507 for a full disk or quota, 503 otherwise (never a 4xx:
    the upload was not at fault)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(507, "insufficient_storage", "the service has no room left for the upload (its disk is "
                            "full); the upload was fine: try again later and tell the service's operator")
    return ServiceError(503, "storage_unavailable", "the service cannot store the upload right now "
                        f"({errno.errorcode.get(error.errno or 0, 'I/O error')}); try again later")


@dataclass
class Upload:
    """One uploaded file as received: its position among the files, the name it was given (display only, never a
    path), where it was written and its size."""

    index: int
    name: str
    path: Path
    size: int


@dataclass
class Form:
    files: list[Upload] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)

    def flag(self, name: str) -> bool | None:
        """A checkbox-like field: None when absent, else whether its last value is true-ish."""
        values = self.fields.get(name)
        if not values:
            return None
        value = values[-1].strip().lower()
        if value in ("1", "true", "on", "yes"):
            return True
        if value in ("", "0", "false", "off", "no"):
            return False
        raise ServiceError(400, "bad_field", f"form field {name!r} must be true or false")


@dataclass
class Prepared:
    """What goes to `predict`: its inputs (DICOM paths and at most one manifest CSV), the display label of every
    path, the images by path, and the zip members refused here."""

    inputs: list[Path]
    labels: dict[str, str]
    images: list[Path]
    refused: list[dict]


# ---------------------------------------------------------------------------------------------------------------
# Receiving: multipart/form-data streamed into the request folder, counted as it comes


def display_name(raw: str | None, index: int) -> str:
    """An upload's name fit to show: its last path component, printable characters only, at most MAX_NAME."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 3] + "..."
    return name or f"file {index + 1}"


async def receive_form(request, folder: Path, limits: Limits, deadline: float) -> Form:
    """Stream the multipart body of `request` into `folder` (one file per uploaded file, named by its position):
    413 past `max_upload_bytes` (the Content-Length first, then the bytes as they arrive) or `max_files`, 408 past
    `deadline` (time.monotonic()), 400 / 415 for a body that is not multipart/form-data."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ServiceError(415, "not_multipart", "send the images as multipart/form-data, each in a field 'files'")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ServiceError(400, "bad_length", "the Content-Length header is not a number") from None
        if declared_bytes > limits.max_upload_bytes:
            raise ServiceError(413, "upload_too_large", f"the upload is {_mb(declared_bytes)}, over the limit of "
                               f"{_mb(limits.max_upload_bytes)} per request")
    form = Form()
    part: dict = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].decode("latin-1").strip().lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        disposition, params = parse_options_header(part["headers"].get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise ServiceError(400, "bad_multipart", "a part of the form has no field name")
        filename = params.get(b"filename")
        part["name"] = name
        if filename is not None:
            if name != "files":
                raise ServiceError(400, "bad_field", f"files go in the field 'files', not {name!r}")
            index = len(form.files)
            if index >= limits.max_files:
                raise ServiceError(413, "too_many_files", f"more than {limits.max_files} files in one request (the "
                                   "limit); send one exam at a time")
            path = folder / f"{index:03d}.upload"
            part["upload"] = Upload(index, display_name(filename.decode("utf-8", "replace"), index), path, 0)
            part["handle"] = open(path, "xb")  # noqa: SIM115 - closed in on_part_end or below on error
        else:
            if name not in FIELDS:
                raise ServiceError(400, "bad_field", f"unknown form field {name!r} (expected files, "
                                   f"{', '.join(FIELDS)})")
            if sum(len(values) for values in form.fields.values()) > 2 * limits.max_files + len(FIELDS):
                raise ServiceError(400, "too_many_fields", "too many form fields")
            part["data"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if "handle" in part:
            part["handle"].write(memoryview(data)[start:end])
            part["upload"].size += end - start
        else:
            part["data"] += data[start:end]
            if len(part["data"]) > MAX_FIELD_BYTES:
                raise ServiceError(400, "bad_field", f"form field {part['name']!r} is too long")

    def on_part_end() -> None:
        if "handle" in part:
            part.pop("handle").close()
            form.files.append(part["upload"])
        else:
            form.fields.setdefault(part["name"], []).append(part["data"].decode("utf-8", "replace"))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_upload_bytes:
                raise ServiceError(413, "upload_too_large", f"the upload is over the limit of "
                                   f"{_mb(limits.max_upload_bytes)} per request")
            if time.monotonic() > deadline:
                raise ServiceError(408, "upload_timeout", "the upload took longer than the request timeout of "
                                   f"{limits.request_timeout_s:g} s")
            try:
                parser.write(chunk)
            except ServiceError:
                raise
            except OSError as error:  # writing the upload: a full disk is the server's fault
                raise storage_error(error) from None
            except Exception:  # python-multipart's parse errors
                raise ServiceError(400, "bad_multipart", "the form data is malformed") from None
        try:
            parser.finalize()
        except Exception:
            raise ServiceError(400, "bad_multipart", "the form data is malformed or incomplete") from None
    except RequestDeadline:
        raise ServiceError(408, "upload_timeout", "the upload stalled: no complete body within the request timeout "
                           f"of {limits.request_timeout_s:g} s; the connection is closed") from None
    finally:
        handle = part.pop("handle", None)
        if handle is not None:
            try:
                handle.close()
            except OSError:  # the flush of a full disk: answered above
                pass
    if not form.files:
        raise ServiceError(400, "no_files", "no file uploaded: send the exam's images in the field 'files'")
    return form


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size} bytes"


# ---------------------------------------------------------------------------------------------------------------
# Checking: sniff, bound, extract; then the inputs `predict` takes


def sniff(path: Path) -> str | None:
    """'dicom', 'png', 'jpeg' or 'zip' from the file's first 4 KB alone (no parser runs): a DICOM has `DICM` at byte
    128 followed by plausible file meta elements, or starts as a plausible bare data set (`looks_like_bare_dicom`);
    else None."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head[128:132] == b"DICM":
        return "dicom" if looks_like_bare_dicom(head[132:]) else None
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if looks_like_bare_dicom(head):
        return "dicom"
    return None


def check_dicom(path: Path, name: str, limits: Limits) -> str | None:
    """None for a DICOM image within the limits with complete pixel data; a reason for a DICOM object that is no
    image (DICOMDIR, SR, ...); ServiceError 413 for an image over `max_pixels`, 422 for an unreadable header or
    incomplete pixel data. Reads the header, and the pixel data's bytes only when its end is not plain."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        raise ServiceError(422, "unreadable_dicom", f"{name}: the DICOM header cannot be read (damaged?)") from None
    if "Rows" not in ds or "Columns" not in ds:
        return "DICOM object without an image (no Rows / Columns), e.g. a DICOMDIR or a report"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except (TypeError, ValueError):
        raise ServiceError(422, "unreadable_dicom", f"{name}: the DICOM image size fields are not numbers") from None
    check_pixels(rows, cols, name, limits, frames=frames * samples)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None  # none in a bare DICOM: native pixels
    encapsulated = bool(syntax) and pydicom.uid.UID(str(syntax)).is_encapsulated
    if encapsulated:
        with open(path, "rb") as handle:
            handle.seek(-len(SEQUENCE_DELIMITER), 2)
            if handle.read() == SEQUENCE_DELIMITER:
                return None  # pixel data ends where it says: the usual layout, no need to read it all
    truncated = ServiceError(422, "truncated_dicom", f"{name}: truncated DICOM: the header reads but the pixel data "
                             "is cut short or missing; send the file again")
    try:
        full = pydicom.dcmread(path, force=True)
        data = full.get("PixelData")
    except Exception:
        raise truncated from None
    if data is None:
        raise truncated
    if encapsulated:
        from pydicom.encaps import generate_fragments

        try:
            fragments = sum(1 for _ in generate_fragments(data))
        except Exception:
            raise truncated from None
        if fragments < 2:  # the basic offset table, then at least one fragment of a frame
            raise truncated
    elif len(data) < rows * cols * frames * samples * max(bits, 1) // 8:
        raise truncated
    return None


def check_pixels(rows: int, cols: int, name: str, limits: Limits, frames: int = 1) -> None:
    if rows <= 0 or cols <= 0:
        raise ServiceError(422, "bad_image", f"{name}: the header declares an empty image ({rows} x {cols})")
    if rows * cols * frames > limits.max_pixels:
        extra = f" x {frames} frames/samples" if frames > 1 else ""
        raise ServiceError(413, "image_too_large", f"{name}: the header declares a {cols} x {rows}{extra} pixel "
                           f"image, over the limit of {limits.max_pixels:,} pixels; it was not decoded")


def check_picture(path: Path, kind: str, name: str, limits: Limits) -> None:
    """A PNG / JPEG within the pixel limit whose header reads (PNG: its chunks check out). The PNG size comes from
    its IHDR before PIL opens it (PIL refuses huge images with its own error, whose text says less)."""
    from PIL import Image

    if kind == "png":
        with open(path, "rb") as handle:
            head = handle.read(33)
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ServiceError(422, "bad_image", f"{name}: a PNG without a valid header")
        width, height = struct.unpack(">II", head[16:24])
        check_pixels(height, width, name, limits)
    try:
        with Image.open(path) as image:
            width, height = image.size
            check_pixels(height, width, name, limits)
            if kind == "png":
                image.verify()  # chunk checksums, no decoding
    except ServiceError:
        raise
    except Image.DecompressionBombError:
        raise ServiceError(413, "image_too_large", f"{name}: the header declares an image over the limit of "
                           f"{limits.max_pixels:,} pixels; it was not decoded") from None
    except Exception:
        raise ServiceError(422, "bad_image", f"{name}: the {kind.upper()} image cannot be read (damaged or "
                           "truncated?)") from None


def _side_and_view(form: Form, upload: Upload) -> tuple[str, str]:
    sides, views = form.fields.get("side", []), form.fields.get("view", [])
    side_text = sides[upload.index].strip() if upload.index < len(sides) else ""
    view_text = views[upload.index].strip() if upload.index < len(views) else ""
    try:
        side = Side.parse(side_text, strict=True).value if side_text else None
    except ValueError:
        side = None
    view = view_code(view_text) if view_text else None
    if side is None or view not in ("CC", "MLO"):
        raise ServiceError(400, "side_view_needed", f"{upload.name}: a PNG / JPEG image needs its side (L or R) and "
                           "view (CC or MLO) in the form; DICOM files carry theirs in the header")
    return side, view


def prepare_inputs(form: Form, folder: Path, limits: Limits) -> Prepared:
    """Check every upload (in order) and lay out what `predict` takes under `folder`: DICOM files as they are, zip
    archives extracted (their members checked the same way), PNG / JPEG images listed in a manifest CSV with the
    side and view the form gives them. Raises ServiceError for the first bad upload."""
    for key in ("side", "view"):
        given = form.fields.get(key, [])
        if given and len(given) != len(form.files):
            raise ServiceError(400, "side_view_count", f"{len(given)} '{key}' values for {len(form.files)} files: give "
                               "one per file, in the order of the files (empty for DICOM and zip files)")
    dicoms: list[Path] = []
    pictures: list[tuple[Path, str, str, str]] = []
    labels: dict[str, str] = {}
    refused: list[dict] = []
    members_total = unzipped = 0
    for upload in form.files:
        if upload.size == 0:
            raise ServiceError(400, "empty_file", f"{upload.name}: empty file (0 bytes)")
        kind = sniff(upload.path)
        if kind is None:
            raise ServiceError(415, "unsupported_content", f"{upload.name}: not a DICOM, PNG, JPEG or zip file (its "
                               "content was checked, not its name or declared type)")
        target = upload.path.with_suffix(SUFFIXES[kind])
        upload.path.rename(target)
        upload.path = target
        if kind == "dicom":
            why = check_dicom(target, upload.name, limits)
            if why is not None:
                raise ServiceError(422, "not_an_image", f"{upload.name}: {why}")
            dicoms.append(target)
            labels[str(target)] = upload.name
        elif kind in ("png", "jpeg"):
            check_picture(target, kind, upload.name, limits)
            side, view = _side_and_view(form, upload)
            pictures.append((target, side, view, upload.name))
            labels[str(target)] = upload.name
        else:
            members = _extract(upload, folder / f"zip_{upload.index:03d}", limits, len(form.files) + members_total,
                               unzipped)
            members_total += len(members)
            unzipped += sum(path.stat().st_size for _, path in members)
            for number, (member, path) in enumerate(members, 1):
                label = f"{upload.name}, member {number} ({display_name(member, number - 1)})"
                member_kind = sniff(path) if path.stat().st_size else None
                why = None
                if member_kind == "dicom":
                    why = check_dicom(path, label, limits)
                elif member_kind in ("png", "jpeg"):
                    why = "PNG / JPEG inside a zip: side and view unknown (upload it as a file, with its side and view)"
                elif member_kind == "zip":
                    why = "zip archive inside a zip: not opened"
                else:
                    why = "not a DICOM image" if path.stat().st_size else "empty file (0 bytes)"
                if why is not None:
                    refused.append({"input": label, "reason": why})
                    continue
                dicoms.append(path)
                labels[str(path)] = label
    inputs = list(dicoms)
    if pictures:
        inputs.append(_manifest(folder, pictures, labels))
    return Prepared(inputs=inputs, labels=labels, images=dicoms + [p[0] for p in pictures], refused=refused)


def _extract(upload: Upload, dest: Path, limits: Limits, files_so_far: int, unzipped_so_far: int
             ) -> list[tuple[str, Path]]:
    allowed = limits.max_files - files_so_far + 1  # its members take the place of the zip itself
    try:
        return safe_extract_zip(upload.path, dest, max_bytes=max(limits.max_unzipped_bytes - unzipped_so_far, 0),
                                max_members=max(allowed, 0))
    except UnsafeArchiveError as error:
        text = str(error)
        # size limits and bombs are "too large" (413); traversal, links, corruption are a bad request (400)
        status, code = ((413, "zip_too_large") if any(word in text for word in ("limit", "zip bomb", "larger than"))
                        else (400, "unsafe_zip"))
        raise ServiceError(status, code, f"{upload.name}: zip refused, nothing used from it: {text}") from None


def _manifest(folder: Path, pictures: list[tuple[Path, str, str, str]], labels: dict[str, str]) -> Path:
    """The manifest CSV for the PNG / JPEG uploads: one exam whose patient is a digest of the images' bytes (no
    identifier; the same images give the same exam key)."""
    digest = hashlib.sha256()
    for path in sorted(_sha256(path) for path, *_ in pictures):
        digest.update(path.encode())
    patient = f"upload-{digest.hexdigest()[:16]}"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient", "side", "view", "path"])
    for path, side, view, _ in pictures:
        writer.writerow([patient, side, view, path.name])
    manifest = folder / "images.csv"
    manifest.write_text(buffer.getvalue())
    labels[str(manifest)] = "the form's side and view"
    return manifest


def _sha256(path: Path) -> str:
    from tlese.files import sha256_file

    return sha256_file(path)


__all__ = ["Form", "Limits", "Prepared", "RequestDeadline", "ServiceError", "Upload", "check_dicom", "check_picture",
           "prepare_inputs", "receive_form", "sniff", "storage_error"]
