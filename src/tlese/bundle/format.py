"""A finished run frozen into one portable, self-checking, signed bundle that runs offline on a CPU.

Layout of a bundle (a folder, or the same files at the root of a .zip):

    model.json              format version, model spec (registry name + create kwargs, class names, preprocessing
                            params + fingerprint + PREPROCESS_VERSION, as the folds recorded them when they trained),
                            the same as v1 keys (model, class_names, preprocess), views, fusion, task, input shape,
                            weights list, calibration (temperature, applied or not), optional "onnx" and "ood" entries
    card.json, card.md      the model card: intended use, training data (synthetic or not, validated on what), CV
                            metrics with patient-bootstrap CIs, transfer chain, calibration, provenance, folds included
    weights/fold_<k>.safetensors   one per finished fold (never a pickle); the fold models are an ensemble
    onnx/fold_<k>.onnx      optional: the same fold models for ONNX Runtime, parity measured when bundling
    onnx/fold_<k>.int8.onnx optional (`tlese bundle --int8`): their int8 quantisation, present only when its check
                            on the out-of-fold items passed (model.json / card.json "int8" record the check either
                            way); reference/expected_int8.json holds their outputs of the reference inputs
    ood.safetensors         optional: the out-of-distribution model (tlese.bundle.ood)
    reference/ref_<i>.npy   deterministic inputs at the bundle's input size (allow_pickle=False)
    reference/expected.json their expected per-model, raw and calibrated probabilities
    checksums.sha256        sha256sum format, every other file but signature.json
    signature.json          Ed25519 signature of checksums.sha256 (tlese.bundle.signing)

The format knows nothing of training: `tlese.train.release.make_bundle` writes a bundle from a finished run (a release
step of training). `load_bundle` refuses (BundleError) a bundle that is unsigned or not signed by a trusted key (unless
allowed), whose files do not match their checksums, whose records contradict each other (model spec, class names
and task, preprocessing fingerprint) or were made by other preprocessing code, or whose models no longer reproduce the
reference outputs. Loading needs only `tlese.models` and `tlese.data`: no run folder, no training code, no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlese.bundle.calibration import calibrated_ensemble
from tlese.bundle.signing import SIGNATURE_FILE, SigningError, load_trusted_keys, trusted_keys_source, verify_signature

FORMAT = "tlese-bundle"
FORMAT_VERSION = 2
MODEL_FILE = "model.json"
CARD_FILE = "card.json"
CARD_MARKDOWN = "card.md"
CHECKSUMS_FILE = "checksums.sha256"
WEIGHTS_DIR = "weights"
WEIGHT_PREFIX = "fold_"
OOD_FILE = "ood.safetensors"
REFERENCE_DIR = "reference"
EXPECTED_FILE = f"{REFERENCE_DIR}/expected.json"
TOLERANCE = 1e-4
# The OOD score of the reference inputs under ONNX Runtime, relative to its size (measured on a mini-MIAS model:
# up to 1.2e-3; float32 kernels differ by up to ~2e-6 of the features' size).
ONNX_OOD_TOLERANCE = 1e-2
INT8_EXPECTED_FILE = f"{REFERENCE_DIR}/expected_int8.json"
# The int8 files' probabilities of the reference inputs against those recorded when bundling. ONNX Runtime's int8
# kernels are deterministic on one CPU, but other CPUs may round or saturate differently (u8s8 without VNNI), so
# the check allows more than fp32's 1e-4; it is the guard that such a CPU still gives the checked answers, while
# checksums and signature cover the files themselves. OOD scores: relative, as ONNX_OOD_TOLERANCE.
INT8_TOLERANCE = 1e-2
DEFAULT_INTENDED_USE = "research use only; not for diagnostic use"
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".npz")
BATCH_SIZE = 16


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
    """(Re)write `checksums.sha256` for every other file of a bundle folder (but signature.json), sorted by name."""
    folder = Path(folder)
    lines = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (CHECKSUMS_FILE, SIGNATURE_FILE):
            lines.append(f"{_sha256_bytes(path.read_bytes())}  {name}")
    target = folder / CHECKSUMS_FILE
    target.write_text("\n".join(lines) + "\n")
    return target


def _verify_checksums(source: _Source) -> tuple[bytes, dict[str, str]]:
    """Every file of the bundle is listed and matches; returns (the checksum file's bytes, the listing)."""
    names = source.names()
    if CHECKSUMS_FILE not in names:
        raise BundleError(f"{source.path}: no {CHECKSUMS_FILE}; not a bundle, or an incomplete copy")
    raw = source.read(CHECKSUMS_FILE)
    listed = parse_checksums(raw.decode("utf-8", errors="replace"), f"{source.path}/{CHECKSUMS_FILE}")
    unlisted = sorted(set(names) - set(listed) - {CHECKSUMS_FILE, SIGNATURE_FILE})
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
        raise BundleError(f"{source.path}: pickle-capable file(s) {bad}; a bundle holds only safetensors, ONNX, JSON "
                          "and .npy")
    return raw, listed


def _check_signature(source: _Source, checksums: bytes, trusted_keys, allow_unsigned: bool) -> tuple[bool, str]:
    """(signed by a trusted key, what the check found); refuses unless it is or `allow_unsigned`."""
    signature = source.read(SIGNATURE_FILE) if SIGNATURE_FILE in source.names() else None
    sources = trusted_keys_source(trusted_keys)
    shown = ", ".join(str(path) for path in sources)
    try:
        trusted = load_trusted_keys(sources) if signature is not None else {}
    except SigningError as error:
        raise BundleError(f"{source.path}: trusted keys: {error}") from None
    check = verify_signature(signature, checksums, trusted, trusted_from=shown)
    if not check.valid and not allow_unsigned:
        raise BundleError(f"{source.path}: {check.status}. Refused: use the bundle as its maker signed it, with the "
                          f"maker's public key (.pub) among the trusted keys ({shown}), or accept an unverified "
                          "bundle explicitly with --allow-unsigned")
    return check.valid, check.status


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


def _model_spec(meta: dict, params, where: str):
    """The bundle's ModelSpec: model.json's "model_spec" (format 2), checked to agree with the v1 keys (model,
    class_names, preprocess); for a format-1 bundle, built from those keys."""
    from tlese.data.preprocess import PreprocessParams
    from tlese.models.spec import ModelSpec, ModelSpecError

    model, record = meta.get("model") or {}, meta["preprocess"]
    try:
        if "model_spec" not in meta:
            if meta["format_version"] >= 2:
                raise BundleError(f"{where}: {MODEL_FILE} (format {meta['format_version']}) has no model_spec")
            return ModelSpec(registry_name=str(model.get("registry_name", "")),
                             create_kwargs=dict(model.get("create_kwargs") or {}),
                             class_names=list(meta.get("class_names") or []), preprocess=params.to_dict(),
                             preprocess_fingerprint=params.fingerprint(), preprocess_version=record["version"])
        spec = ModelSpec.from_dict(meta["model_spec"], where=f"{where}: {MODEL_FILE} model_spec")
    except ModelSpecError as error:
        raise BundleError(f"{where}: {MODEL_FILE}: {error}") from None
    try:
        spec_fingerprint = PreprocessParams.from_dict(dict(spec.preprocess)).fingerprint()
    except (TypeError, ValueError) as error:
        raise BundleError(f"{where}: {MODEL_FILE} model_spec.preprocess: {error}") from None
    found = [(what, a, b) for what, a, b in (
        ("registry name", spec.registry_name, model.get("registry_name")),
        ("create kwargs", spec.create_kwargs, model.get("create_kwargs")),
        ("class names", spec.class_names, meta.get("class_names")),
        ("preprocessing fingerprint", spec.preprocess_fingerprint, record.get("fingerprint")),
        ("preprocessing parameters (their fingerprint)", spec_fingerprint, params.fingerprint()),
        ("preprocessing version", spec.preprocess_version, record.get("version"))) if a != b]
    if found:
        raise BundleError(f"{where}: {MODEL_FILE} model_spec contradicts the bundle's other records: "
                          + "; ".join(f"{what} {a!r} in model_spec, {b!r} elsewhere" for what, a, b in found)
                          + ". The record was edited: do not use this bundle")
    return spec


def _check_task_classes(meta: dict, where: str) -> None:
    from tlese.data.tasks import Task

    try:
        task = Task.from_dict(meta["task"], where=f"{where}: {MODEL_FILE} task")
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{where}: {MODEL_FILE} carries no readable task ({error})") from None
    if list(task.classes) != list(meta.get("class_names") or []):
        raise BundleError(f"{where}: {MODEL_FILE} class_names {list(meta.get('class_names') or [])} differ from the "
                          f"classes of the task it carries ({task.name}: {list(task.classes)}); every output would "
                          "be mislabelled: do not use this bundle")


def _build_model(meta: dict, data: bytes, name: str, where: str):
    from safetensors.torch import load as load_safetensors

    from tlese.models import create_model

    try:
        state = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types
        raise BundleError(f"{where}: {name} is not a readable safetensors file ({error})") from None
    spec = meta["model_spec"] if "model_spec" in meta else meta["model"]
    model = create_model(spec["registry_name"], pretrained=False, **spec["create_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{where}: {name} does not fit model {spec['registry_name']} ({error})") from None
    return model.eval()


def _temperature(meta: dict, where: str) -> float:
    """The temperature the bundle applies (`calibrated_ensemble` says to what): the fitted one when "applied"
    (format 1: always), else 1."""
    calibration = meta.get("calibration") or {}
    if not calibration.get("applied", True):
        return 1.0
    temperature = calibration.get("temperature")
    if not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
        raise BundleError(f"{where}: {MODEL_FILE} calibration temperature {temperature!r} is not a positive number")
    return float(temperature)


def _load_ood(meta: dict, source: _Source, listed: dict[str, str], where: str):
    entry = meta.get("ood")
    if not entry:
        return None
    from safetensors.torch import load as load_safetensors

    name = entry.get("file", OOD_FILE)
    if name not in listed:
        raise BundleError(f"{where}: {MODEL_FILE} names OOD file {name}, which is not in {CHECKSUMS_FILE}")
    try:
        from tlese.bundle.ood import OodModel
    except ImportError:
        raise BundleError(f"{where}: this bundle has an out-of-distribution model this tlese cannot read; "
                          "update tlese") from None
    try:
        return OodModel.from_tensors(load_safetensors(source.read(name)), entry)
    except Exception as error:  # safetensors' and the OOD model's own errors
        raise BundleError(f"{where}: {name}: not a readable OOD model ({error})") from None


def _check_onnx_entries(meta: dict, listed: dict[str, str], folds: list[int], where: str) -> list[dict]:
    entries = list(meta.get("onnx") or [])
    if not entries:
        return []
    for entry in entries:
        name = entry.get("file")
        if listed.get(name) is None or listed[name] != entry.get("sha256"):
            raise BundleError(f"{where}: ONNX file {name}: its sha256 in {MODEL_FILE} differs from {CHECKSUMS_FILE}")
        difference = entry.get("max_abs_diff")
        if not isinstance(difference, (int, float)) or not difference <= TOLERANCE:
            raise BundleError(f"{where}: ONNX file {name}: recorded parity {difference!r} is not within {TOLERANCE:g}")
    if sorted(int(entry["fold"]) for entry in entries) != sorted(folds):
        raise BundleError(f"{where}: ONNX files for folds {sorted(int(e['fold']) for e in entries)}, weights for "
                          f"folds {sorted(folds)}: the two ensembles must hold the same models")
    return sorted(entries, key=lambda entry: folds.index(int(entry["fold"])))


def _check_int8_entries(meta: dict, listed: dict[str, str], folds: list[int], where: str) -> list[dict]:
    """model.json's "int8" files, checked: listed with the same sha256, one per fold, present only with a passed
    check and the fp32 ONNX files, with their expected reference outputs."""
    record = meta.get("int8")
    if not record:
        return []
    if not isinstance(record, dict) or not isinstance(record.get("check"), dict):
        raise BundleError(f"{where}: {MODEL_FILE} int8 is not a record with a check")
    entries = list(record.get("files") or [])
    if not entries:
        if record["check"].get("passed") is True:
            raise BundleError(f"{where}: {MODEL_FILE} int8 check passed but lists no int8 files: the record was "
                              "edited, do not use this bundle")
        return []
    if record["check"].get("passed") is not True:
        raise BundleError(f"{where}: {MODEL_FILE} lists int8 files although its int8 check did not pass: the record "
                          "was edited, do not use this bundle")
    if not meta.get("onnx"):
        raise BundleError(f"{where}: {MODEL_FILE} lists int8 files but no fp32 ONNX files they were checked against")
    for entry in entries:
        name = entry.get("file")
        if listed.get(name) is None or listed[name] != entry.get("sha256"):
            raise BundleError(f"{where}: int8 ONNX file {name}: its sha256 in {MODEL_FILE} differs from "
                              f"{CHECKSUMS_FILE}")
    if sorted(int(entry["fold"]) for entry in entries) != sorted(folds):
        raise BundleError(f"{where}: int8 ONNX files for folds {sorted(int(e['fold']) for e in entries)}, weights "
                          f"for folds {sorted(folds)}: the two ensembles must hold the same models")
    expected = (record.get("reference") or {}).get("file", INT8_EXPECTED_FILE)
    if expected not in listed:
        raise BundleError(f"{where}: int8 ONNX files without their expected reference outputs ({expected})")
    return sorted(entries, key=lambda entry: folds.index(int(entry["fold"])))


def ensemble_outputs(per_model: np.ndarray, calibration: dict | None) -> dict[str, np.ndarray]:
    """The ensemble from the fold models' softmax probabilities `per_model` (M, B, K): "raw" (B, K) their mean,
    "calibrated" (B, K) as model.json's `calibration` record says (`tlese.bundle.calibration.calibrated_ensemble`:
    T = 1 when not applied), "per_model", "disagreement" (B,) max over classes of the std over models. The torch
    and the ONNX runtime combine their models here, the same way."""
    per_model = np.asarray(per_model, dtype=np.float64)
    raw = per_model.mean(axis=0)
    calibrated = calibrated_ensemble(per_model, calibration) if len(raw) else raw.copy()
    disagreement = per_model.std(axis=0).max(axis=1) if len(raw) else np.zeros(0)
    return {"raw": raw, "calibrated": calibrated, "per_model": per_model, "disagreement": disagreement}


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
    spec: Any = None  # tlese.models.spec.ModelSpec
    signed: bool = False
    signature_status: str = "not checked"
    ood: Any = None  # tlese.bundle.ood.OodModel or None
    onnx: list[dict] = field(default_factory=list)  # model.json "onnx" entries, in the order of `folds`
    int8: list[dict] = field(default_factory=list)  # model.json "int8" files, in the order of `folds` ([]: none)

    @property
    def int8_check(self) -> dict | None:
        """The int8 check recorded when bundling (`tlese.train.int8`: numbers, threshold, passed, reason), or None
        when the bundle was made without --int8."""
        record = self.meta.get("int8")
        return dict(record["check"]) if isinstance(record, dict) and record.get("check") else None

    @property
    def intended_use(self) -> str:
        return self.card.get("intended_use", DEFAULT_INTENDED_USE)

    @property
    def model_name(self) -> str:
        return self.spec.registry_name if self.spec is not None else self.meta["model"]["registry_name"]

    @property
    def task(self):
        from tlese.data.tasks import Task

        return Task.from_dict(self.meta["task"], where=f"{self.path}: {MODEL_FILE} task")

    @property
    def synthetic(self) -> bool:
        """Trained on synthetic data: card.json's training_data.synthetic (format-1 cards lack it: a registered
        synthetic task, `synth_*`, says so)."""
        data = self.card.get("training_data") or {}
        if "synthetic" in data:
            return bool(data["synthetic"])
        return str((data.get("task") or {}).get("name", "")).startswith("synth_")

    @property
    def validated_on(self) -> str:
        return str((self.card.get("training_data") or {}).get("validated_on") or "not recorded in the model card")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One item's shape: (2, C, H, W) for dual-view bundles (CC, MLO), (C, H, W) otherwise."""
        item = (self.in_chans, self.image_size, self.image_size)
        return (2, *item) if self.views == "dual" else item

    def checked_input(self, x: np.ndarray) -> np.ndarray:
        """`x` as float32 after checking its shape (B, *input_shape) and range [0, 1]."""
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input of shape {x.shape}; this bundle takes (B, {', '.join(map(str, self.input_shape))})"
                             + (" (CC, MLO)" if self.views == "dual" else ""))
        x = x.astype(np.float32, copy=False)
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise ValueError("input values must be finite and in [0, 1] (prepared images)")
        return x

    def predict_arrays(self, x: np.ndarray, batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
        """Probabilities for prepared inputs `x` (float in [0, 1], shape (B, *input_shape)).

        Returns `ensemble_outputs`: "raw" (B, K) mean of the fold models' softmax probabilities, "calibrated" (B, K)
        temperature-scaled as model.json's calibration says, "per_model" (M, B, K), "disagreement" (B,); with an
        OOD model also
        "ood_score" (B,) and "ood_flag" (B,) (score above the threshold fitted on the training images).
        """
        import torch

        x = self.checked_input(x)
        per_model = np.zeros((len(self.models), len(x), len(self.class_names)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
                for index, model in enumerate(self.models):
                    logits = model(batch).double()
                    per_model[index, start:start + len(batch)] = torch.softmax(logits, dim=1).numpy()
        return {**ensemble_outputs(per_model, self.meta.get("calibration")), **self.ood_outputs(x)}

    def ood_outputs(self, x: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{"ood_score", "ood_flag"} of checked inputs `x` ({} without an OOD model), from `features`
        (`tlese.bundle.ood.penultimate_features` layout) or, when not given, the torch models' features."""
        if self.ood is None:
            return {}
        if features is None:
            from tlese.bundle.ood import penultimate_features

            features = penultimate_features(self.models, x)
        score = np.asarray(self.ood.score(features), dtype=np.float64).reshape(len(x))
        return {"ood_score": score, "ood_flag": score > float(self.ood.threshold)}

    def reference_cases(self) -> list[tuple[str, np.ndarray, dict]]:
        """The bundle's reference inputs: (file name, one item's array, its expected.json record)."""
        source = _Source(self.path)
        try:
            return _reference_cases(self.path, source)
        finally:
            source.close()

    def onnx_files(self, int8: bool = False) -> dict[int, bytes]:
        """{fold: the bytes of onnx/fold_<fold>.onnx} (with `int8`: onnx/fold_<fold>.int8.onnx), each checked
        against its sha256 ({} when none)."""
        entries = self.int8 if int8 else self.onnx
        if not entries:
            return {}
        source = _Source(self.path)
        try:
            found = {}
            for entry in entries:
                data = source.read(entry["file"])
                if _sha256_bytes(data) != entry["sha256"]:
                    raise BundleError(f"{self.path}: {entry['file']} changed since the bundle was loaded")
                found[int(entry["fold"])] = data
            return found
        finally:
            source.close()

    def onnx_predictor(self, threads: int | None = None, spinning: bool = True, int8: bool = False
                       ) -> Callable[[np.ndarray], dict[str, np.ndarray]] | None:
        """The ensemble under ONNX Runtime from the bundle's own onnx/fold_<k>.onnx files (None when it carries
        none): a callable giving the same dict as `predict_arrays` (OOD features from the graphs' "features" output
        when they have one). Checked on the reference inputs against expected.json: probabilities within 1e-4 (else
        BundleError), the OOD flag the same. threads / spinning: ONNX Runtime's intra-op threads (None: its
        default) and busy-waiting (`tlese.bundle.onnx.session_options`).

        int8: the int8 files instead (present only when the bundle's int8 check passed; a BundleError saying why
        when there are none), checked against reference/expected_int8.json: probabilities within INT8_TOLERANCE,
        OOD scores within ONNX_OOD_TOLERANCE of their size."""
        if int8:
            return self._int8_predictor(threads, spinning)
        files = self.onnx_files()
        if not files:
            return None
        predictor = onnx_ensemble(self, files, threads=threads, spinning=spinning)
        # OOD models with noise floors give scores stable to the ~1e-6 float32 differences of ONNX Runtime; older
        # ones only keep the flag.
        legacy_ood = self.ood is not None and "noise_floor" not in self.ood.info
        for name, x, record in self.reference_cases():
            _compare_to_record(self.path, f"reference {name} under ONNX Runtime", predictor(x[None]), record,
                               ood_tolerance=ONNX_OOD_TOLERANCE,
                               ood_threshold=float(self.ood.threshold) if legacy_ood else None)
        return predictor

    def _int8_predictor(self, threads: int | None, spinning: bool) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        check = self.int8_check
        if check is None:
            raise BundleError(f"{self.path}: this bundle carries no int8 ONNX files: it was made without --int8 "
                              "(`tlese bundle RUN --arm A --out B --int8` checks and adds them); use the fp32 runtime")
        if not self.int8:
            raise BundleError(f"{self.path}: this bundle carries no int8 ONNX files: its int8 check failed when it was "
                              f"made ({check.get('reason', 'no reason recorded')}); "
                              "use the fp32 runtime")
        predictor = onnx_ensemble(self, self.onnx_files(int8=True), threads=threads, spinning=spinning)
        name = (self.meta["int8"].get("reference") or {}).get("file", INT8_EXPECTED_FILE)
        source = _Source(self.path)
        try:
            expected = _json(source, name)
            cases = {case: x for case, x, _ in _reference_cases(self.path, source)}
        finally:
            source.close()
        if not expected.get("references"):
            raise BundleError(f"{self.path}: {name} holds no reference")
        tolerance = float(expected.get("tolerance", INT8_TOLERANCE))
        legacy_ood = self.ood is not None and "noise_floor" not in self.ood.info
        for record in expected["references"]:
            if record.get("file") not in cases:
                raise BundleError(f"{self.path}: {name} names {record.get('file')}, not a reference input")
            _compare_to_record(self.path, f"reference {record['file']} under ONNX Runtime int8",
                               predictor(cases[record["file"]][None]), record, ood_tolerance=ONNX_OOD_TOLERANCE,
                               ood_threshold=float(self.ood.threshold) if legacy_ood else None, tolerance=tolerance,
                               expected_file=name)
        return predictor


class _OnnxEnsemble:
    """The bundle's fold models as ONNX Runtime sessions, combined as `Bundle.predict_arrays` combines them."""

    def __init__(self, bundle: Bundle, sessions: list):
        self.bundle, self.sessions = bundle, sessions

    def __repr__(self) -> str:
        return f"OnnxEnsemble({len(self.sessions)} models of bundle {self.bundle.path.name})"

    def __call__(self, x: np.ndarray, batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
        from tlese.bundle.onnx import FEATURES_NAME, OUTPUT_NAME, softmax

        x = self.bundle.checked_input(x)
        # OOD features from the graphs when each has the "features" output, else from torch (ood_outputs).
        with_features = self.bundle.ood is not None and all(FEATURES_NAME in s.output_names for s in self.sessions)
        names = [OUTPUT_NAME, FEATURES_NAME] if with_features else [OUTPUT_NAME]
        per_model = np.zeros((len(self.sessions), len(x), len(self.bundle.class_names)), dtype=np.float64)
        features = []
        for start in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[start:start + batch_size])
            per_view = []  # each model's (b, V, F)
            for index, session in enumerate(self.sessions):
                outputs = session.run(batch, names)
                per_model[index, start:start + len(batch)] = softmax(outputs[0])
                per_view += outputs[1:]
            if with_features:  # as penultimate_features lays them out: models concatenated per view, views in turn
                features.append(np.concatenate(per_view, axis=2).reshape(len(batch), -1).astype(np.float64))
        stacked = np.concatenate(features) if with_features and features else None
        return {**ensemble_outputs(per_model, self.bundle.meta.get("calibration")),
                **self.bundle.ood_outputs(x, stacked)}


def onnx_ensemble(bundle: Bundle, files: Mapping[int, bytes | str | Path], threads: int | None = None,
                  spinning: bool = True) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The ensemble of `bundle` under ONNX Runtime from `files` ({fold: .onnx bytes or path}, one per fold of the
    bundle), giving the same dict as `predict_arrays`. Safe to call from several threads at once."""
    from tlese.bundle.onnx import OnnxModel, onnx_file

    if sorted(files) != sorted(bundle.folds):
        raise BundleError(f"{bundle.path}: ONNX models for folds {sorted(files)}, the bundle has {bundle.folds}")
    sessions = []
    for fold in bundle.folds:
        model = files[fold]
        name = onnx_file(fold) if isinstance(model, bytes) else None
        session = OnnxModel(model, threads=threads, check_input=False, spinning=spinning, name=name)
        expected = (None, *bundle.input_shape)
        if session.input_shape != expected:
            shown = tuple("B" if d is None else d for d in session.input_shape)
            raise BundleError(f"{bundle.path}: {onnx_file(fold)} takes {shown}, the bundle (B, {bundle.input_shape})")
        sessions.append(session)
    return _OnnxEnsemble(bundle, sessions)


def load_bundle(path: str | Path, check_references: bool = True, *, trusted_keys=None,
                allow_unsigned: bool = False) -> Bundle:
    """Load a bundle (folder or .zip), verified: every file against `checksums.sha256`; its signature against the
    trusted keys (`trusted_keys`: a folder of *.pub files, one file, or a list; default $TLESE_TRUSTED_KEYS, else
    ~/.config/tlese/trusted_keys); the model spec against the other records, the class names against the task it
    carries, the preprocessing record against its fingerprint and the installed PREPROCESS_VERSION; each fold model
    rebuilt (strict) from its safetensors file, and the reference inputs re-run (outputs within 1e-4 of the recorded
    ones). Any failure is a BundleError naming the file or the reference. An unsigned or not-trusted bundle loads only
    with `allow_unsigned` (then `bundle.signed` is False and `bundle.signature_status` says why). The models are in
    eval mode, on the CPU."""
    path = Path(path)
    source = _Source(path)
    try:
        checksums, listed = _verify_checksums(source)
        signed, signature_status = _check_signature(source, checksums, trusted_keys, allow_unsigned)
        meta = _json(source, MODEL_FILE)
        if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
            raise BundleError(f"{path}: {MODEL_FILE} is not a {FORMAT} record")
        if meta["format_version"] > FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {meta['format_version']} is newer than this tlese reads "
                              f"({FORMAT_VERSION}); update tlese")
        params = _check_preprocess(meta, str(path))
        spec = _model_spec(meta, params, str(path))
        _check_task_classes(meta, str(path))
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
        bundle = Bundle(path=path, sha256=_sha256_bytes(checksums), meta=meta, card=_json(source, CARD_FILE),
                        models=models, folds=folds, temperature=_temperature(meta, str(path)), preprocess=params,
                        class_names=list(meta["class_names"]), views=meta["views"], image_size=params.size,
                        in_chans=int(input_spec["in_chans"]), spec=spec, signed=signed,
                        signature_status=signature_status, ood=_load_ood(meta, source, listed, str(path)),
                        onnx=_check_onnx_entries(meta, listed, folds, str(path)),
                        int8=_check_int8_entries(meta, listed, folds, str(path)))
        if check_references:
            for name, x, record in _reference_cases(path, source):
                _compare_to_record(path, f"reference {name}", bundle.predict_arrays(x[None]), record)
        return bundle
    finally:
        source.close()


def _reference_cases(path: Path, source: _Source) -> list[tuple[str, np.ndarray, dict]]:
    expected = _json(source, EXPECTED_FILE)
    references = expected.get("references") or []
    if not references:
        raise BundleError(f"{path}: {EXPECTED_FILE} holds no reference")
    cases = []
    for reference in references:
        name = reference["file"]
        try:
            x = np.load(io.BytesIO(source.read(name)), allow_pickle=False)
        except ValueError as error:
            raise BundleError(f"{path}: {name} is not a plain .npy array ({error})") from None
        cases.append((name, x, reference))
    return cases


def _compare_to_record(path: Path, what: str, outputs: dict[str, np.ndarray], record: dict,
                       ood_tolerance: float = TOLERANCE, ood_threshold: float | None = None,
                       tolerance: float = TOLERANCE, expected_file: str = EXPECTED_FILE) -> None:
    """One reference item's outputs against its expected.json record: per_model, raw and calibrated within
    `tolerance` (1e-4);
    ood_score (when both have it) within `ood_tolerance` of its size, or, given `ood_threshold` (OOD models fitted
    before the noise floors of tlese.bundle.ood, whose scores amplify float noise), only on the same side of it."""
    for key in ("per_model", "raw", "calibrated", "ood_score"):
        if key not in record or key not in outputs:
            continue
        want = np.asarray(record[key], dtype=np.float64)
        got = outputs[key][:, 0] if key == "per_model" else outputs[key][0]
        if want.shape != np.shape(got):
            raise BundleError(f"{path}: {what}: {key} has shape {np.shape(got)}, expected {want.shape}")
        if key == "ood_score" and ood_threshold is not None:
            if bool(want > ood_threshold) != bool(outputs["ood_flag"][0]):
                raise BundleError(f"{path}: {what}: OOD score {float(got):.4g} is on the other side of the threshold "
                                  f"{ood_threshold:.4g} from the recorded {float(want):.4g}")
            continue
        difference = float(np.abs(want - got).max()) if want.size else 0.0
        allowed = ood_tolerance * max(1.0, float(np.abs(want).max())) if key == "ood_score" else tolerance
        if not difference <= allowed:
            label = "score" if key == "ood_score" else "probabilities"
            raise BundleError(f"{path}: {what}: {key} {label} differ from {expected_file} by up to "
                              f"{difference:.3g} (> {allowed:g}); the models do not reproduce what was bundled (other "
                              "code or library versions?)")


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
