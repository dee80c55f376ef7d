"""Release step of training: freeze a finished run's arm into a bundle (`tlese bundle`).

The bundle format and its loader live in `tlese.bundle` and need no training code; this module is the maker. It copies
the model spec each fold recorded when it trained (never recomputed from the run's YAML), writes the fold models as
safetensors, calibrates the ensemble (checked on held-out patients, applied only where it helps), fits the
out-of-distribution model on the training images' features, records reference outputs, exports one ONNX file per fold
(checked against torch), with `int8` adds their int8 quantisation when it keeps the out-of-fold answers
(`tlese.train.int8`), writes the checksums and, given a key, signs them. The result is loaded back and verified
before it is moved into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tlese.bundle.format import (
    CARD_FILE,
    CARD_MARKDOWN,
    DEFAULT_INTENDED_USE,
    EXPECTED_FILE,
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    REFERENCE_DIR,
    TOLERANCE,
    WEIGHTS_DIR,
    BundleError,
    _clean,
    _dump,
    _sha256_bytes,
    load_bundle,
    reference_inputs,
    weight_file,
    write_checksums,
)

OOD_FILE = "ood.safetensors"
SYNTH_MARKER = "synth_info.json"
"""What `tlese synth` writes beside its data (tlese.data.synth.synthesize): how a bundle knows it is synthetic."""
SYNTH_GENERATOR = "tlese.data.synth"
SYNTHETIC_TASK_PREFIX = "synth_"
FEATURE_BATCH = 32


def fold_spec(specs: dict, where: Path) -> Any:
    """The one model spec (`tlese.models.spec.ModelSpec`) of the folds `specs` ({fold: the spec its record
    carries}); folds that disagree are a BundleError naming them and what differs."""
    from tlese.train.rundir import differences

    folds_of: dict[str, list[int]] = {}
    for fold, spec in specs.items():
        folds_of.setdefault(json.dumps(spec.to_dict(), sort_keys=True), []).append(fold)
    if len(folds_of) > 1:
        (first, first_folds), *others = folds_of.items()
        changes = "; ".join(f"folds {first_folds} vs folds {folds}: "
                            + ", ".join(differences(json.loads(first), json.loads(key))[:6])
                            for key, folds in others)
        raise BundleError(f"{where}: the folds trained different models ({changes}); one bundle is one model: "
                          "retrain the odd folds with the others' settings")
    return next(iter(specs.values()))


def synthetic_origin(experiment, task) -> str | None:
    """Why the run's target data counts as synthetic (made by `tlese synth`), or None: the generator's record
    (`synth_info.json`) in the data folder or one of its two parents, or a `synth_*` task."""
    root = Path(str(experiment.target.root))
    for folder in (root, *list(root.parents)[:2]):
        marker = folder / SYNTH_MARKER
        if marker.is_file():
            try:
                record = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if str(record.get("generator", "")).startswith(SYNTH_GENERATOR):
                return f"{marker.name} of {record['generator']} (version {record.get('version')}) beside the data"
    if task.name.startswith(SYNTHETIC_TASK_PREFIX):
        return f"task {task.name} (a task of tlese's synthetic data)"
    return None


def _validated_on(synthetic: bool, adapter: str, folds: list[int], patients: int) -> str:
    if synthetic:
        return (f"{len(folds)}-fold patient-level cross-validation on synthetic images made by tlese synth only "
                f"({patients} synthetic patients); never validated on patients")
    return (f"{len(folds)}-fold patient-level cross-validation on {patients} patients of the {adapter} data; no "
            "external validation recorded in this bundle")


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


def _card(*, experiment, arm, spec, task, results, records, folds_included, folds_missing, stage1, data_summary,
          environment, intended_use, n_boot, calibration, ood, synthetic) -> dict:
    from tlese.evaluate.tables import summary_table
    from tlese.provenance import environment_info

    class_names = list(spec.class_names)
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
    patients = int(predictions["patient_id"].nunique())
    return {
        "intended_use": intended_use,
        "model": {"arm": arm.name, "registry_name": spec.registry_name, "transfer": arm.transfer, "views": spec.views,
                  "fusion": spec.fusion, "classes": class_names,
                  "ensemble": f"mean probability of {len(folds_included)} fold models; disagreement = max over "
                              "classes of their standard deviation"},
        "training_data": {
            "synthetic": synthetic is not None,
            **({"synthetic_because": synthetic} if synthetic else {}),
            "validated_on": _validated_on(synthetic is not None, experiment.target.adapter, folds_included, patients),
            "dataset_adapter": experiment.target.adapter, "task": task.to_dict(),
            "task_source": "registered" if isinstance(experiment.target.task, str) else "inline",
            "label_definition": _label_definition(task, experiment.target.adapter),
            "patients": patients, "unit": results.unit,
            f"{results.unit}s": int(len(predictions)), "per_class": per_class, "data_summary": data_summary},
        "cv_metrics": {"unit": results.unit, "folds": folds_included, "n_boot": n_boot,
                       "ci": "95% patient-level bootstrap of the pooled out-of-fold predictions",
                       "mean_std": "over folds", "metrics": _metrics_records(summary)},
        "transfer_chain": chain,
        "stage1": stage1,
        "calibration": calibration,
        "ood": ood,
        "folds_included": folds_included,
        "folds_missing": folds_missing,
        "provenance": {"bundled_with": environment_info(), "run_environment": environment,
                       "fold_jobs": {str(record["fold"]): record.get("run_by") for record in records},
                       "run": {"name": experiment.name, "arm": arm.name,
                               "made_from": sorted({str(record.get("made_from")) for record in records})}},
    }


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _change(section: dict, name: str) -> str:
    before, after = section.get(f"{name}_before"), section.get(f"{name}_after")
    return f"{name.upper()} {_fmt(before)} -> {_fmt(after)}" if before is not None or after is not None else ""


def _calibration_lines(cal: dict) -> list[str]:
    applied = "applied" if cal.get("applied") else "NOT applied (predictions use T = 1)"
    checked = ", ".join(part for part in (_change(cal, "nll"), _change(cal, "ece")) if part)
    return [f"Temperature T = {_fmt(cal.get('temperature'))}: {applied}; meant for {cal.get('applied_to')}.",
            f"Fitted on: {cal.get('fitted_on', 'n/a')}. Checked on: {cal.get('checked_on', 'n/a')}"
            + (f" ({checked})" if checked else "") + ".",
            *([f"Why: {cal['reason']}."] if cal.get("reason") else []),
            *([cal["claim"]] if cal.get("claim") else []),
            *[f"Warning: {text}." for text in cal.get("warnings", [])]]


def _ood_lines(ood: dict | None) -> list[str]:
    if not ood:
        return ["None: this bundle cannot tell an image unlike its training images."]
    if ood.get("fitted") is False:
        return [f"No OOD check: {ood.get('reason')}. This bundle cannot tell an image unlike its training images "
                f"(fitted on {ood.get('fitted_on')})."]
    rate = ood.get("false_flag_rate")
    return [f"Method: {ood.get('method')}; fitted on {ood.get('fitted_on')}. A {ood.get('unit', 'case')} scoring "
            f"above {_fmt(ood.get('threshold'))} is flagged out-of-distribution (unlike the training images); "
            f"training {ood.get('unit', 'case')}s held out of the fit were flagged at a rate of "
            f"{'n/a' if rate is None else f'{rate:.1%}'}."]


def _small(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _int8_lines(check: dict) -> list[str]:
    unit, limit, flags = check.get("unit", "case"), check.get("threshold"), check.get("ood_flag_changed")
    if check.get("passed"):
        verdict = (f"Offered: the bundle carries int8 ONNX files (onnx/fold_<k>.int8.onnx) for the ONNX Runtime int8 "
                   f"runtime, because the macro AUC moved by at most {limit} on the out-of-fold {unit}s.")
    else:
        verdict = f"Not offered: {check.get('reason')}; the bundle carries no int8 files (use the fp32 runtimes)."
    change = check.get("macro_auc_change")
    numbers = (f"Checked on {check.get('n_oof')} out-of-fold {unit}s, each by its own fold's model: macro AUC "
               f"{_fmt(check.get('macro_auc_fp32'))} (fp32 ONNX) -> {_fmt(check.get('macro_auc_int8'))} (int8), "
               f"change {'n/a' if change is None else f'{change:+.4f}'} (limit +-{limit}); largest probability "
               f"change {_small(check.get('max_abs_prob_change'))}, mean {_small(check.get('mean_abs_prob_change'))}; "
               f"predicted class changed for {100 * (check.get('predicted_class_changed') or 0):.1f} % of them; "
               f"ensemble: largest probability change {_small(check.get('ensemble_max_abs_prob_change'))}"
               + ("" if flags is None else f", OOD flag changed for {flags} of {check.get('n_oof')}") + ".")
    calibration = check.get("calibration") or {}
    per_fold = ", ".join(f"fold {fold}: {n}" for fold, n in (calibration.get("items_per_fold") or {}).items())
    return [verdict, "", numbers,
            f"Calibration: {calibration.get('method', 'n/a')}, on {calibration.get('from', 'n/a')} ({per_fold})."]


def card_markdown(card: dict) -> str:
    """A short human-readable model card from `card.json`'s content; its first lines say what the model was trained
    and validated on (and when that was synthetic data)."""
    model, data, cv = card["model"], card["training_data"], card["cv_metrics"]
    provenance = card["provenance"]
    if data.get("synthetic"):
        warning = ["**Trained on SYNTHETIC data (made by tlese synth), not on patients: its numbers say the pipeline "
                   "works, nothing about real mammograms. Do not use it on patients.**", ""]
    else:
        warning = []
    lines = [f"# Model card: {model['arm']} ({model['registry_name']})", "", *warning,
             f"**Validated on:** {data.get('validated_on', 'not recorded')}.", "",
             f"**Intended use:** {card['intended_use']}", "",
             f"- Classes: {', '.join(model['classes'])}; views: {model['views']}"
             + (f" (fusion {model['fusion']})" if model["fusion"] else ""),
             f"- Ensemble: {model['ensemble']}; folds included {card['folds_included']}"
             + (f", folds not finished (left out) {card['folds_missing']}" if card["folds_missing"] else ""),
             f"- Training data: {'SYNTHETIC, ' if data.get('synthetic') else ''}adapter `{data['dataset_adapter']}`, "
             f"task `{data['task']['name']}` ({data['task_source']}); {data['patients']} patients, "
             f"{data[data['unit'] + 's']} {data['unit']}s",
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
    lines += ["", "## Calibration", "", *_calibration_lines(card["calibration"]), "",
              "## Out-of-distribution check", "", *_ood_lines(card.get("ood")), "",
              *(["## int8 (ONNX Runtime)", "", *_int8_lines(card["int8"]), ""] if card.get("int8") else []),
              "## Provenance", "",
              f"tlese {provenance['bundled_with'].get('tlese')}, torch {provenance['bundled_with'].get('torch')}; run "
              f"commit {provenance['run_environment'].get('git_commit', 'unknown')}, bundled at commit "
              f"{provenance['bundled_with'].get('git_commit')}. Full record: card.json.", ""]
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


def training_features(experiment, spec, models) -> tuple[np.ndarray, str]:
    """The ensemble's penultimate features (`tlese.bundle.ood.penultimate_features`) of the run's training images:
    the target table's images prepared (from the cache) exactly as the folds recorded, one row per breast for
    dual-view models, per image otherwise. Returns (features (N, D), unit)."""
    features, unit, _ = _training_features(experiment, spec, models)
    return features, unit


def _training_features(experiment, spec, models) -> tuple[np.ndarray, str, np.ndarray]:
    """`training_features` plus the patient of each row (N,), so a patient's breasts stay in one split."""
    import torch
    from torch.utils.data import DataLoader

    from tlese.bundle.ood import penultimate_features
    from tlese.train.data import make_dataset, prepare

    data = prepare(experiment.target, experiment, preprocess=spec.preprocess)  # as the folds trained, not the YAML
    dataset = make_dataset(data.table, spec.views, data.task.modality, train=False, recipe=experiment.target_recipe)
    rows = dataset.breasts if spec.views == "dual" else dataset.table  # item order
    batches = []
    with torch.inference_mode():
        for images, _, _ in DataLoader(dataset, batch_size=FEATURE_BATCH, shuffle=False, num_workers=0):
            batches.append(np.asarray(penultimate_features(models, images), dtype=np.float64))
    if not batches:
        raise BundleError(f"{experiment.target.root}: no training image left to fit the out-of-distribution model on")
    return (np.concatenate(batches), "breast" if spec.views == "dual" else "image",
            rows["patient_id"].astype(str).to_numpy())


def _calibrate(unit_frame, class_names: list[str], seed: int) -> dict:
    """The ensemble's temperature, cross-fitted over the folds and applied only where held-out patients confirm it
    helps (`tlese.bundle.calibration.fit_ensemble_calibration`), on the out-of-fold predictions."""
    from tlese.bundle.calibration import fit_ensemble_calibration

    probabilities = unit_frame[[f"prob_{name}" for name in class_names]].to_numpy(dtype=np.float64)
    return fit_ensemble_calibration(probabilities, unit_frame["target"].to_numpy(dtype=int),
                                    unit_frame["fold"].to_numpy(dtype=int),
                                    unit_frame["patient_id"].astype(str).to_numpy(), seed=seed)


def fit_bundle_ood(experiment, spec, models, seed: int) -> tuple[Any, dict]:
    """The bundle's out-of-distribution model (`tlese.bundle.ood.fit_ood`, split by patient) fitted on the
    ensemble's features of the training images, or None when those features are degenerate (the same for every
    image); and its card section ("fitted": true with the model's meta, or false with the "reason")."""
    from tlese.bundle.ood import DegenerateFeaturesError, fit_ood

    features, unit, patients = _training_features(experiment, spec, models)
    fitted_on = (f"the ensemble's penultimate features of the {len(features)} training {unit}s of the "
                 f"{experiment.target.adapter} data, prepared as the folds trained on them")
    try:
        ood = fit_ood(features, views=2 if spec.views == "dual" else 1, seed=seed, groups=patients)
    except DegenerateFeaturesError as error:
        return None, {"fitted": False, "unit": unit, "n_fitted_on": int(len(features)), "fitted_on": fitted_on,
                      "reason": error.reason}
    return ood, {**ood.meta(), "fitted": True, "unit": unit, "n_fitted_on": int(len(features)),
                 "fitted_on": fitted_on}


def _signer_public_key(private_key: Path) -> bytes:
    """The PEM public key of an Ed25519 private key file (read before any work, so a wrong key fails first)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise BundleError(f"{private_key}: no private key there; make a key pair with `tlese keygen --out DIR`") \
            from None
    except (OSError, ValueError, TypeError) as error:
        raise BundleError(f"{private_key}: not a readable unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{private_key}: a {type(key).__name__}, not an Ed25519 key; make one with `tlese keygen`")
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(folder: Path, signer_public_key: bytes | None):
    """Load the finished folder as a user would: checksums, references and, when signed, the signature against the
    signer's own public key."""
    if signer_public_key is None:
        return load_bundle(folder, allow_unsigned=True)
    import tempfile

    with tempfile.TemporaryDirectory() as keys:
        (Path(keys) / "signer.pub").write_bytes(signer_public_key)
        return load_bundle(folder, trusted_keys=keys)


def make_bundle(run_dir: str | Path, arm: str, out: str | Path, zip: bool = False, intended_use: str | None = None,
                n_boot: int | None = None, sign_key: str | Path | None = None, onnx: bool = True,
                int8: bool = False) -> Path:
    """Freeze the finished folds of `arm` in run folder `run_dir` into a bundle at `out` (a folder; with `zip`, the
    file `out` with a .zip suffix) and return its path.

    The model (registry name, arguments, classes, preprocessing) is the spec the folds recorded when they trained,
    never the run's YAML read again; each finished fold's model (rebuilt from that spec by
    `tlese.train.runs.FinishedRun`) becomes one safetensors file. The card's metrics come from the arm's out-of-fold
    predictions (checked as `merge` checks them), with `n_boot` patient-bootstrap resamples (default: the run's
    `bootstrap`); the temperature is cross-fitted on the same predictions and applied only if held-out patients
    confirm it helps; the out-of-distribution model is fitted on the ensemble's features of the training images.
    With `onnx` (default) each fold model is also exported to ONNX and checked against torch on the reference
    inputs; with `int8` (needs `onnx`) each ONNX file is also quantised to int8 and checked on the out-of-fold
    items (`tlese.train.int8.release_int8`): the int8 files are added only when the macro AUC moves by at most
    `INT8_MAX_AUC_CHANGE`, the check is recorded in model.json and the card either way. With `sign_key` (an Ed25519
    private key, `tlese keygen`) the bundle is signed. `intended_use` defaults
    to research use only. The bundle is loaded back and verified (with the signer's public key when signed) before
    it is moved into place; `out` must not exist yet (or be an empty folder).
    """
    from safetensors.torch import save_file

    from tlese.train.runs import FinishedRun
    from tlese.vocab import COMMON_SIDE, DUAL_VIEW_ORDER

    if int8 and not onnx:
        raise BundleError("int8 quantises the bundle's ONNX files: it cannot be combined with --no-onnx")
    run = FinishedRun(run_dir)
    experiment = run.experiment
    arm_config = run.arm(arm)
    arm_dir = run.arm_dir(arm_config.name)
    finished = run.finished_folds(arm_config.name)
    if not finished:
        raise BundleError(f"{arm_dir.path}: no finished fold to bundle; run `tlese cv` first")
    out = Path(out)
    target = out.with_name(out.name if out.suffix == ".zip" else f"{out.name}.zip") if zip else out
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise BundleError(f"{target} exists; choose another --out (a bundle is never overwritten)")
    sign_key = Path(sign_key) if sign_key is not None else None
    signer = _signer_public_key(sign_key) if sign_key is not None else None

    spec = fold_spec(run.model_specs(arm_config.name), arm_dir.path)
    task = run.task
    class_names = list(spec.class_names)
    if list(task.classes) != class_names:
        raise BundleError(f"{run.dir.config_file}: task {task.name} has classes {list(task.classes)}, but the folds "
                          f"trained on {class_names}; was the config edited after training?")
    results = run.predictions(arm_config.name)  # the checks merge makes, before any number
    if results is None:
        raise BundleError(f"{arm_dir.path}: its finished folds hold no predictions")
    records = [fold_dir.record() for fold_dir in finished]
    folds_included = [fold_dir.fold for fold_dir in finished]
    unit_frame, _ = _oof_frame(results, spec.views)
    if set(unit_frame["fold"].astype(int)) - set(folds_included):
        raise BundleError(f"{arm_dir.path}: out-of-fold predictions of folds outside {folds_included}")
    calibration = _calibrate(unit_frame, class_names, experiment.seed)
    synthetic = synthetic_origin(experiment, task)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.getpid()}.building"
    shutil.rmtree(work, ignore_errors=True)
    (work / WEIGHTS_DIR).mkdir(parents=True)
    (work / REFERENCE_DIR).mkdir()
    try:
        weights, models = [], []
        for fold_dir in finished:
            trained = run.trained(arm_config.name, fold_dir.fold)
            if list(trained.class_names) != class_names:
                raise BundleError(f"{fold_dir.path}: classes {trained.class_names} differ from the spec's "
                                  f"{class_names}")
            state = {key: value.detach().cpu().contiguous().clone()
                     for key, value in trained.model.state_dict().items()}
            name = weight_file(fold_dir.fold)
            # One metadata key only: safetensors writes several in a random order, and a bundle of the same run
            # should have the same bytes (the fold and model are in model.json).
            save_file(state, str(work / name), metadata={"format": "pt"})
            weights.append({"file": name, "fold": fold_dir.fold, "sha256": _sha256_bytes((work / name).read_bytes()),
                            "checkpoint_sha256": _sha256_bytes(trained.checkpoint.read_bytes())})
            models.append(trained.model.eval())
        ood, ood_card = fit_bundle_ood(experiment, spec, models, experiment.seed)
        if ood is not None:
            save_file({key: value.contiguous() for key, value in ood.to_tensors().items()}, str(work / OOD_FILE),
                      metadata={"format": "pt"})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"registry_name": spec.registry_name, "create_kwargs": dict(spec.create_kwargs)},
            "model_spec": spec.to_dict(),
            "views": spec.views,
            "view_order": [str(view.value) for view in DUAL_VIEW_ORDER] if spec.views == "dual" else None,
            "fusion": spec.fusion,
            "class_names": class_names,
            "task": task.to_dict(),
            "task_source": experiment.target.task if isinstance(experiment.target.task, str) else "inline",
            "preprocess": {"params": dict(spec.preprocess), "fingerprint": spec.preprocess_fingerprint,
                           "version": spec.preprocess_version, "common_side": str(COMMON_SIDE.value)},
            "input": {"shape": list(spec.input_shape), "dtype": "float32", "range": [0.0, 1.0],
                      "image_size": spec.image_size, "in_chans": spec.in_chans,
                      "batch_shape": "(B, 2, C, H, W), CC then MLO" if spec.views == "dual" else "(B, C, H, W)"},
            "weights": weights,
            "calibration": {key: calibration[key] for key in ("method", "temperature", "applied", "applied_to")},
            **({} if ood is None else {"ood": {"file": OOD_FILE, **ood.meta(),
                                               "sha256": _sha256_bytes((work / OOD_FILE).read_bytes())}}),
            "reference": {"file": EXPECTED_FILE, "tolerance": TOLERANCE},
            "run": {"name": experiment.name, "arm": arm_config.name, "transfer": arm_config.transfer},
        }
        (work / MODEL_FILE).write_text(_dump(meta))

        stage1 = json.loads(arm_dir.stage1_summary_file.read_text()) if arm_dir.stage1_summary_file.is_file() else None
        summary = run.data_summary()
        data_summary = None if summary is None else summary.to_dict("records")
        card = _card(experiment=experiment, arm=arm_config, spec=spec, task=task, results=results, records=records,
                     folds_included=folds_included,
                     folds_missing=[k for k in range(experiment.folds) if k not in folds_included], stage1=stage1,
                     data_summary=data_summary, environment=run.environment,
                     intended_use=intended_use or DEFAULT_INTENDED_USE,
                     n_boot=experiment.bootstrap if n_boot is None else n_boot, calibration=calibration,
                     ood=ood_card, synthetic=synthetic)
        card["inputs"] = _training_inputs(experiment)
        (work / CARD_FILE).write_text(_dump(card))
        (work / CARD_MARKDOWN).write_text(card_markdown(_clean(card)))

        # Expected outputs of the reference inputs, from the bundle as the loader reads it (no references yet).
        write_checksums(work)
        draft = load_bundle(work, check_references=False, allow_unsigned=True)
        references = []
        for index, x in enumerate(reference_inputs(draft.input_shape)):
            name = f"{REFERENCE_DIR}/ref_{index}.npy"
            np.save(work / name, x, allow_pickle=False)
            outputs = draft.predict_arrays(x[None])
            references.append({"file": name, "per_model": outputs["per_model"][:, 0].tolist(),
                               **{key: outputs[key][0].tolist() for key in ("raw", "calibrated", "ood_score")
                                  if key in outputs}})
        (work / EXPECTED_FILE).write_text(_dump({"tolerance": TOLERANCE, "folds": folds_included,
                                                 "references": references}))
        if onnx:  # one ONNX file per fold, its parity with torch on the reference inputs measured (<= TOLERANCE)
            from tlese.bundle.onnx import export_bundle_onnx

            meta["onnx"] = export_bundle_onnx(draft, work, references=reference_inputs(draft.input_shape))
            if int8:  # only a check that passes leaves int8 files; the record goes into model.json and the card
                from tlese.train.int8 import release_int8

                meta["int8"] = release_int8(run, arm_config.name, spec, draft, work, seed=experiment.seed)
                card["int8"] = meta["int8"]["check"]
                (work / CARD_FILE).write_text(_dump(card))
                (work / CARD_MARKDOWN).write_text(card_markdown(_clean(card)))
            (work / MODEL_FILE).write_text(_dump(meta))
        write_checksums(work)
        if sign_key is not None:
            from tlese.bundle.signing import sign_bundle_folder

            sign_bundle_folder(work, sign_key)
        _verify(work, signer)  # what is shipped is what loads
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
