"""Release step of training: freeze a finished run's arm into a bundle (`tlese bundle`).

The bundle format and its loader live in `tlese.bundle` and need no training code; this module is the maker: it reads
the run (models only through `tlese.train.trained.load_trained`; calibration on the out-of-fold predictions only),
writes the files of `tlese.bundle.format` and verifies the result by loading it back.
"""

from __future__ import annotations

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
    Bundle,
    BundleError,
    _build_model,
    _clean,
    _dump,
    _sha256_bytes,
    load_bundle,
    reference_inputs,
    weight_file,
    write_checksums,
)

CALIBRATION_NOTE = ("fitted on single-fold out-of-fold probabilities (each patient predicted by the one fold model "
                    "that never trained on them), applied to the ensemble-mean probability: an approximation (the "
                    "mean of several models is already less confident than one of them, so T may over-soften)")
SMALL_CALIBRATION_SET = 100


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
    from tlese.bundle.calibration import T_MAX, T_MIN

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

    from tlese.bundle.calibration import calibration_summary
    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams
    from tlese.data.splits import load_folds
    from tlese.data.tasks import get_task
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
