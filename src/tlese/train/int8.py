"""int8 that keeps its answers: the bundle maker's int8 step (`tlese bundle --int8`).

For each fold model of the bundle, its fp32 ONNX file is quantised statically (`tlese.bundle.onnx.quantize_onnx`:
QDQ, per-channel int8 weights, uint8 activations, MinMax ranges) on a seeded sample of at most
`CALIBRATION_ITEMS` of that fold's own training items (patients of role "train" in the fold's split.csv; never its
validation or held-out patients). The fp32 and the int8 files then run on each fold's held-out items, prepared
exactly as the fold predicted them (the same rows, in the same order, as its recorded out-of-fold predictions), and
the pooled out-of-fold probabilities (each item by its own fold's model, no ensemble) are compared as the card's
out-of-fold AUC is computed (`tlese.evaluate.metrics.classification_metrics`). The check passes when the macro AUC
moves by at most `INT8_MAX_AUC_CHANGE`; only then does the bundle carry the int8 files (onnx/fold_<k>.int8.onnx)
and the expected int8 outputs of its reference inputs. Either way model.json and the card record the check.

Cost: every held-out item runs through every fold model in both precisions (the ensemble's OOD flag needs all
of them), i.e. 2 x folds ONNX Runtime calls per item, plus one quantisation per fold.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tlese.bundle.format import INT8_EXPECTED_FILE, INT8_TOLERANCE, BundleError, _dump, reference_inputs

INT8_MAX_AUC_CHANGE = 0.005
"""The largest |macro AUC change| (int8 - fp32, pooled out-of-fold) with which a bundle offers its int8 files."""
CALIBRATION_ITEMS = 64
"""At most this many training items (breasts for dual-view models, images otherwise) calibrate each fold."""
CALIBRATION_BATCH = 8
NEAR_TIE = 1e-3  # a failed check whose probabilities all moved less than this says the AUC turned on near-ties
EVAL_BATCH = 16


def _fold_rows(data, fold_dir, views: str, modality: str, recipe) -> tuple:
    """(training dataset, held-out dataset, the held-out dataset's rows) of one fold, from the patients its
    split.csv recorded; items prepared without augmentation, as the fold predicted them."""
    from tlese.train.data import make_dataset

    split = fold_dir.split()
    patients = data.table["patient_id"].astype(str)
    train = data.table[patients.isin(set(split.loc[split["role"] == "train", "patient_id"]))]
    test = data.table[patients.isin(set(split.loc[split["role"] == "test", "patient_id"]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BreastDataset's notes on duplicated views: the fold saw them already
        train_set = make_dataset(train, views, modality, train=False, recipe=recipe)
        test_set = make_dataset(test, views, modality, train=False, recipe=recipe)
    rows = test_set.breasts if views == "dual" else test_set.table
    return train_set, test_set, rows.reset_index(drop=True)


def _check_rows(rows: pd.DataFrame, recorded: pd.DataFrame, views: str, where: Path) -> None:
    """The recomputed held-out rows are the recorded out-of-fold rows, in the same order."""
    keys = ["patient_id", "side", "target"] + ([] if views == "dual" else ["view"])
    mine = rows[keys].astype(str).reset_index(drop=True)
    theirs = recorded[keys].astype(str).reset_index(drop=True)
    if views != "dual":
        mine["view"] = mine["view"].str.upper()
        theirs["view"] = theirs["view"].str.upper()
    if len(mine) != len(theirs) or not mine.equals(theirs):
        raise BundleError(f"{where}: the held-out items prepared again from the fold's split.csv ({len(mine)}) are "
                          f"not the rows of its recorded predictions ({len(theirs)}); has the data or its cache "
                          "changed since the fold predicted?")


def _items(dataset, indices) -> np.ndarray:
    return np.stack([dataset[int(index)][0].numpy() for index in indices]).astype(np.float32, copy=False)


def _batches(dataset, indices, size: int):
    for start in range(0, len(indices), size):
        yield _items(dataset, indices[start:start + size])


def calibration_indices(n_items: int, fold: int, seed: int, limit: int = CALIBRATION_ITEMS) -> np.ndarray:
    """The training items (positions) that calibrate fold `fold`: a sample of at most `limit`, drawn with
    `seed + fold`, sorted."""
    rng = np.random.default_rng([int(seed), int(fold), 8])
    return np.sort(rng.choice(n_items, size=min(limit, n_items), replace=False))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_numbers(fp32: np.ndarray, int8: np.ndarray, targets: np.ndarray, class_names: list[str],
                   recorded: np.ndarray) -> dict:
    from tlese.evaluate.metrics import classification_metrics

    auc = {name: classification_metrics(targets, probs, class_names)["macro_auc"]
           for name, probs in (("fp32", fp32), ("int8", int8), ("recorded", recorded))}
    change = np.abs(int8 - fp32)
    return {"macro_auc_fp32": auc["fp32"], "macro_auc_int8": auc["int8"], "macro_auc_change": auc["int8"] - auc["fp32"],
            "macro_auc_recorded": auc["recorded"], "max_abs_prob_change": float(change.max()),
            "mean_abs_prob_change": float(change.mean()),
            "predicted_class_changed": float(np.mean(fp32.argmax(axis=1) != int8.argmax(axis=1))),
            "fp32_vs_recorded_max_abs_diff": float(np.abs(fp32 - recorded).max())}


def release_int8(run, arm: str, spec, draft, work: Path, seed: int,
                 calibration_items: int = CALIBRATION_ITEMS) -> dict:
    """Quantise the fp32 ONNX files in bundle work folder `work` (onnx/fold_<k>.onnx, already exported), check them
    on the run's out-of-fold items and return model.json's "int8" record: {"check": {...numbers, "threshold",
    "passed", "reason", "n_oof", "unit", "calibration"}, "files": [{file, fold, sha256}] (empty unless passed),
    "reference": {file, tolerance} (when passed)}. Only a passing check leaves files in `work`: the int8 ONNX files
    and reference/expected_int8.json (the int8 ensemble's outputs of the reference inputs).

    run: `tlese.train.runs.FinishedRun`; spec: the bundle's model spec; draft: the bundle as loaded from `work`
    (for its fold order, calibration and OOD model)."""
    from tlese.bundle.format import onnx_ensemble
    from tlese.bundle.onnx import int8_file, onnx_file, quantize_onnx
    from tlese.train.data import prepare

    experiment = run.experiment
    data = prepare(experiment.target, experiment, preprocess=spec.preprocess)  # the cache, as the folds trained
    modality, recipe, views = data.task.modality, experiment.target_recipe, spec.views
    results = run.predictions(arm)
    recorded_all = results.predictions if views == "dual" or results.images is None else results.images
    class_names = list(spec.class_names)
    prob_columns = [f"prob_{name}" for name in class_names]
    folds = list(draft.folds)
    fold_dirs = {fold: run.arm_dir(arm).fold(fold) for fold in folds}
    calibrated_with, held_out = {}, {}
    with tempfile.TemporaryDirectory(prefix="tlese_int8_") as scratch:
        quantized = {}
        for fold in folds:
            train_set, test_set, rows = _fold_rows(data, fold_dirs[fold], views, modality, recipe)
            recorded = recorded_all[recorded_all["fold"].astype(int) == fold]
            _check_rows(rows, recorded, views, fold_dirs[fold].path)
            if len(train_set) == 0:
                raise BundleError(f"{fold_dirs[fold].split_file}: fold {fold} has no training item to calibrate on")
            picked = calibration_indices(len(train_set), fold, seed, calibration_items)
            quantized[fold] = quantize_onnx(work / onnx_file(fold), Path(scratch) / Path(int8_file(fold)).name,
                                            _batches(train_set, picked, CALIBRATION_BATCH))
            calibrated_with[fold] = len(picked)
            held_out[fold] = (test_set, rows, recorded)
        fp32_files = {fold: work / onnx_file(fold) for fold in folds}
        ensembles = {name: onnx_ensemble(draft, files, threads=None)
                     for name, files in (("fp32", fp32_files), ("int8", quantized))}
        probs = {"fp32": [], "int8": []}
        ensemble_change, ood_changed, targets, recorded_probs = 0.0, 0, [], []
        for fold in folds:
            test_set, rows, recorded = held_out[fold]
            index = folds.index(fold)
            for batch in _batches(test_set, np.arange(len(test_set)), EVAL_BATCH):
                out = {name: ensemble(batch) for name, ensemble in ensembles.items()}
                for name in probs:
                    probs[name].append(out[name]["per_model"][index])  # the fold's own model: out-of-fold
                ensemble_change = max(ensemble_change,
                                      float(np.abs(out["int8"]["calibrated"] - out["fp32"]["calibrated"]).max()))
                if "ood_flag" in out["fp32"]:
                    ood_changed += int((out["int8"]["ood_flag"] != out["fp32"]["ood_flag"]).sum())
            targets.append(rows["target"].to_numpy(dtype=int))
            recorded_probs.append(recorded[prob_columns].to_numpy(dtype=np.float64))
        fp32, int8 = np.concatenate(probs["fp32"]), np.concatenate(probs["int8"])
        check = _check_numbers(fp32, int8, np.concatenate(targets), class_names, np.concatenate(recorded_probs))
        unit = "breast" if views == "dual" else "image"
        change = check["macro_auc_change"]
        passed = bool(math.isfinite(change) and abs(change) <= INT8_MAX_AUC_CHANGE)
        if not math.isfinite(change):
            reason = "the out-of-fold macro AUC is undefined (a class without held-out cases?)"
        else:
            reason = (f"macro AUC changed by {change:+.4f} on {len(fp32)} out-of-fold {unit}s "
                      f"({'within' if passed else 'beyond'} the limit |change| <= {INT8_MAX_AUC_CHANGE:g})")
            if not passed and check["max_abs_prob_change"] < NEAR_TIE and not check["predicted_class_changed"]:
                reason += (f", although no probability moved by more than {check['max_abs_prob_change']:.2g}: the "
                           "AUC turns on near-ties of near-constant predictions")
        check.update({
            "passed": passed, "reason": reason, "threshold": INT8_MAX_AUC_CHANGE, "n_oof": int(len(fp32)),
            "unit": unit, "ensemble_max_abs_prob_change": ensemble_change,
            "ood_flag_changed": ood_changed if draft.ood is not None else None,
            "compared": f"fp32 vs int8 ONNX Runtime, each out-of-fold {unit} by its own fold's model (no ensemble); "
                        "macro AUC one-vs-rest as the card's; ensemble and OOD flag: all fold models on the same "
                        f"{unit}s",
            "calibration": {"method": "MinMax, static QDQ, per-channel int8 weights, uint8 activations",
                            "items_per_fold": {str(fold): calibrated_with[fold] for fold in folds},
                            "from": f"a seeded sample (at most {calibration_items}) of each fold's own training "
                                    f"{unit}s (split.csv role train), prepared as the folds trained on them; never "
                                    "its validation or held-out patients", "seed": int(seed)},
        })
        record = {"check": check, "files": []}
        if passed:
            for fold in folds:
                target = work / int8_file(fold)
                shutil.copyfile(quantized[fold], target)
                record["files"].append({"file": int8_file(fold), "fold": fold, "sha256": _sha256(target)})
            record["reference"] = {"file": INT8_EXPECTED_FILE, "tolerance": INT8_TOLERANCE}
            (work / INT8_EXPECTED_FILE).write_text(_dump(_expected(ensembles["int8"], draft)))
    return record


def _expected(ensemble, draft) -> dict:
    """The int8 ensemble's outputs of the bundle's reference inputs, laid out as reference/expected.json."""
    from tlese.bundle.format import REFERENCE_DIR

    references = []
    for index, x in enumerate(reference_inputs(draft.input_shape)):
        outputs = ensemble(x[None])
        references.append({"file": f"{REFERENCE_DIR}/ref_{index}.npy", "per_model": outputs["per_model"][:, 0].tolist(),
                           **{key: outputs[key][0].tolist() for key in ("raw", "calibrated", "ood_score")
                              if key in outputs}})
    return {"tolerance": INT8_TOLERANCE, "folds": list(draft.folds), "references": references}
