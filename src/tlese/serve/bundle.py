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

`make_bundle` builds one from a run folder (models only through `tlese.train.trained.load_trained`; calibration on
the out-of-fold predictions only) and verifies it by loading it back. `load_bundle` refuses (BundleError) a bundle
whose files do not match their checksums, whose preprocessing record was edited or was made by other preprocessing
code, or whose models no longer reproduce the reference outputs. Loading needs only `tlese.models` and
`tlese.data.preprocess`: no run folder, no training code, no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlese.serve.calibration import apply_temperature

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
CALIBRATION_NOTE = ("fitted on single-fold out-of-fold probabilities (each patient predicted by the one fold model "
                    "that never trained on them), applied to the ensemble-mean probability: an approximation (the "
                    "mean of several models is already less confident than one of them, so T may over-soften)")
SMALL_CALIBRATION_SET = 100
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


# ---------------------------------------------------------------------------------------------------------------
# Making a bundle from a run folder


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


def _oof_frame(results, views: str):
    """The out-of-fold predictions at the unit the model outputs: breasts for dual-view models, images otherwise."""
    if views == "dual":
        return results.predictions, "breast"
    if results.images is not None:
        return results.images, "image"
    return results.predictions, results.unit


def _transfer_text(init: dict) -> str:
    imagenet = init.get("imagenet", "unknown")
    start = {"loaded": "ImageNet weights", "not used": "random initialisation (no ImageNet)",
             "missing -> scratch": "random initialisation (ImageNet weights missing -> scratch)"}.get(
                 imagenet, f"ImageNet: {imagenet}")
    steps = [start]
    if init.get("cxr_sha256"):
        steps.append(f"chest X-ray stage 1 (checkpoint sha256 {init['cxr_sha256'][:12]}, "
                     f"{init.get('cxr_load_summary') or 'load report not recorded'})")
    steps.append("mammography target task")
    return " -> ".join(steps)


def _calibration_warnings(calibration: dict) -> list[str]:
    from tlese.serve.calibration import T_MAX, T_MIN

    found = []
    if calibration["n"] < SMALL_CALIBRATION_SET:
        found.append(f"temperature fitted on only {calibration['n']} predictions: treat it and the ECE as rough")
    if not T_MIN * 1.01 < calibration["temperature"] < T_MAX / 1.01:
        found.append(f"temperature at the edge of its search range [{T_MIN}, {T_MAX}]: the fit is degenerate")
    if calibration["nll_after"] > calibration["nll_before"]:
        found.append("NLL did not improve on the out-of-fold predictions")
    return found


def _label_definition(task, adapter: str) -> str:
    grouping = task.grouping
    mapping = ("; ".join(f"{raw!r} -> {cls if cls is not None else 'excluded'}" for raw, cls in grouping.items())
               if grouping else "none (raw labels are the class names)")
    return (f"column {task.label_column!r} of the {adapter} adapter's table, mapped to classes {list(task.classes)} "
            f"(grouping: {mapping}); views {list(task.views)}; a breast lacking a view: {task.single_view_policy}; "
            f"unknown labels: {task.unknown_label_policy}")


def _metrics_records(summary) -> list[dict]:
    keep = ["metric", "pooled", "ci_low", "ci_high", "mean", "std", "n_folds", "n_boot_used"]
    return [{key: row[key] for key in keep if key in row} for row in summary.to_dict("records")]


def _card(*, experiment, arm, task, results, unit_frame, unit, calibration, records, folds_included, folds_missing,
          stage1, data_summary, environment, intended_use, n_boot) -> dict:
    from tlese.evaluate.tables import summary_table
    from tlese.provenance import environment_info

    class_names = list(task.classes)
    predictions = results.predictions
    per_class = {}
    for index, name in enumerate(class_names):
        rows = predictions[predictions["target"].astype(int) == index]
        per_class[name] = {"patients": int(rows["patient_id"].nunique()), f"{results.unit}s": int(len(rows))}
    summary = summary_table(predictions, class_names, n_boot=n_boot, seed=experiment.seed)
    chain = [{"fold": record["fold"], "transfer": record.get("transfer", arm.transfer),
              "imagenet": record.get("init", {}).get("imagenet"),
              "stage1_sha256": record.get("init", {}).get("cxr_sha256"),
              "stage1_load": record.get("init", {}).get("cxr_load_summary"),
              "chain": _transfer_text(record.get("init", {}))} for record in records]
    return {
        "intended_use": intended_use,
        "model": {"arm": arm.name, "registry_name": arm.model, "transfer": arm.transfer, "views": experiment.views,
                  "fusion": experiment.fusion if experiment.views == "dual" else None, "classes": class_names,
                  "ensemble": f"mean probability of {len(folds_included)} fold models; disagreement = max over "
                              "classes of their standard deviation"},
        "training_data": {
            "dataset_adapter": experiment.target.adapter, "task": task.to_dict(),
            "task_source": "registered" if isinstance(experiment.target.task, str) else "inline",
            "label_definition": _label_definition(task, experiment.target.adapter),
            "patients": int(predictions["patient_id"].nunique()), "unit": results.unit,
            f"{results.unit}s": int(len(predictions)), "per_class": per_class, "data_summary": data_summary},
        "cv_metrics": {"unit": results.unit, "folds": folds_included, "n_boot": n_boot,
                       "ci": "95% patient-level bootstrap of the pooled out-of-fold predictions",
                       "mean_std": "over folds", "metrics": _metrics_records(summary)},
        "transfer_chain": chain,
        "stage1": stage1,
        "calibration": {**calibration, "fitted_on": f"out-of-fold {unit} predictions of folds {folds_included}",
                        "applied_to": "ensemble-mean probability", "note": CALIBRATION_NOTE,
                        "warnings": _calibration_warnings(calibration)},
        "folds_included": folds_included,
        "folds_missing": folds_missing,
        "provenance": {"bundled_with": environment_info(), "run_environment": environment,
                       "fold_jobs": {str(record["fold"]): record.get("run_by") for record in records},
                       "run": {"name": experiment.name, "arm": arm.name,
                               "made_from": sorted({str(record.get("made_from")) for record in records})}},
    }


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def card_markdown(card: dict) -> str:
    """A short human-readable model card from `card.json`'s content."""
    model, data, cv, cal = card["model"], card["training_data"], card["cv_metrics"], card["calibration"]
    lines = [f"# Model card: {model['arm']} ({model['registry_name']})", "",
             f"**Intended use:** {card['intended_use']}", "",
             f"- Classes: {', '.join(model['classes'])}; views: {model['views']}"
             + (f" (fusion {model['fusion']})" if model["fusion"] else ""),
             f"- Ensemble: {model['ensemble']}; folds included {card['folds_included']}"
             + (f", folds not finished (left out) {card['folds_missing']}" if card["folds_missing"] else ""),
             f"- Training data: adapter `{data['dataset_adapter']}`, task `{data['task']['name']}` "
             f"({data['task_source']}); {data['patients']} patients, {data[data['unit'] + 's']} {data['unit']}s",
             f"- Labels: {data['label_definition']}",
             "- Per class: " + ", ".join(f"{name} {counts['patients']} patients" for name, counts in
                                         data["per_class"].items()),
             "- Transfer chain: " + "; ".join(sorted({f"{link['chain']}" for link in card["transfer_chain"]})),
             *([f"- Training inputs (predict refuses others): BitsStored {inputs.get('bits_stored')}, formats "
                f"{inputs.get('source_formats')}, photometric {inputs.get('photometric')}"]
               if (inputs := card.get("inputs")) else []),
             "", f"## Cross-validated performance ({cv['unit']}s, {cv['ci']}, {cv['n_boot']} resamples)", "",
             "| metric | pooled | 95% CI | mean over folds | std |", "|---|---:|---:|---:|---:|"]
    for row in cv["metrics"]:
        lines.append(f"| {row['metric']} | {_fmt(row.get('pooled'))} | {_fmt(row.get('ci_low'))} - "
                     f"{_fmt(row.get('ci_high'))} | {_fmt(row.get('mean'))} | {_fmt(row.get('std'))} |")
    lines += ["", "## Calibration", "",
              f"Temperature T = {cal['temperature']:.4g} ({cal['fitted_on']}, n = {cal['n']}). ECE ({cal['ece_bins']} "
              f"bins, top label) {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}; NLL {cal['nll_before']:.4f} -> "
              f"{cal['nll_after']:.4f}. Note: {cal['note']}.",
              *[f"Warning: {text}." for text in cal.get("warnings", [])], "",
              "## Provenance", "",
              f"tlese {card['provenance']['bundled_with'].get('tlese')}, torch "
              f"{card['provenance']['bundled_with'].get('torch')}; run commit "
              f"{card['provenance']['run_environment'].get('git_commit', 'unknown')}, bundled at commit "
              f"{card['provenance']['bundled_with'].get('git_commit')}. Full record: card.json.", ""]
    return "\n".join(lines)


def _write_zip(folder: Path, target: Path) -> None:
    """The bundle's files at the root of a zip, in name order with a fixed date: same files, same zip bytes."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(temporary, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    os.replace(temporary, target)


def _training_inputs(experiment, limit: int = 500) -> dict:
    """Input properties of the training images, from the headers of the target table's files (`read_header`; at
    most `limit` of them, evenly spaced): the BitsStored values, photometric interpretations and source formats
    seen. `predict` refuses an image whose bit depth or source format is outside these sets. Any failure (data no
    longer there, adapter error): {"bits_stored": "unknown", ...}, and predict refuses nothing for it."""
    from tlese.data.datasets import get_adapter
    from tlese.data.io import read_header

    unknown = {"bits_stored": "unknown", "photometric": "unknown", "source_formats": "unknown",
               "files_read": 0, "files_total": None}
    try:
        source = experiment.target
        paths = list(get_adapter(source.adapter)(source.root, **source.options)["path"])
        step = max(1, -(-len(paths) // limit))
        chosen = paths[::step]
        headers = []
        for path in chosen:
            try:
                headers.append(read_header(path))
            except Exception:  # an unreadable file was left out of training too
                continue
    except Exception as error:
        return {**unknown, "why": f"training table not readable ({type(error).__name__})"}
    if not headers:
        return {**unknown, "files_total": len(paths)}
    return {"bits_stored": sorted({int(h.bits_stored) for h in headers}),
            "photometric": sorted({str(h.photometric) for h in headers}),
            "source_formats": sorted({str(h.source_format) for h in headers}),
            "files_read": len(headers), "files_total": len(paths),
            "from": f"headers of {len(headers)} of the {len(paths)} files of the {source.adapter} table"}


def make_bundle(run_dir: str | Path, arm: str, out: str | Path, zip: bool = False, intended_use: str | None = None,
                n_boot: int | None = None) -> Path:
    """Freeze the finished folds of `arm` in run folder `run_dir` into a bundle at `out` (a folder; with `zip`, the
    file `out` with a .zip suffix) and return its path.

    Each finished fold's model (rebuilt by `tlese.train.trained.load_trained`) becomes one safetensors file; the
    card's metrics come from the arm's out-of-fold predictions (checked against the run's fold file as `merge`
    checks them), with `n_boot` patient-bootstrap resamples (default: the run's `bootstrap`); the temperature is
    fitted on the same out-of-fold predictions. `intended_use` defaults to research use only. The bundle is loaded
    back and verified before it is moved into place; `out` must not exist yet (or be an empty folder).
    """
    from safetensors.torch import save_file

    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams
    from tlese.data.splits import load_folds
    from tlese.data.tasks import get_task
    from tlese.serve.calibration import calibration_summary
    from tlese.train.cv import reload_experiment
    from tlese.train.merge import collect_arm
    from tlese.train.rundir import RunDir, read_json
    from tlese.train.stages import model_kwargs
    from tlese.train.trained import load_trained
    from tlese.vocab import COMMON_SIDE, DUAL_VIEW_ORDER

    run = RunDir(Path(run_dir))
    run.require()
    experiment = reload_experiment(run.path)
    arm_config = experiment.arm(arm)
    arm_dir = run.arm(arm_config.name)
    finished = arm_dir.predicted_folds()
    if not finished:
        raise BundleError(f"{arm_dir.path}: no finished fold to bundle; run `tlese cv` first")
    out = Path(out)
    target = out.with_name(out.name if out.suffix == ".zip" else f"{out.name}.zip") if zip else out
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise BundleError(f"{target} exists; choose another --out (a bundle is never overwritten)")

    task = get_task(experiment.target.task)
    class_names = list(task.classes)
    folds_file = run.folds_file(experiment.seed, experiment.folds)
    results = collect_arm(run, arm_config, load_folds(folds_file))  # the checks merge makes, before any number
    if results is None:
        raise BundleError(f"{arm_dir.path}: its finished folds hold no predictions")
    records = [fold_dir.record() for fold_dir in finished]
    folds_included = [fold_dir.fold for fold_dir in finished]
    unit_frame, unit = _oof_frame(results, experiment.views)
    if set(unit_frame["fold"].astype(int)) - set(folds_included):
        raise BundleError(f"{arm_dir.path}: out-of-fold predictions of folds outside {folds_included}")
    probability_columns = [f"prob_{name}" for name in class_names]
    calibration = calibration_summary(unit_frame[probability_columns].to_numpy(dtype=np.float64),
                                      unit_frame["target"].to_numpy(dtype=int))

    params = PreprocessParams.build(experiment.image_size, task.modality, experiment.preprocess)
    create_kwargs = model_kwargs(arm_config, experiment, len(class_names), experiment.views)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.getpid()}.building"
    shutil.rmtree(work, ignore_errors=True)
    (work / WEIGHTS_DIR).mkdir(parents=True)
    (work / REFERENCE_DIR).mkdir()
    try:
        weights = []
        for fold_dir in finished:
            trained = load_trained(run.path, arm_config.name, fold_dir.fold)
            if trained.class_names != class_names:
                raise BundleError(f"{fold_dir.path}: classes {trained.class_names} differ from the task's "
                                  f"{class_names}")
            state = {key: value.detach().cpu().contiguous().clone()
                     for key, value in trained.model.state_dict().items()}
            name = weight_file(fold_dir.fold)
            # One metadata key only: safetensors writes several in a random order, and a bundle of the same run
            # should have the same bytes (the fold and model are in model.json).
            save_file(state, str(work / name), metadata={"format": "pt"})
            weights.append({"file": name, "fold": fold_dir.fold, "sha256": _sha256_bytes((work / name).read_bytes()),
                            "checkpoint_sha256": _sha256_bytes(trained.checkpoint.read_bytes())})
        item_shape = ((2,) if experiment.views == "dual" else ()) + (experiment.in_chans, params.size, params.size)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"registry_name": arm_config.model, "create_kwargs": create_kwargs},
            "views": experiment.views,
            "view_order": [str(view.value) for view in DUAL_VIEW_ORDER] if experiment.views == "dual" else None,
            "fusion": experiment.fusion if experiment.views == "dual" else None,
            "class_names": class_names,
            "task": task.to_dict(),
            "task_source": experiment.target.task if isinstance(experiment.target.task, str) else "inline",
            "preprocess": {"params": params.to_dict(), "fingerprint": params.fingerprint(),
                           "version": PREPROCESS_VERSION, "common_side": str(COMMON_SIDE.value)},
            "input": {"shape": list(item_shape), "dtype": "float32", "range": [0.0, 1.0],
                      "image_size": params.size, "in_chans": experiment.in_chans,
                      "batch_shape": "(B, 2, C, H, W), CC then MLO" if experiment.views == "dual" else "(B, C, H, W)"},
            "weights": weights,
            "calibration": {"method": "temperature", "temperature": calibration["temperature"],
                            "applied_to": "ensemble-mean probability"},
            "reference": {"file": EXPECTED_FILE, "tolerance": TOLERANCE},
            "run": {"name": experiment.name, "arm": arm_config.name, "transfer": arm_config.transfer},
        }
        (work / MODEL_FILE).write_text(_dump(meta))

        environment = read_json(run.environment_file) if run.environment_file.is_file() else {}
        stage1 = read_json(arm_dir.stage1_summary_file) if arm_dir.stage1_summary_file.is_file() else None
        data_summary = None
        if run.data_summary_file.is_file():
            import pandas as pd

            data_summary = pd.read_csv(run.data_summary_file, keep_default_na=False).to_dict("records")
        all_folds = list(range(experiment.folds))
        card = _card(experiment=experiment, arm=arm_config, task=task, results=results, unit_frame=unit_frame,
                     unit=unit, calibration=calibration, records=records, folds_included=folds_included,
                     folds_missing=[k for k in all_folds if k not in folds_included], stage1=stage1,
                     data_summary=data_summary, environment=environment,
                     intended_use=intended_use or DEFAULT_INTENDED_USE,
                     n_boot=experiment.bootstrap if n_boot is None else n_boot)
        card["inputs"] = _training_inputs(experiment)
        (work / CARD_FILE).write_text(_dump(card))
        (work / CARD_MARKDOWN).write_text(card_markdown(_clean(card)))

        # Expected outputs of the reference inputs, from the models as the bundle holds them.
        models = [_build_model(meta, (work / entry["file"]).read_bytes(), entry["file"], str(work))
                  for entry in weights]
        loaded = Bundle(path=work, sha256="", meta=meta, card=card, models=models, folds=folds_included,
                        temperature=calibration["temperature"], preprocess=params, class_names=class_names,
                        views=experiment.views, image_size=params.size, in_chans=experiment.in_chans)
        references = []
        for index, x in enumerate(reference_inputs(loaded.input_shape)):
            name = f"{REFERENCE_DIR}/ref_{index}.npy"
            np.save(work / name, x, allow_pickle=False)
            outputs = loaded.predict_arrays(x[None])
            references.append({"file": name, "per_model": outputs["per_model"][:, 0].tolist(),
                               "raw": outputs["raw"][0].tolist(), "calibrated": outputs["calibrated"][0].tolist()})
        (work / EXPECTED_FILE).write_text(_dump({"tolerance": TOLERANCE, "folds": folds_included,
                                                 "references": references}))
        write_checksums(work)
        load_bundle(work)  # what is shipped is what loads
        if zip:
            _write_zip(work, target)
            shutil.rmtree(work)
        else:
            if target.exists():
                target.rmdir()
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target
