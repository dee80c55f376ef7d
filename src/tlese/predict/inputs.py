"""Collect prediction inputs and group them into breasts (patient + study + side), each with its CC and MLO image.

An input is a DICOM file, a folder (recursive, symlinked folders followed), a zip archive (extracted into a
temporary folder with every member checked first: no absolute or `..` paths, no links, member count and total size
bounded) or a manifest CSV (columns patient, side, view, path; paths relative to the CSV) for PNG / JPEG images.

Sides and views come from the DICOM header (`tlese.data.io.read_header_and_tags`: ImageLaterality / Laterality,
ViewPosition / ViewCodeSequence / PatientOrientation, parsed by `tlese.vocab`), or from the manifest, never from file
names. Breasts are grouped by patient, exam and side: (PatientID, StudyInstanceUID, side) normally; a PatientID
that follows the CBIS-DDSM case pattern (`Mass-Test_P_00173_LEFT_CC`, where each view is a study of its own) groups
by the CBIS patient (P_00173) and side, by the data layer's CBIS rule; a manifest row by its patient and side.

Identity conflicts are never resolved by a choice: a StudyInstanceUID under two patients, or one image (the same
SOPInstanceUID, or the same bytes) under two patients, marks every breast involved with a `conflicts` reason (naming
the inputs by their labels, never the identifiers); predict refuses those breasts. The same image given twice for
one patient is used once (a note).

Labels (how an input is named in every output) are relative: the path inside a folder given, the file name of a file
given, `archive.zip!member`, `manifest.csv:3 (images/a.png)`; or relative to `label_root` when the file lies under it.
Never an absolute path: folder names above the inputs may carry identifiers.

A file is sniffed before any parser sees it (`sniff_image`): a `.dcm` (or extension-less DICOM) must carry `DICM` at
byte 128 or start like a DICOM data set (a few plausible elements in ascending order); a zero-filled or garbage file
is refused from its first bytes, not decoded.

Nothing here prints, logs or puts into a reason any header value: identifying values are kept on the records only
to build pseudonymous keys and the opt-in link file, and are scrubbed from every reason (`safe_reason`).
"""

from __future__ import annotations

import csv
import errno
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tlese.data.datasets import cbis_ddsm, walk_files
from tlese.data.io import ImageHeader, ImageReadError, read_header_and_tags
from tlese.files import sha256_file
from tlese.vocab import Side, View, view_code

# DICOM attributes read besides the technical header. The identifying ones never leave this module's records.
TAGS = ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "SOPInstanceUID",
        "SOPClassUID", "PresentationIntentType", "SeriesDescription", "OtherPatientIDs", "IssuerOfPatientID")
IDENTIFYING_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                    "SOPInstanceUID", "OtherPatientIDs", "IssuerOfPatientID")
MANIFEST_COLUMNS = ("patient", "side", "view", "path")
# Zip limits: members, total uncompressed bytes, and the largest compression ratio of one member (zip bombs).
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_BYTES = 64 * 2**30
MAX_ZIP_RATIO = 200.0
_CHUNK = 2**20


class UnsafeArchiveError(ValueError):
    """A zip archive refused before anything was extracted (or while extracting, for a size limit)."""


@dataclass(frozen=True)
class ImageInput:
    """One readable image file and what its header (or manifest row) says. `label` names it to the user (the path as
    given, `archive.zip!member` inside a zip); `path` is where it is read (a temporary folder for zip members).

    `group` is the identifying exam grouping ("study" StudyInstanceUID | "cbis" patient | "manifest" patient, value);
    it and `tags` never reach an output other than the opt-in link file.
    """

    path: Path
    label: str
    source: str  # "dicom" | "manifest"
    header: ImageHeader
    side: str | None
    view: str | None
    sha256: str
    group: tuple[str, str] | None
    tags: dict[str, str | None] = field(default_factory=dict, repr=False)
    problems: tuple[str, ...] = ()  # why this image cannot be used (from the header alone)
    expected_side: str | None = None  # the manifest's side, checked against the header by prepare_file
    expected_view: str | None = None
    patient: str = ""  # identifying: the PatientID (+ issuer), the CBIS patient or the manifest's patient

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Identifying values of this image (to scrub from any text)."""
        return tuple(value for key in IDENTIFYING_TAGS if (value := self.tags.get(key)))

    @property
    def study_uid(self) -> str | None:
        return self.tags.get("StudyInstanceUID")


@dataclass(frozen=True)
class RefusedInput:
    """An input that gives no image of any breast (not an image, unsafe archive, no laterality, ...)."""

    label: str
    reason: str

    def to_dict(self) -> dict:
        return {"input": self.label, "reason": self.reason}


@dataclass
class Breast:
    """The images of one breast of one exam. `group` + `side` identify it (never output); `images` in input order."""

    group: tuple[str, str]
    side: str
    images: list[ImageInput]
    notes: list[str] = field(default_factory=list)  # e.g. the same image given twice
    patient: str = ""  # identifying (see ImageInput.patient)
    conflicts: list[str] = field(default_factory=list)  # identity conflicts: the breast must be refused

    @property
    def key_material(self) -> str:
        """The text the pseudonymous exam key is a salted hash of: StudyInstanceUID + side (or the manifest's / CBIS
        patient + side); a breast in an identity conflict adds its patient (two patients' breasts never share a key)."""
        kind, value = self.group
        base = f"{value}|{self.side}" if kind == "study" else f"{kind}:{value}|{self.side}"
        return f"{base}|patient:{self.patient}" if self.conflicts else base

    def candidates(self, view: View) -> list[ImageInput]:
        """The images of `view` (exactly CC or MLO: an XCCL is not a CC), input order."""
        return [image for image in self.images if image.view == view.value]

    @property
    def identifiers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value for image in self.images for value in image.identifiers))


@dataclass
class InputSet:
    """Breasts and refused inputs; a context manager that removes the folder zip members were extracted to."""

    breasts: list[Breast]
    refused: list[RefusedInput]
    images: list[ImageInput]
    _tempdirs: list[tempfile.TemporaryDirectory] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for folder in self._tempdirs:
            folder.cleanup()
        self._tempdirs.clear()

    def __enter__(self) -> InputSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def collect_inputs(inputs: Sequence[str | Path], *, max_zip_bytes: int = MAX_ZIP_BYTES,
                   max_zip_members: int = MAX_ZIP_MEMBERS, label_root: str | Path | None = None) -> InputSet:
    """Every image of `inputs` read (headers only), checked and grouped into breasts; every input that gives no
    image listed with its reason. Use as a context manager (zip members live in a temporary folder until closed).
    label_root: files under it are labelled by their path relative to it (see the module's note on labels)."""
    root = Path(label_root).resolve() if label_root is not None else None

    def name(path: Path, folder: Path | None = None) -> str:
        """The relative label of `path` (inside `folder` when it was reached through a folder given)."""
        if root is not None and path.resolve().is_relative_to(root):
            return path.resolve().relative_to(root).as_posix()
        if folder is not None:
            try:
                return path.relative_to(folder).as_posix()
            except ValueError:
                pass
        return path.name

    tempdirs: list[tempfile.TemporaryDirectory] = []
    refused: list[RefusedInput] = []
    images: list[ImageInput] = []
    seen_paths: set[Path] = set()

    def add(path: Path, label: str, row: dict | None = None) -> None:
        real = path.resolve()
        if real in seen_paths and row is None:
            return  # the same file reached twice (a file and its folder, a symlink): read once
        seen_paths.add(real)
        result = read_input(path, label, row)
        (images if isinstance(result, ImageInput) else refused).append(result)

    for given in inputs:
        given = Path(given)
        label = name(given)
        if not given.exists():
            refused.append(RefusedInput(label, "not found"))
        elif given.is_dir():
            files, skipped = walk_files(given)
            refused += [RefusedInput(name(given / where, given), safe_reason(reason)) for where, reason in skipped]
            for path in files:
                if path.suffix.lower() == ".zip":
                    refused.append(RefusedInput(name(path, given), "zip archive inside a folder: give it as its own "
                                                                   "input"))
                elif path.is_file():
                    add(path, name(path, given))
        elif given.suffix.lower() == ".zip" or _is_zip(given):
            try:
                folder = tempfile.TemporaryDirectory(prefix="tlese-zip-")
                tempdirs.append(folder)
                members = safe_extract_zip(given, Path(folder.name), max_bytes=max_zip_bytes,
                                           max_members=max_zip_members)
            except UnsafeArchiveError as error:
                refused.append(RefusedInput(label, f"zip refused, nothing used from it: {error}"))
                continue
            for member, path in members:
                if path.suffix.lower() == ".zip":
                    refused.append(RefusedInput(f"{label}!{member}", "zip archive inside a zip: not opened"))
                else:
                    add(path, f"{label}!{member}")
        elif given.suffix.lower() == ".csv":
            try:
                rows = read_manifest(given, label=label)
            except ValueError as error:
                refused.append(RefusedInput(label, str(error)))
                continue
            for row in rows:
                if isinstance(row, RefusedInput):
                    refused.append(row)
                else:
                    add(row["path"], row["label"], row)
        else:
            add(given, label)
    shared_images = _images_under_several_patients(images)
    images, duplicates = _drop_duplicates(images, keep={id(image) for image in shared_images})
    breasts, unplaced = group_breasts(images)
    for breast in breasts:
        breast.notes += duplicates.get((breast.group, breast.patient, breast.side), [])
    mark_conflicts(breasts, shared_images)
    return InputSet(breasts=breasts, refused=refused + unplaced, images=images, _tempdirs=tempdirs)


def read_input(path: Path, label: str, row: dict | None = None) -> ImageInput | RefusedInput:
    """One file -> its ImageInput (header read, problems found) or a RefusedInput saying why it is no image."""
    try:
        kind = sniff_image(path)
    except OSError:
        return RefusedInput(label, "cannot read file")
    if kind is None:
        empty = path.stat().st_size == 0
        return RefusedInput(label, "empty file (0 bytes)" if empty else "not a DICOM, PNG or JPEG image (checked "
                            "from its first bytes, not decoded)")
    try:
        header, tags = read_header_and_tags(path, TAGS)
    except ImageReadError as error:
        return RefusedInput(label, safe_reason(error.reason))
    except Exception as error:  # never stop the batch for one file
        return RefusedInput(label, f"cannot read ({type(error).__name__})")
    try:
        digest = sha256_file(path)
    except OSError:
        return RefusedInput(label, "cannot read file")
    tags = {key: value for key, value in tags.items() if value is not None}
    if row is not None:
        return _manifest_image(path, label, header, tags, digest, row)
    if header.source_format != "dicom":
        return RefusedInput(label, "PNG/JPEG image without a manifest: side and view unknown (give a manifest CSV "
                                   "with patient, side, view, path)")
    if header.side is None:
        return RefusedInput(label, "laterality not stated in the header (ImageLaterality, Laterality)")
    cbis = cbis_patient(tags.get("PatientID"))
    if cbis is not None:
        group, patient = ("cbis", cbis), f"cbis:{cbis}"
    elif tags.get("StudyInstanceUID"):
        group = ("study", tags["StudyInstanceUID"])
        patient = f"{tags.get('PatientID') or ''}^{tags.get('IssuerOfPatientID') or ''}"
    else:
        return RefusedInput(label, "no StudyInstanceUID: cannot tell which exam the image belongs to")
    return ImageInput(path=path, label=label, source="dicom", header=header, side=header.side, view=header.view,
                      sha256=digest, group=group, tags=tags, problems=header_problems(header, tags), patient=patient)


def header_problems(header: ImageHeader, tags: dict[str, str | None]) -> tuple[str, ...]:
    """Why an image cannot be used, from its header alone: not MG, FOR PROCESSING, a CBIS-DDSM ROI mask or crop."""
    problems = []
    if header.source_format == "dicom":
        modality = (header.modality or "").upper()
        if not modality:
            problems.append("Modality not stated: not known to be a mammogram")
        elif modality != "MG":
            problems.append(f"Modality {_word(modality)} is not MG (mammography)")
        intent = (tags.get("PresentationIntentType") or "").upper()
        if intent == "FOR PROCESSING":
            problems.append("FOR PROCESSING (raw detector) image: the model reads FOR PRESENTATION images")
        name = cbis_case(tags.get("PatientID"))
        description = (tags.get("SeriesDescription") or "").lower()
        if (name and name["roi"]) or "roi mask" in description or "cropped" in description:
            problems.append("ROI mask or cropped image, not a full mammogram")
    return tuple(problems)


def group_breasts(images: Iterable[ImageInput]) -> tuple[list[Breast], list[RefusedInput]]:
    """Images -> breasts keyed by (exam group, patient, side), in first-seen order (never two patients in one)."""
    grouped: dict[tuple[tuple[str, str], str, str], list[ImageInput]] = defaultdict(list)
    unplaced = []
    for image in images:
        if image.group is None or image.side is None:
            unplaced.append(RefusedInput(image.label, "no exam or side: cannot be placed in a breast"))
            continue
        grouped[image.group, image.patient, image.side].append(image)
    return [Breast(group=group, side=side, images=members, patient=patient)
            for (group, patient, side), members in grouped.items()], unplaced


def mark_conflicts(breasts: list[Breast], shared_images: Sequence[ImageInput] = ()) -> None:
    """Add a `conflicts` reason to every breast of a StudyInstanceUID found under more than one patient, and to every
    breast holding an image that is also given under another patient (`shared_images`). Reasons name the inputs by
    their labels, never by an identifier."""
    patients_of_study: dict[str, set[str]] = defaultdict(set)
    for breast in breasts:
        for image in breast.images:
            if image.study_uid:
                patients_of_study[image.study_uid].add(image.patient)
    for breast in breasts:
        studies = {image.study_uid for image in breast.images if image.study_uid}
        if any(len(patients_of_study[uid]) > 1 for uid in studies):
            others = [image.label for other in breasts if other.patient != breast.patient for image in other.images
                      if image.study_uid in studies]
            breast.conflicts.append(
                "identity conflict: this breast's StudyInstanceUID is also the study of another patient's images ("
                + _labels(others) + "); not merged, not chosen between: check the exam in the PACS")
    shared = defaultdict(list)
    for image in shared_images:
        shared[image.sha256].append(image)
        if image.header.instance_hash:
            shared[image.header.instance_hash].append(image)
    conflicted = {id(image) for image in shared_images}
    for breast in breasts:
        mine = [image for image in breast.images if id(image) in conflicted]
        if not mine:
            continue
        keys = {image.sha256 for image in mine} | {image.header.instance_hash for image in mine} - {None}
        others = [image.label for key in keys for image in shared.get(key, ()) if image.patient != breast.patient]
        breast.conflicts.append(
            f"identity conflict: an image of this breast ({_labels(image.label for image in mine)}) is also given "
            f"under another patient ({_labels(others)}); not merged, not chosen between: check the inputs")


def cbis_case(patient_id: str | None) -> dict | None:
    """The data layer's CBIS-DDSM case-name rule on a PatientID ("Mass-Test_P_00173_LEFT_CC[_1]"): {"patient":
    "P_00173", "roi": whether it names an ROI mask / crop}, or None for any other PatientID.

    The rule is the data layer's (`tlese.data.datasets.cbis_ddsm.cbis_case`), not a copy."""
    found = cbis_ddsm.cbis_case(patient_id)
    return None if found is None else {"patient": found["patient"], "roi": bool(found.get("roi"))}


def cbis_patient(patient_id: str | None) -> str | None:
    """The CBIS-DDSM patient ("P_00173") of a PatientID following its case pattern, else None."""
    found = cbis_case(patient_id)
    return found["patient"] if found else None


def read_manifest(path: Path, label: str | None = None) -> list[dict | RefusedInput]:
    """Rows of a manifest CSV (patient, side, view, path; paths relative to the CSV's folder), each a dict with the
    resolved path and a label (`label` of the CSV, default its file name, `:line (path as written)`), or a
    RefusedInput for a row that cannot be used. ValueError for a CSV without the columns."""
    label_of_csv = label or path.name
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [str(name).strip().lower() for name in reader.fieldnames or []]
            missing = [column for column in MANIFEST_COLUMNS if column not in columns]
            if missing:
                raise ValueError(f"not a manifest: CSV lacks column(s) {missing} (needs {list(MANIFEST_COLUMNS)})")
            lines = [{str(k).strip().lower(): (v or "").strip() for k, v in line.items() if k is not None}
                     for line in reader]
    except (OSError, UnicodeDecodeError, csv.Error):
        raise ValueError("manifest CSV cannot be read") from None
    rows: list[dict | RefusedInput] = []
    for number, line in enumerate(lines, start=2):
        label = f"{label_of_csv}:{number}"
        try:
            side = Side.parse(line["side"], strict=True)
        except ValueError:
            side = None
        view = view_code(line["view"])
        if side is None or view is None or not line["patient"] or not line["path"]:
            rows.append(RefusedInput(label, "manifest row needs a patient, a side (L/R) and a view (CC/MLO)"))
            continue
        target = Path(line["path"])
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            rows.append(RefusedInput(label, "manifest row: image file not found"))
            continue
        rows.append({"path": target, "label": f"{label} ({line['path']})", "patient": line["patient"],
                     "side": side.value, "view": view})
    return rows


def safe_extract_zip(archive: Path, dest: Path, *, max_bytes: int = MAX_ZIP_BYTES,
                     max_members: int = MAX_ZIP_MEMBERS) -> list[tuple[str, Path]]:
    """Extract `archive` into `dest` after checking every member: a relative path without `..`, no drive or absolute
    path, no symlink or device, at most `max_members` files and `max_bytes` in all, no member compressed more than
    MAX_ZIP_RATIO times. Any bad member refuses the whole archive (UnsafeArchiveError) before anything is written;
    sizes are enforced again while copying (headers can lie). Returns (member name, extracted path) per file."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError):
        raise UnsafeArchiveError("not a readable zip archive") from None
    with zf:
        infos = [info for info in zf.infolist() if not info.is_dir()]
        if len(infos) > max_members:
            raise UnsafeArchiveError(f"{len(infos)} members, more than the limit of {max_members}")
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise UnsafeArchiveError(f"{total} bytes uncompressed, more than the limit of {max_bytes}")
        planned = []
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if (not parts or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts
                    or "\x00" in name):
                raise UnsafeArchiveError("a member's path leaves the archive (absolute or '..'): path traversal")
            mode = info.external_attr >> 16
            if mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
                raise UnsafeArchiveError("a member is a link or special file")
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > _CHUNK:
                raise UnsafeArchiveError("a member is compressed suspiciously well (zip bomb?)")
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest.resolve()):
                raise UnsafeArchiveError("a member's path leaves the archive: path traversal")
            planned.append((info, name, target))
        written = 0
        extracted = []
        for info, name, target in planned:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as source, open(target, "wb") as sink:
                    member_bytes = 0
                    while chunk := source.read(_CHUNK):
                        member_bytes += len(chunk)
                        written += len(chunk)
                        if member_bytes > info.file_size or written > max_bytes:
                            raise UnsafeArchiveError("a member is larger than its header says, or the size limit "
                                                     "was passed")
                        sink.write(chunk)
            except UnsafeArchiveError:
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True, exist_ok=True)
                raise
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is no fault of the archive
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
                raise UnsafeArchiveError("a member cannot be extracted (corrupt or encrypted)") from None
            except (zipfile.BadZipFile, EOFError, RuntimeError):  # corrupt, encrypted, CRC mismatch
                raise UnsafeArchiveError("a member cannot be extracted (corrupt or encrypted)") from None
            extracted.append((name, target))
    return extracted


def safe_reason(reason: str, identifiers: Iterable[str] = ()) -> str:
    """A reason from the data layer made generic: the free-text detail after the problem's name (an exception's
    message, which may quote a header value) is cut, and any of `identifiers` left in it is replaced."""
    head = re.split(r":\s|\s\((?!truncated)", str(reason), maxsplit=1)[0].strip()
    for value in sorted({v for v in identifiers if v and len(v) >= 3}, key=len, reverse=True):
        head = head.replace(value, "[identifier removed]")
    return head or "unreadable"


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _manifest_image(path: Path, label: str, header: ImageHeader, tags: dict, digest: str, row: dict) -> ImageInput:
    problems = list(header_problems(header, tags))
    side = row["side"]
    if header.side is not None and header.side != side:
        problems.append("laterality conflict: the file's header contradicts the manifest's side")
    if header.view is not None and view_code(header.view) != row["view"]:
        problems.append("view conflict: the file's header contradicts the manifest's view")
    return ImageInput(path=path, label=label, source="manifest", header=header, side=side, view=row["view"],
                      sha256=digest, group=("manifest", row["patient"]), tags={**tags, "PatientID": row["patient"]},
                      problems=tuple(problems), expected_side=side, expected_view=row["view"],
                      patient=f"manifest:{row['patient']}")


def _identity_keys(image: ImageInput) -> set[tuple[str, str]]:
    keys = {("sha", image.sha256)}
    if image.header.instance_hash:
        keys.add(("uid", image.header.instance_hash))
    return keys


def _images_under_several_patients(images: list[ImageInput]) -> list[ImageInput]:
    """Every image whose content (sha256) or SOPInstanceUID is also given under another patient."""
    patients: dict[tuple[str, str], set[str]] = defaultdict(set)
    for image in images:
        for key in _identity_keys(image):
            patients[key].add(image.patient)
    return [image for image in images if any(len(patients[key]) > 1 for key in _identity_keys(image))]


def _drop_duplicates(images: list[ImageInput], keep: set[int] = frozenset()) -> tuple[list[ImageInput], dict]:
    """Keep the first of images with the same content (sha256) or the same SOPInstanceUID for one patient; note the
    others. Images in `keep` (ids: those in an identity conflict between patients) all stay, for their breasts to be
    refused."""
    kept, seen, notes = [], set(), defaultdict(list)
    for image in images:
        keys = {(image.patient, *key) for key in _identity_keys(image)}
        if keys & seen and id(image) not in keep:
            if image.group is not None and image.side is not None:
                notes[image.group, image.patient, image.side].append(f"{image.view or 'an'} image given twice: used "
                                                                     "once")
            continue
        seen |= keys
        kept.append(image)
    return kept, notes


def _labels(labels: Iterable[str], most: int = 4) -> str:
    """A short list of input labels (relative paths, never identifiers)."""
    unique = list(dict.fromkeys(labels))
    shown = ", ".join(unique[:most])
    return shown + (f" and {len(unique) - most} more" if len(unique) > most else "") if unique else "another input"


def _is_zip(path: Path) -> bool:
    try:
        return path.is_file() and zipfile.is_zipfile(path) and not _looks_dicom(path)
    except OSError:
        return False


def _looks_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
SNIFF_BYTES = 4096
_EXPLICIT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
                 b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
                 b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


def looks_like_bare_dicom(head: bytes, elements: int = 3) -> bool:
    """Whether `head` (a file's first bytes) starts like a DICOM data set without the preamble: `elements`
    consecutive little-endian elements of group 0002 or 0008 onwards, tags strictly ascending with a non-zero element
    number, lengths that fit (explicit or implicit VR). A zero-filled or random body fails on the first element or two,
    without any parser reading it."""
    offset, previous = 0, -1
    for _ in range(elements):
        if offset + 8 > len(head):
            return False
        group, element = struct.unpack_from("<HH", head, offset)
        tag = (group << 16) | element
        if (group not in (0x0002, 0x0008) and previous < 0) or tag <= previous:
            return False
        vr = head[offset + 4: offset + 6]
        if vr in _EXPLICIT_VRS:
            if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"):
                if offset + 12 > len(head):
                    return False
                (length,) = struct.unpack_from("<I", head, offset + 8)
                offset += 12
            else:
                (length,) = struct.unpack_from("<H", head, offset + 6)
                offset += 8
        else:
            (length,) = struct.unpack_from("<I", head, offset + 4)
            offset += 8
        if length == 0xFFFFFFFF:
            return previous >= 0  # a sequence of undefined length after plausible elements
        if length % 2 or length > 2**20 or (element == 0 and length != 4):  # (gggg,0000): a 4-byte group length
            return False
        offset += length
        previous = tag
    return True


def sniff_image(path: Path) -> str | None:
    """'dicom', 'png', 'jpeg' or 'image' (another format for PIL to read: a file not named like a DICOM, whose
    decoder checks its own magic) from the file's first bytes; None for a file that cannot be an image we read: a
    DICOM-named file without `DICM` at byte 128 that does not start like a DICOM data set either (zero-filled,
    garbage, text). OSError when it cannot be read."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if head[128:132] == b"DICM":  # the file meta group must follow: a preamble before zeros is no DICOM
        return "dicom" if looks_like_bare_dicom(head[132:]) else None
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if looks_like_bare_dicom(head):
        return "dicom"
    if path.suffix.lower() in DICOM_SUFFIXES or not head.strip(b"\x00"):
        return None
    return "image"


def _word(text: str) -> str:
    """A short code word (Modality) or a placeholder: never a free-text header value."""
    return text if re.fullmatch(r"[A-Z0-9]{1,8}", text) else "(other)"


__all__ = ["Breast", "ImageInput", "InputSet", "RefusedInput", "UnsafeArchiveError", "cbis_case", "cbis_patient",
           "collect_inputs", "group_breasts", "header_problems", "looks_like_bare_dicom", "mark_conflicts",
           "read_input", "read_manifest", "safe_extract_zip", "safe_reason", "sniff_image"]
