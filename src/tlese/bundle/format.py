"""A finished run frozen into one portable, self-checking bundle that runs offline on a CPU.

Layout of a bundle (a folder, or the same files at the root of a .zip):

    model.json              format version, registry name + create kwargs, views, fusion, class names, task,
                            preprocessing parameters (+ fingerprint, PREPROCESS_VERSION), input shape, weights list,
                            calibration temperature
    card.json, card.md      the model card: intended use, training data, CV metrics with patient-bootstrap CIs,
                            transfer chain, calibration, provenance, folds included
    weights/fold_<k>.safetensors   one per finished fold (never a pickle); the fold models are an ensemble
    reference/ref_<i>.npy   deterministic inputs at the bundle's input size (allow_pickle=False)
    reference/expected.json their expected per-model, raw and calibrated probabilities
    checksums.sha256        sha256sum format, every other file

The format knows nothing of training: `tlese.train.release.make_bundle` writes a bundle from a finished run (a release
step of training). `load_bundle` refuses (BundleError) a bundle
whose files do not match their checksums, whose preprocessing record was edited or was made by other preprocessing
code, or whose models no longer reproduce the reference outputs. Loading needs only `tlese.models` and
`tlese.data.preprocess`: no run folder, no training code, no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlese.bundle.calibration import apply_temperature

FORMAT = "tlese-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
CARD_FILE = "card.json"
CARD_MARKDOWN = "card.md"
CHECKSUMS_FILE = "checksums.sha256"
WEIGHTS_DIR = "weights"
WEIGHT_PREFIX = "fold_"
REFERENCE_DIR = "reference"
EXPECTED_FILE = f"{REFERENCE_DIR}/expected.json"
TOLERANCE = 1e-4
DEFAULT_INTENDED_USE = "research use only; not for diagnostic use"
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".npz")


class BundleError(ValueError):
    """A bundle that cannot be trusted: a file that differs from its checksum, an edited record, drifting outputs."""


def weight_file(fold: int) -> str:
    return f"{WEIGHTS_DIR}/{WEIGHT_PREFIX}{int(fold)}.safetensors"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dump(value: Any) -> str:
    return json.dumps(_clean(value), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Reading a bundle: a folder or a zip, files by their relative POSIX names


class _Source:
    def __init__(self, path: Path):
        self.path = path
        self._zip = None
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise BundleError(f"{path}: neither a bundle folder nor a .zip bundle")
            self._zip = zipfile.ZipFile(path)
        elif not path.is_dir():
            raise FileNotFoundError(f"{path}: no bundle here")

    def names(self) -> list[str]:
        if self._zip is not None:
            return sorted(info.filename for info in self._zip.infolist() if not info.is_dir())
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (KeyError, FileNotFoundError):
            raise BundleError(f"{self.path}: {name} is missing") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def parse_checksums(text: str, where: str) -> dict[str, str]:
    """`sha256sum` lines (`<hex>  <name>`, or `<hex> *<name>`) -> {name: hex}."""
    found = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise BundleError(f"{where}: line {number} is not `<sha256>  <file>`")
        found[name] = digest.lower()
    return found


def write_checksums(folder: str | Path) -> Path:
    """(Re)write `checksums.sha256` for every other file of a bundle folder, sorted by name."""
    folder = Path(folder)
    lines = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != CHECKSUMS_FILE:
            lines.append(f"{_sha256_bytes(path.read_bytes())}  {name}")
    target = folder / CHECKSUMS_FILE
    target.write_text("\n".join(lines) + "\n")
    return target


def _verify_checksums(source: _Source) -> tuple[str, dict[str, str]]:
    """Every file of the bundle is listed and matches; returns (sha256 of the checksum file, the listing)."""
    names = source.names()
    if CHECKSUMS_FILE not in names:
        raise BundleError(f"{source.path}: no {CHECKSUMS_FILE}; not a bundle, or an incomplete copy")
    raw = source.read(CHECKSUMS_FILE)
    listed = parse_checksums(raw.decode("utf-8", errors="replace"), f"{source.path}/{CHECKSUMS_FILE}")
    unlisted = sorted(set(names) - set(listed) - {CHECKSUMS_FILE})
    if unlisted:
        raise BundleError(f"{source.path}: file(s) not in {CHECKSUMS_FILE}: {unlisted}")
    for name, expected in listed.items():
        if name not in names:
            raise BundleError(f"{source.path}: {name} is listed in {CHECKSUMS_FILE} but missing")
        if _sha256_bytes(source.read(name)) != expected:
            raise BundleError(f"{source.path}: {name} differs from its checksum in {CHECKSUMS_FILE} (damaged or "
                              "edited); do not use this bundle, ask its maker for a fresh copy")
    bad = [name for name in names if name.lower().endswith(FORBIDDEN_SUFFIXES)]
    if bad:
        raise BundleError(f"{source.path}: pickle-capable file(s) {bad}; a bundle holds only safetensors, JSON and "
                          ".npy")
    return _sha256_bytes(raw), listed


def _json(source: _Source, name: str) -> dict:
    try:
        return json.loads(source.read(name))
    except json.JSONDecodeError as error:
        raise BundleError(f"{source.path}: {name} is not valid JSON ({error})") from None


def _check_preprocess(meta: dict, where: str):
    """The recorded preprocessing, checked against its fingerprint and the installed code's version."""
    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams

    record = meta.get("preprocess") or {}
    if record.get("version") != PREPROCESS_VERSION:
        raise BundleError(f"{where}: {MODEL_FILE} was made with preprocessing version {record.get('version')!r}; "
                          f"the installed tlese has version {PREPROCESS_VERSION}. Images would be prepared "
                          "differently from training: install the tlese version recorded in card.json, or rebundle")
    try:
        params = PreprocessParams.from_dict(dict(record.get("params") or {}))
    except (TypeError, ValueError) as error:
        raise BundleError(f"{where}: {MODEL_FILE} preprocess.params: {error}") from None
    if params.fingerprint() != record.get("fingerprint"):
        raise BundleError(f"{where}: {MODEL_FILE} preprocess.params do not match their recorded fingerprint "
                          f"({params.fingerprint()} != {record.get('fingerprint')!r}): a parameter was edited")
    return params


def _build_model(meta: dict, data: bytes, name: str, where: str):
    from safetensors.torch import load as load_safetensors

    from tlese.models import create_model

    try:
        state = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types
        raise BundleError(f"{where}: {name} is not a readable safetensors file ({error})") from None
    spec = meta["model"]
    model = create_model(spec["registry_name"], pretrained=False, **spec["create_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{where}: {name} does not fit model {spec['registry_name']} ({error})") from None
    return model.eval()


@dataclass
class Bundle:
    """A loaded, verified bundle: the fold models (an ensemble), what they expect as input and what they output."""

    path: Path
    sha256: str
    meta: dict
    card: dict
    models: list
    folds: list[int]
    temperature: float
    preprocess: Any  # tlese.data.preprocess.PreprocessParams
    class_names: list[str] = field(default_factory=list)
    views: str = "dual"
    image_size: int = 0
    in_chans: int = 1

    @property
    def intended_use(self) -> str:
        return self.card.get("intended_use", DEFAULT_INTENDED_USE)

    @property
    def model_name(self) -> str:
        return self.meta["model"]["registry_name"]

    @property
    def task(self):
        from tlese.data.tasks import Task

        return Task.from_dict(self.meta["task"], where=f"{self.path}: {MODEL_FILE} task")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One item's shape: (2, C, H, W) for dual-view bundles (CC, MLO), (C, H, W) otherwise."""
        item = (self.in_chans, self.image_size, self.image_size)
        return (2, *item) if self.views == "dual" else item

    def predict_arrays(self, x: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
        """Probabilities for prepared inputs `x` (float in [0, 1], shape (B, *input_shape)).

        Returns "raw" (B, K): mean of the fold models' softmax probabilities; "calibrated" (B, K): the raw mean
        temperature-scaled; "per_model" (M, B, K); "disagreement" (B,): max over classes of the std over models.
        """
        import torch

        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input of shape {x.shape}; this bundle takes (B, {', '.join(map(str, self.input_shape))})"
                             + (" (CC, MLO)" if self.views == "dual" else ""))
        x = x.astype(np.float32, copy=False)
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise ValueError("input values must be finite and in [0, 1] (prepared images)")
        per_model = np.zeros((len(self.models), len(x), len(self.class_names)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
                for index, model in enumerate(self.models):
                    logits = model(batch).double()
                    per_model[index, start:start + len(batch)] = torch.softmax(logits, dim=1).numpy()
        raw = per_model.mean(axis=0)
        calibrated = apply_temperature(raw, self.temperature) if len(raw) else raw.copy()
        disagreement = per_model.std(axis=0).max(axis=1) if len(raw) else np.zeros(0)
        return {"raw": raw, "calibrated": calibrated, "per_model": per_model, "disagreement": disagreement}


def load_bundle(path: str | Path, check_references: bool = True) -> Bundle:
    """Load a bundle (folder or .zip), verified: every file against `checksums.sha256`, the preprocessing record
    against its fingerprint and the installed PREPROCESS_VERSION, each fold model rebuilt (strict) from its
    safetensors file, and the reference inputs re-run (outputs within 1e-4 of the recorded ones). Any failure is
    a BundleError naming the file or the reference. The models are in eval mode, on the CPU."""
    path = Path(path)
    source = _Source(path)
    try:
        digest, listed = _verify_checksums(source)
        meta = _json(source, MODEL_FILE)
        if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
            raise BundleError(f"{path}: {MODEL_FILE} is not a {FORMAT} record")
        if meta["format_version"] > FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {meta['format_version']} is newer than this tlese reads "
                              f"({FORMAT_VERSION}); update tlese")
        params = _check_preprocess(meta, str(path))
        input_spec = meta["input"]
        if int(input_spec["image_size"]) != params.size:
            raise BundleError(f"{path}: {MODEL_FILE} input size {input_spec['image_size']} differs from the "
                              f"preprocessing size {params.size}")
        models, folds = [], []
        if not meta.get("weights"):
            raise BundleError(f"{path}: {MODEL_FILE} lists no weights")
        for entry in meta["weights"]:
            name = entry["file"]
            if listed.get(name) != entry.get("sha256"):
                raise BundleError(f"{path}: {name}: its sha256 in {MODEL_FILE} differs from {CHECKSUMS_FILE}")
            models.append(_build_model(meta, source.read(name), name, str(path)))
            folds.append(int(entry["fold"]))
        bundle = Bundle(path=path, sha256=digest, meta=meta, card=_json(source, CARD_FILE), models=models, folds=folds,
                        temperature=float(meta["calibration"]["temperature"]), preprocess=params,
                        class_names=list(meta["class_names"]), views=meta["views"], image_size=params.size,
                        in_chans=int(input_spec["in_chans"]))
        if check_references:
            _check_references(bundle, source)
        return bundle
    finally:
        source.close()


def _check_references(bundle: Bundle, source: _Source) -> None:
    expected = _json(source, EXPECTED_FILE)
    references = expected.get("references") or []
    if not references:
        raise BundleError(f"{bundle.path}: {EXPECTED_FILE} holds no reference")
    for reference in references:
        name = reference["file"]
        try:
            x = np.load(io.BytesIO(source.read(name)), allow_pickle=False)
        except ValueError as error:
            raise BundleError(f"{bundle.path}: {name} is not a plain .npy array ({error})") from None
        outputs = bundle.predict_arrays(x[None])
        for key in ("per_model", "raw", "calibrated"):
            want = np.asarray(reference[key], dtype=np.float64)
            got = outputs[key][:, 0] if key == "per_model" else outputs[key][0]
            if want.shape != got.shape:
                raise BundleError(f"{bundle.path}: reference {name}: {key} has shape {got.shape}, expected "
                                  f"{want.shape}")
            difference = float(np.abs(want - got).max())
            if not difference <= TOLERANCE:
                raise BundleError(f"{bundle.path}: reference {name}: {key} probabilities differ from "
                                  f"{EXPECTED_FILE} by up to {difference:.3g} (> {TOLERANCE:g}); the models do not "
                                  "reproduce what was bundled (other code or library versions?)")


def reference_inputs(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Deterministic test inputs of one item's `shape` (float32 in [0, 1]): uniform noise, a smooth bright disc on a
    dark background (a breast-like blob, brighter towards the chest wall) and a constant mid-grey."""
    size = shape[-1]
    noise = np.random.default_rng(20260101).random(shape, dtype=np.float32)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    radius = np.sqrt((rows - 0.5) ** 2 + cols ** 2)
    disc = np.clip(1.0 - radius / 0.9, 0.0, 1.0) * (0.6 + 0.4 * np.cos(6.0 * rows) ** 2)
    blob = np.broadcast_to(disc.astype(np.float32), shape).copy()
    grey = np.full(shape, 0.5, dtype=np.float32)
    return [noise, blob, grey]
