"""`tlese predict BUNDLE INPUT... --out DIR`: per-breast predictions of a model bundle, with a verdict for each breast.

Inputs (`tlese.predict.inputs`): DICOM files, folders, zip archives, manifest CSVs for PNG / JPEG; grouped into breasts
by the header tags (never file names). Every image goes through `tlese.data.preprocess.prepare_file` with the
bundle's preprocessing parameters: the code that prepared the training images.

Verdicts, one per breast, each with its reasons, judged against the views the bundle reads (`bundle_views`: CC and
MLO for a dual-view bundle; the task's views for a single-view one, e.g. MLO alone for a mini-MIAS model):

- `ok`: a usable image of every view the bundle reads (reasons may still note images not used, e.g. a FOR
  PROCESSING copy, or high fold disagreement).
- `degraded`: a view the bundle reads missing or unusable: predicted from the view present (duplicated into both view
  slots of a dual-view model, how cross-validation measured single-view breasts), flagged; or an image unlike the
  training images (the bundle's out-of-distribution score above its threshold, when the bundle carries one).
- `refused`: no usable image of a view the bundle reads (Modality not MG, FOR PROCESSING, unreadable or truncated
  pixels, no breast found, an image smaller than the model's input, ...), an image whose content faces the other
  side than its laterality tag says (then the whole breast is refused: its labels cannot be trusted), or an identity
  conflict (a StudyInstanceUID or an image under two patients: `tlese.predict.inputs.mark_conflicts`): no merge, no
  choice, no drop.

High fold disagreement (the largest standard deviation of a class probability over the fold models above
DISAGREEMENT_THRESHOLD) is a reason on the breast, whatever its verdict. A bundle trained on synthetic data says so in
the summary lines, predictions.json (`bundle.synthetic`, `bundle.warning`) and every SR.

Files that are no image at all are listed as refused inputs. One bad file never stops the batch.

Outputs under `out_dir`: `breasts/<exam key>.json` per breast (written atomically as each is done, each sealed by an
HMAC under the run's salt; a rerun reuses those made from the same input files and bundle whose seal still checks,
and recomputes an edited one), then `predictions.csv`, `predictions.json` and
`refused_inputs.csv`; with `heatmaps`, `heatmaps/<exam key>_<view>.png` (overlay) and `..._map.png` (the map alone,
16-bit, the original image's shape); with `sr`, `sr/<study key>.dcm` per study (owner-readable only: it carries the
patient module); with `link_file`, a CSV from exam key to StudyInstanceUID / AccessionNumber (owner-readable only).
Paths in outputs are relative: inputs by their label (`tlese.predict.inputs`), files by their place under `out_dir`.
The exam key is an HMAC-SHA256 of StudyInstanceUID + side (or the manifest's or
CBIS-DDSM patient + side) with a salt given or generated once into `out_dir/.salt`. No output but the SR files and the
link file carries a patient name, ID, birth date, accession number or UID; nothing is printed or logged from a header.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlese.data.io import ImageReadError
from tlese.data.preprocess import PreprocessParams
from tlese.files import write_bytes_atomic
from tlese.predict.inputs import Breast, ImageInput, InputSet, collect_inputs, safe_reason
from tlese.predict.prepare import Preparer, PreprocessingFailed
from tlese.vocab import DUAL_VIEW_ORDER, View

log = logging.getLogger(__name__)

RESULT_VERSION = 1
BREASTS_DIR, HEATMAPS_DIR, SR_DIR = "breasts", "heatmaps", "sr"
SALT_FILE = ".salt"
KEY_HEX = 16  # 64 bits of the HMAC name an exam key
OVERLAY_SENTENCE = "Grad-CAM shows where the model looked for this prediction; it is not a tumour outline."
DEFAULT_INTENDED_USE = "research use only - not for diagnostic use"
RUNTIMES = ("torch", "onnx", "onnx-int8")
DISAGREEMENT_THRESHOLD = 0.25  # std over the fold models of a class probability (the largest class): a reason above
SYNTHETIC_WARNING = ("this model was trained on SYNTHETIC images, not on real mammograms: its outputs say nothing "
                     "about a patient")
CHUNK = 8  # breasts prepared and predicted together; at most this many are recomputed after an interruption


@dataclass
class Summary:
    """What a `predict` run did: breast counts by verdict, reasons counted, refused inputs, files written."""

    out_dir: Path
    ok: int = 0
    degraded: int = 0
    refused: int = 0
    computed: int = 0
    resumed: int = 0
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # verdict -> reason -> breasts
    refused_inputs: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the bundle itself (e.g. trained on synthetic data)

    @property
    def breasts(self) -> int:
        return self.ok + self.degraded + self.refused

    def to_dict(self) -> dict:
        return {"breasts": self.breasts, "ok": self.ok, "degraded": self.degraded, "refused": self.refused,
                "computed": self.computed, "resumed": self.resumed, "reasons": self.reasons,
                "refused_inputs": len(self.refused_inputs), "files": self.files, "notes": self.notes,
                "warnings": self.warnings}

    def lines(self) -> list[str]:
        """A short human summary (no identifiers: exam keys and counts only; files relative to the output folder)."""
        out = [f"WARNING: {warning}" for warning in self.warnings]
        out += [f"{self.breasts} breasts: {self.ok} ok, {self.degraded} degraded, {self.refused} refused "
               f"({self.computed} computed, {self.resumed} kept from an earlier run); "
               f"{len(self.refused_inputs)} input(s) refused"]
        for verdict in ("degraded", "refused"):
            for reason, count in sorted(self.reasons.get(verdict, {}).items(), key=lambda kv: -kv[1])[:10]:
                out.append(f"  {verdict}: {count} x {reason}")
        for entry in self.refused_inputs[:10]:
            out.append(f"  refused input {entry['input']}: {entry['reason']}")
        if len(self.refused_inputs) > 10:
            out.append(f"  ... and {len(self.refused_inputs) - 10} more refused inputs (refused_inputs.csv)")
        out += [f"  note: {note}" for note in self.notes]
        out += [f"{name}: {_shown_path(path, self.out_dir)}" for name, path in self.files.items()
                if name in ("predictions_csv", "link_file")]
        return out


@dataclass
class _Prepared:
    """One breast on its way: verdict so far, reasons, the images used per view (image, model input, info)."""

    breast: Breast
    key: str
    cache_key: str
    verdict: str = "ok"
    reasons: list[str] = field(default_factory=list)
    used: dict[str, tuple[ImageInput, np.ndarray, dict]] = field(default_factory=dict)
    not_used: dict[str, str] = field(default_factory=dict)  # image sha256 -> why


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def predict(bundle: Any, inputs: Sequence[str | Path], out_dir: str | Path, *, salt: str | None = None,
            link_file: str | Path | None = None, heatmaps: bool = False, sr: bool = False,
            runtime: str = "torch", predictor: Callable[[np.ndarray], dict] | None = None,
            label_root: str | Path | None = None, preparer: Preparer | None = None, processes: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Summary:
    """Predict every breast found in `inputs` with `bundle` (see `tlese.bundle.format.load_bundle`) into `out_dir`.

    salt: secret for the exam keys (default: `out_dir/.salt`, generated on the first run). link_file: where to write
    the identifying exam key -> StudyInstanceUID / AccessionNumber CSV (opt in). heatmaps: Grad-CAM overlays of the
    predicted class per view, averaged over the fold models. sr: one DICOM SR per study. runtime: "torch" ("onnx"
    when `tlese.predict.export.OnnxModel` is available). predictor: a `make_predictor` result to use instead of
    building one for `runtime` (a service builds it once: an ONNX export per call would cost seconds).
    label_root: inputs under it are named in the outputs by their path relative to it (`collect_inputs`).
    preparer: a `tlese.predict.prepare.Preparer` to decode and prepare the images with (a service shares one); else
    one with `processes` worker processes is made for this call (0: in this thread). With worker processes the
    next chunk of breasts is prepared while the model predicts the current one; the outputs are the same.
    progress: called as progress(breasts done, breasts in all) after the inputs are read and after every chunk.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if bundle.views not in ("dual", "single"):
        raise ValueError(f"bundle views must be 'dual' or 'single', got {bundle.views!r}")
    if preparer is None:
        with Preparer(processes) as own:
            return predict(bundle, inputs, out_dir, salt=salt, link_file=link_file, heatmaps=heatmaps, sr=sr,
                           runtime=runtime, predictor=predictor, label_root=label_root, preparer=own,
                           progress=progress)
    options = {"salt": salt, "link_file": link_file, "heatmaps": heatmaps, "sr": sr, "label_root": label_root,
               "preparer": preparer, "progress": progress}
    if predictor is not None:
        return _predict(bundle, predictor, inputs, Path(out_dir), **options)
    with tempfile.TemporaryDirectory(prefix="tlese-predict-") as workdir:
        predict_arrays = make_predictor(bundle, runtime, Path(workdir))
        return _predict(bundle, predict_arrays, inputs, Path(out_dir), **options)


def _predict(bundle: Any, predict_arrays, inputs: Sequence[str | Path], out_dir: Path, *, salt: str | None,
             link_file: str | Path | None, heatmaps: bool, sr: bool, label_root: str | Path | None,
             preparer: Preparer, progress: Callable[[int, int], None] | None) -> Summary:
    params: PreprocessParams = bundle.preprocess
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir.name}: exists and is not a folder; give a folder for the outputs")
    (out_dir / BREASTS_DIR).mkdir(parents=True, exist_ok=True)
    key_salt = _salt(out_dir, salt)
    summary = Summary(out_dir=out_dir)
    about = bundle_provenance(bundle)
    if about["synthetic"]:
        summary.warnings.append(f"{SYNTHETIC_WARNING} (validated on: {about['validated_on']})")
    results: dict[str, dict] = {}
    tampered = 0
    with collect_inputs(inputs, label_root=label_root) as found:
        summary.refused_inputs = [entry.to_dict() for entry in found.refused]
        todo: list[_Prepared] = []
        for breast in found.breasts:
            key = exam_key(key_salt, breast.key_material)
            cache = _cache_key(key, breast, bundle.sha256)
            previous, status = _load_previous(out_dir / BREASTS_DIR / f"{key}.json", cache, heatmaps, key_salt)
            tampered += status == "tampered"
            if previous is not None:
                results[key] = previous
                summary.resumed += 1
            else:
                todo.append(_Prepared(breast=breast, key=key, cache_key=cache))
        if tampered:
            summary.notes.append(f"{tampered} earlier result(s) in {BREASTS_DIR}/ failed their integrity check "
                                 "(edited after they were written): recomputed")
        total = len(found.breasts)
        if preparer.parallel and not preparer.started and len(todo) <= CHUNK:
            preparer = Preparer(0)  # one chunk: nothing to overlap, and starting the workers costs seconds
        if progress is not None:
            progress(summary.resumed, total)
        chunks = [todo[start: start + CHUNK] for start in range(0, len(todo), CHUNK)]
        pending = _submit_first_tries(chunks[0], bundle, params, preparer) if chunks else {}
        for index, chunk in enumerate(chunks):
            following = chunks[index + 1] if index + 1 < len(chunks) else []
            # with worker processes, the next chunk is decoded while this one is predicted
            upcoming = _submit_first_tries(following, bundle, params, preparer) if preparer.parallel else None
            for item in chunk:
                _prepare_breast(item, bundle, params, _fetcher(pending, preparer, params))
            pending = {}
            _predict_chunk(chunk, bundle, predict_arrays, results, out_dir, heatmaps, key_salt)
            summary.computed += len(chunk)
            if progress is not None:
                progress(summary.resumed + summary.computed, total)
            pending = upcoming if upcoming is not None else _submit_first_tries(following, bundle, params, preparer)
        if sr:
            summary.files.update(_write_srs(found, results, bundle, out_dir, key_salt, summary))
        if link_file is not None:
            summary.files["link_file"] = str(_write_link_file(Path(link_file), found, key_salt))
    for result in results.values():
        setattr(summary, result["verdict"], getattr(summary, result["verdict"]) + 1)
        if result["verdict"] != "ok":
            counts = summary.reasons.setdefault(result["verdict"], {})
            for reason in result["reasons"]:
                counts[reason] = counts.get(reason, 0) + 1
    summary.files.update(_write_aggregates(out_dir, results, bundle, summary))
    log.info("predict: %d breasts (%d ok, %d degraded, %d refused), %d inputs refused", summary.breasts, summary.ok,
             summary.degraded, summary.refused, len(summary.refused_inputs))
    return summary


def exam_key(salt: str, material: str) -> str:
    """The pseudonymous key of a breast: HMAC-SHA256 of `material` (StudyInstanceUID + side, ...) under `salt`."""
    return hmac.new(salt.encode(), material.encode(), hashlib.sha256).hexdigest()[:KEY_HEX]


def bundle_provenance(bundle: Any) -> dict:
    """What the bundle says of its training data in plain words: {"synthetic": bool, "validated_on": str} (from
    `bundle.synthetic`, else the card's training_data)."""
    card = getattr(bundle, "card", None) or {}
    training = card.get("training_data") or {}
    synthetic = getattr(bundle, "synthetic", None)
    if synthetic is None:
        synthetic = training.get("synthetic", False)
    return {"synthetic": bool(synthetic), "validated_on": str(training.get("validated_on") or "not recorded")}


def bundle_views(bundle: Any) -> tuple[tuple[str, ...], int]:
    """The views the bundle reads (CC, MLO order) and how many of them a breast needs for an "ok" verdict: both for a
    dual-view bundle; the task's views for a single-view bundle (all of them; one when its task takes any view)."""
    every = tuple(view.value for view in DUAL_VIEW_ORDER)
    if bundle.views == "dual":
        return every, 2
    try:
        task_views = tuple(str(view) for view in bundle.task.views)
    except Exception:  # a bundle without a task record (hand-made; every made bundle has one): both views, as before
        task_views = every
    named = tuple(view for view in every if view in task_views)
    return (named, len(named)) if named else (every, 1)


# ---------------------------------------------------------------------------------------------------------------
# One breast: choose and prepare its images, decide its verdict


def _first_tries(item: _Prepared, bundle: Any) -> list[ImageInput]:
    """The images `_prepare_breast` will prepare first: per view the bundle reads, its first candidate without a
    header problem (none for a breast in an identity conflict)."""
    if item.breast.conflicts:
        return []
    read, _ = bundle_views(bundle)
    tries = []
    for view in DUAL_VIEW_ORDER:
        if view.value in read:
            tries += [image for image in item.breast.candidates(view) if not _problems(bundle, image)][:1]
    return tries


def _submit_first_tries(chunk: list[_Prepared], bundle: Any, params: PreprocessParams, preparer: Preparer) -> dict:
    """{id(image): Future} of the first tries of every breast of `chunk`, submitted to `preparer` at once."""
    return {id(image): preparer.submit(image.path, image.side, image.view, params)
            for item in chunk for image in _first_tries(item, bundle)}


def _fetcher(pending: dict, preparer: Preparer, params: PreprocessParams) -> Callable[[ImageInput], tuple]:
    """image -> prepare_file's (image, info): from the Future submitted ahead, else submitted now."""
    def fetch(image: ImageInput) -> tuple[np.ndarray, dict]:
        future = pending.pop(id(image), None) or preparer.submit(image.path, image.side, image.view, params)
        return future.result()

    return fetch


def _prepare_breast(item: _Prepared, bundle: Any, params: PreprocessParams,
                    fetch: Callable[[ImageInput], tuple] | None = None) -> None:
    if fetch is None:
        fetch = _fetcher({}, Preparer(0), params)
    breast = item.breast
    identifiers = breast.identifiers
    item.reasons += breast.notes
    if breast.conflicts:  # nothing of it is read: whose breast it is cannot be told
        item.verdict = "refused"
        item.reasons += breast.conflicts
        for image in breast.images:
            item.not_used[image.sha256] = "identity conflict"
        return
    read, needed = bundle_views(bundle)
    contradicted = False
    for view in DUAL_VIEW_ORDER:
        candidates = breast.candidates(view)
        if view.value not in read:
            for image in candidates:
                item.not_used[image.sha256] = f"this bundle reads {' and '.join(read)} images only"
            if candidates:
                item.reasons.append(f"{len(candidates)} {view} image(s) not used: this bundle reads "
                                    f"{' and '.join(read)} images only")
            continue
        failures = []
        for image in candidates:
            problems = _problems(bundle, image)
            if problems:
                why = "; ".join(problems)
                item.not_used[image.sha256] = why
                failures.append(f"{view} image not used: {why}")
                continue
            try:
                array, info = fetch(image)
            except ImageReadError as error:
                why = safe_reason(error.reason, identifiers)
                if why.startswith(("DICOM has no image", "DICOM has no Pixel Data")):
                    # its header read (Rows, Columns) before: the file ends early (pydicom then returns a partial
                    # dataset, which the data layer reports as having no image)
                    why = "truncated DICOM: the header reads but the pixel data is cut short or corrupt"
                item.not_used[image.sha256] = why
                failures.append(f"{view} image not used: {why}")
                continue
            except PreprocessingFailed as error:
                why = f"preprocessing failed ({error.kind})"
                item.not_used[image.sha256] = why
                failures.append(f"{view} image not used: {why}")
                continue
            except Exception as error:  # one bad image never stops the batch
                why = f"preprocessing failed ({type(error).__name__})"
                item.not_used[image.sha256] = why
                failures.append(f"{view} image not used: {why}")
                continue
            facing = info.get("facing")
            if facing is not None and facing != image.side:
                contradicted = True
                item.not_used[image.sha256] = "laterality contradicted by the image"
                failures.append(f"{view} image: laterality contradicted by the image (the breast in it faces "
                                f"{facing}, its laterality says {image.side})")
                continue
            item.used[view.value] = (image, array, info)
            break
        if view.value in item.used:
            if failures:
                item.reasons += failures
            extra = [image for image in candidates if image is not item.used[view.value][0]
                     and image.sha256 not in item.not_used]
            for image in extra:
                item.not_used[image.sha256] = f"another {view} image of this breast was used"
            if extra:
                item.reasons.append(f"{len(candidates)} {view} images: the first usable one was used")
        else:
            item.reasons += failures
    others = Counter(image.view or "no view" for image in breast.images
                     if image.view not in (View.CC.value, View.MLO.value))
    for image in breast.images:
        if image.view not in (View.CC.value, View.MLO.value):
            item.not_used[image.sha256] = "not a CC or MLO view"
    if others:
        listed = ", ".join(f"{count} {view}" for view, count in sorted(others.items()))
        item.reasons.append(f"images of other views not used: {listed}")
    if contradicted:
        item.verdict = "refused"
        item.used.clear()
        item.reasons.append("laterality contradicted by the image: this breast's labels cannot be trusted")
    elif not item.used:
        item.verdict = "refused"
        item.reasons.append(f"no usable {' or '.join(read)} image")
    elif len(item.used) < needed:
        (present,) = item.used
        missing = next(view for view in read if view != present)
        item.verdict = "degraded"
        how = ("duplicated into both view slots, as cross-validation measured single-view breasts"
               if bundle.views == "dual" else "the single-view model on that image alone")
        item.reasons.append(f"{missing} view missing: predicted from the {present} view alone ({how})")


def _problems(bundle: Any, image: ImageInput) -> list[str]:
    """Why `image` is not used, from its header alone: its own problems, then the bundle's (`_bundle_problems`);
    the one rule `_prepare_breast` applies and `_first_tries` predicts."""
    return list(image.problems) + _bundle_problems(bundle, image)


def _bundle_problems(bundle: Any, image: ImageInput) -> list[str]:
    """What the bundle detectably was not trained for: an image smaller than the model's input; a bit depth or
    source format outside those its card lists (card["inputs"]["bits_stored"] / ["source_formats"], when given)."""
    header, problems = image.header, []
    size = int(bundle.preprocess.size)
    if max(header.rows, header.cols) < size:
        problems.append(f"image ({header.rows} x {header.cols}) smaller than the model's input ({size} x {size})")
    card_inputs = (getattr(bundle, "card", None) or {}).get("inputs") or {}
    bits = card_inputs.get("bits_stored")
    if isinstance(bits, list) and bits and int(header.bits_stored) not in {int(b) for b in bits}:  # or "unknown"
        trained = ", ".join(str(b) for b in sorted({int(b) for b in bits}))
        problems.append(f"bit depth {header.bits_stored} not seen in training (trained on {trained})")
    formats = card_inputs.get("source_formats")
    if isinstance(formats, list) and formats and header.source_format not in formats:
        problems.append(f"{header.source_format} images not among those the bundle was trained on")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Prediction and results


def _predict_chunk(chunk: list[_Prepared], bundle: Any, predict_arrays, results: dict, out_dir: Path,
                   heatmaps: bool, salt: str) -> None:
    live = [item for item in chunk if item.verdict != "refused"]
    outputs: dict[str, dict] = {}
    if live:
        x, owners = _model_input(live, bundle.views)
        arrays = {name: _numpy(value) for name, value in predict_arrays(x).items()}
        for index, item in enumerate(live):
            rows = [row for row, owner in enumerate(owners) if owner == index]
            outputs[item.key] = {
                "raw": arrays["raw"][rows].mean(axis=0), "calibrated": arrays["calibrated"][rows].mean(axis=0),
                "per_model": arrays["per_model"][:, rows].mean(axis=1),
                "disagreement": float(np.mean(arrays["disagreement"][rows])),
                "x": x[rows],
            }
            if "ood_score" in arrays:  # the most unusual image of the breast speaks for it
                outputs[item.key]["ood_score"] = float(np.max(arrays["ood_score"][rows]))
                outputs[item.key]["ood_flag"] = bool(np.any(arrays["ood_flag"][rows] > 0.5)) \
                    if "ood_flag" in arrays else None
    for item in chunk:
        result = _result(item, bundle, outputs.get(item.key))
        if heatmaps and item.key in outputs:
            try:
                result["heatmaps"] = _heatmaps(item, bundle, outputs[item.key]["x"], result, out_dir)
            except Exception as error:  # a map that fails never costs the prediction
                result["heatmaps"] = {}
                result["reasons"].append(f"heatmap not made ({type(error).__name__})")
        elif heatmaps:
            result["heatmaps"] = {}
        result["integrity"] = _seal(result, salt)
        _write_json(out_dir / BREASTS_DIR / f"{item.key}.json", result)
        results[item.key] = result


def _model_input(live: list[_Prepared], views: str) -> tuple[np.ndarray, list[int]]:
    """(B, 2, 1, H, W) for a dual-view bundle (a missing view duplicated), or (N, 1, H, W) with one row per used image
    for a single-view one; plus which breast each row belongs to."""
    rows, owners = [], []
    for index, item in enumerate(live):
        arrays = {view: array for view, (_, array, _) in item.used.items()}
        if views == "dual":
            present = next(iter(arrays.values()))
            rows.append(np.stack([arrays.get(view.value, present)[None] for view in DUAL_VIEW_ORDER]))
            owners.append(index)
        else:
            for view in DUAL_VIEW_ORDER:
                if view.value in arrays:
                    rows.append(arrays[view.value][None])
                    owners.append(index)
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32), owners


def _result(item: _Prepared, bundle: Any, output: dict | None) -> dict:
    classes = list(bundle.class_names)
    used_views = [view.value for view in DUAL_VIEW_ORDER if view.value in item.used]
    images = []
    for image in item.breast.images:
        entry = {"view": image.view, "sha256": image.sha256, "used": image.sha256 in
                 {used.sha256 for used, _, _ in item.used.values()}, "rows": image.header.rows,
                 "cols": image.header.cols, "bits_stored": image.header.bits_stored,
                 "format": image.header.source_format}
        if not entry["used"] and image.sha256 in item.not_used:
            entry["not_used_because"] = item.not_used[image.sha256]
        if entry["used"]:
            info = item.used[image.view][2]
            entry.update(facing=info.get("facing"), flipped=bool(info.get("flipped")))
        images.append(entry)
    result = {
        "version": RESULT_VERSION, "exam_key": item.key, "side": item.breast.side, "verdict": item.verdict,
        "reasons": list(dict.fromkeys(item.reasons)), "views_used": used_views,
        "view_slots": ([view.value if view.value in item.used else used_views[0] for view in DUAL_VIEW_ORDER]
                       if used_views and bundle.views == "dual" else used_views),
        "predicted": None, "probabilities": None, "raw_probabilities": None, "per_model_probabilities": None,
        "disagreement": None, "source": item.breast.images[0].source, "images": images,
        "bundle_sha256": bundle.sha256, "input_sha256": sorted(image.sha256 for image in item.breast.images),
        "cache_key": item.cache_key, "ood_score": None, "ood_flag": None,
    }
    if output is not None:
        calibrated = [float(p) for p in output["calibrated"]]
        result.update(
            predicted=classes[int(np.argmax(calibrated))],
            probabilities=dict(zip(classes, calibrated)),
            raw_probabilities=dict(zip(classes, (float(p) for p in output["raw"]))),
            per_model_probabilities=[dict(zip(classes, (float(p) for p in row))) for row in output["per_model"]],
            disagreement=output["disagreement"],
        )
        if len(output["per_model"]) > 1 and output["disagreement"] > DISAGREEMENT_THRESHOLD:
            result["reasons"].append(
                f"the fold models disagree: spread {output['disagreement']:.2f} above {DISAGREEMENT_THRESHOLD} (the "
                f"largest standard deviation of a class probability over the {len(output['per_model'])} models)")
        if "ood_score" in output:
            threshold = getattr(getattr(bundle, "ood", None), "threshold", None)
            flag = output["ood_flag"]
            if flag is None and threshold is not None:
                flag = output["ood_score"] > float(threshold)
            result.update(ood_score=output["ood_score"], ood_flag=bool(flag))
            if flag:
                above = f" above threshold {float(threshold):.4g}" if threshold is not None else " above threshold"
                result["reasons"].append(f"unlike the training images: out-of-distribution score "
                                         f"{output['ood_score']:.4g}{above}")
                if result["verdict"] == "ok":
                    result["verdict"] = "degraded"
    return result


# ---------------------------------------------------------------------------------------------------------------
# Grad-CAM heatmaps in the original image's geometry


def _heatmaps(item: _Prepared, bundle: Any, x: np.ndarray, result: dict, out_dir: Path) -> dict:
    """Grad-CAM of the predicted class on every fold model, averaged (each model's map scaled to [0, 1] over the
    breast first, the mean scaled again), per used view, mapped back onto the original image; PNG overlay (original
    beside overlay, with OVERLAY_SENTENCE) and the map alone (16-bit PNG, the original's shape)."""
    import torch

    from tlese.evaluate.explain import grad_cam, save_overlay

    class_index = list(bundle.class_names).index(result["predicted"])
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    maps = []
    for model in bundle.models:
        cam, _ = grad_cam(model, tensor, class_index)
        maps.append(cam.numpy())
    mean = np.mean(maps, axis=0)
    peak = float(mean.max())
    mean = mean / peak if peak > 1e-12 else np.zeros_like(mean)
    per_view: dict[str, np.ndarray] = {}
    if bundle.views == "dual":  # (1, 2, H, W): a duplicated view looked at through both slots, so both count
        slots = mean[0]
        for view in item.used:
            indices = [i for i, slot in enumerate(result["view_slots"]) if slot == view]
            per_view[view] = slots[indices].mean(axis=0)
    else:  # (V, H, W), rows in DUAL_VIEW_ORDER of the used views
        for row, view in enumerate(result["views_used"]):
            per_view[view] = mean[row]
    written = {}
    folder = out_dir / HEATMAPS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for view, cam in per_view.items():
        image, _, info = item.used[view]
        original, full = _original_and_map(image, cam, info, bundle.preprocess)
        map_path = folder / f"{item.key}_{view}_map.png"
        _save_png16(full, map_path)
        display, display_map = _downscale(original), _downscale(full)
        overlay_path = folder / f"{item.key}_{view}.png"
        title = f"{item.breast.side} {view}, predicted {result['predicted']}.\n{OVERLAY_SENTENCE}"
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".png", delete=False) as handle:
            temporary = Path(handle.name)
        save_overlay(display, display_map, temporary, title=title, view_names=[f"{item.breast.side} {view}"])
        os.replace(temporary, overlay_path)
        written[view] = {"overlay": overlay_path.relative_to(out_dir).as_posix(),
                         "map": map_path.relative_to(out_dir).as_posix(), "shape": list(full.shape)}
    return written


def map_to_original(cam: np.ndarray, info: dict, params: PreprocessParams, shape: tuple[int, int]) -> np.ndarray:
    """A (size, size) map in model-input geometry -> the original image's (rows, cols): the padding removed, the
    orientation flip undone, the resize undone onto the crop box, zero outside the crop box.

    Uses what prepare_file's steps recorded in `info`: "crop_box", "resized_shape", "flipped", "pad_offset" (the
    geometry is never recomputed here, so it cannot drift from preprocessing).
    """
    import torch

    r0, r1, c0, c1 = (int(v) for v in info["crop_box"])
    crop_h, crop_w = r1 - r0, c1 - c0
    height, width = (int(v) for v in info["resized_shape"])
    top, left = (int(v) for v in info["pad_offset"])
    region = np.asarray(cam, dtype=np.float32)[top: top + height, left: left + width]
    if info.get("flipped"):
        region = region[:, ::-1]
    resized = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(region))[None, None],
                                              size=(crop_h, crop_w), mode="bilinear", align_corners=False)[0, 0]
    out = np.zeros(shape, dtype=np.float32)
    out[r0:r1, c0:c1] = np.clip(resized.numpy(), 0.0, 1.0)
    return out


def _original_and_map(image: ImageInput, cam: np.ndarray, info: dict, params: PreprocessParams):
    from tlese.data.io import read_image
    from tlese.data.preprocess import normalise_intensity

    pixels, _ = read_image(image.path)
    full = map_to_original(cam, info, params, pixels.shape)
    return normalise_intensity(pixels, None), full


def _downscale(array: np.ndarray, longest: int = 768) -> np.ndarray:
    import torch

    height, width = array.shape
    scale = longest / max(height, width)
    if scale >= 1:
        return array
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(array))[None, None], size=shape,
                                           mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _save_png16(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    data = np.round(np.clip(array, 0.0, 1.0) * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(data).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# DICOM SR, link file, aggregates


def _write_srs(found: InputSet, results: dict, bundle: Any, out_dir: Path, salt: str, summary: Summary) -> dict:
    """One SR per study among the DICOM breasts (a CBIS-DDSM breast, one study per view, is reported in each of
    its studies with that study's image), written with `tlese.predict.sr.write_sr`."""
    from tlese.predict.sr import write_sr
    from tlese.version import __version__

    studies: dict[str, list[tuple[str, Breast]]] = {}
    for breast in found.breasts:
        key = exam_key(salt, breast.key_material)
        for uid in dict.fromkeys(image.study_uid for image in breast.images if image.source == "dicom"):
            if uid:
                studies.setdefault(uid, []).append((key, breast))
    # a study with a breast in an identity conflict gets no SR: it would be filed under one of the patients
    in_conflict = [uid for uid, members in studies.items() if any(breast.conflicts for _, breast in members)]
    for uid in in_conflict:
        del studies[uid]
    if in_conflict:
        summary.notes.append(f"no SR for {len(in_conflict)} study(ies) with an identity conflict (see the refused "
                             "breasts)")
    skipped = sum(1 for breast in found.breasts if all(image.source != "dicom" for image in breast.images))
    if skipped:
        summary.notes.append(f"no SR for {skipped} breast(s) without DICOM images (manifest PNG/JPEG)")
    card = getattr(bundle, "card", None) or {}
    model = getattr(bundle, "model_name", None) or (card.get("model") or {}).get("registry_name") or ""
    algorithm = {"name": "tlese", "version": __version__, "bundle_sha256": bundle.sha256, "model": str(model)}
    intended_use = str(getattr(bundle, "intended_use", None) or card.get("intended_use") or DEFAULT_INTENDED_USE)
    about = bundle_provenance(bundle)
    notices = [f"{SYNTHETIC_WARNING}; validated on: {about['validated_on']}"] if about["synthetic"] else []
    written, failed = {}, 0
    for uid, members in studies.items():
        sources, breast_results = [], []
        for key, breast in members:
            result = results[key]
            in_study = [image for image in breast.images if image.study_uid == uid]
            used = {entry["sha256"] for entry in result["images"] if entry["used"]}
            used_here = [image for image in in_study if image.sha256 in used]
            sources += used_here
            breast_results.append({
                "side": breast.side, "verdict": result["verdict"], "reasons": result["reasons"],
                "probabilities": result["probabilities"], "predicted": result["predicted"],
                "sop_instance_uids": [image.tags["SOPInstanceUID"] for image in used_here
                                      if image.tags.get("SOPInstanceUID")],
            })
        if not sources:  # every breast of the study refused: its readable images are the evidence looked at
            sources = [image for _, breast in members for image in breast.images if image.study_uid == uid]
        study_key = exam_key(salt, f"study|{uid}")
        path = out_dir / SR_DIR / f"{study_key}.dcm"
        try:
            write_sr([image.path for image in sources], breast_results, algorithm, path, intended_use,
                     notices=notices, synthetic=about["synthetic"])
            written[f"sr_{study_key}"] = str(path)
        except Exception:  # an SR that cannot be written never costs the predictions; no detail (may quote tags)
            failed += 1
    if failed:
        summary.notes.append(f"{failed} SR(s) could not be written")
    return written


def _write_link_file(path: Path, found: InputSet, salt: str) -> Path:
    """exam_key, side, study_instance_uid, accession_number, patient (manifest / CBIS-DDSM keys), inputs."""
    rows = []
    for breast in found.breasts:
        uids = list(dict.fromkeys(image.study_uid for image in breast.images if image.study_uid))
        accessions = list(dict.fromkeys(image.tags.get("AccessionNumber") for image in breast.images
                                        if image.tags.get("AccessionNumber")))
        kind, value = breast.group
        rows.append({"exam_key": exam_key(salt, breast.key_material), "side": breast.side,
                     "study_instance_uid": ";".join(uids), "accession_number": ";".join(accessions),
                     "patient": value if kind in ("manifest", "cbis") else "",
                     "inputs": ";".join(image.label for image in breast.images)})
    columns = ["exam_key", "side", "study_instance_uid", "accession_number", "patient", "inputs"]
    write_bytes_atomic(path, _csv_bytes(rows, columns), mode=0o600)
    return path


def _write_aggregates(out_dir: Path, results: dict, bundle: Any, summary: Summary) -> dict:
    classes = list(bundle.class_names)
    ordered = [results[key] for key in sorted(results, key=lambda k: (results[k]["verdict"] == "refused", k))]
    columns = (["exam_key", "side", "verdict", "predicted"] + [f"prob_{c}" for c in classes]
               + [f"raw_prob_{c}" for c in classes] + ["disagreement", "views_used", "reasons", "bundle_sha256"])
    rows = []
    for result in ordered:
        row = {"exam_key": result["exam_key"], "side": result["side"], "verdict": result["verdict"],
               "predicted": result["predicted"] or "", "disagreement": "" if result["disagreement"] is None
               else result["disagreement"], "views_used": "+".join(result["views_used"]),
               "reasons": "; ".join(result["reasons"]), "bundle_sha256": result["bundle_sha256"]}
        for name in classes:
            row[f"prob_{name}"] = "" if result["probabilities"] is None else result["probabilities"][name]
            row[f"raw_prob_{name}"] = "" if result["raw_probabilities"] is None else result["raw_probabilities"][name]
        rows.append(row)
    files = {"predictions_csv": out_dir / "predictions.csv", "predictions_json": out_dir / "predictions.json",
             "refused_inputs_csv": out_dir / "refused_inputs.csv"}
    write_bytes_atomic(files["predictions_csv"], _csv_bytes(rows, columns))
    write_bytes_atomic(files["refused_inputs_csv"], _csv_bytes(summary.refused_inputs, ["input", "reason"]))
    about = bundle_provenance(bundle)
    document = {"version": RESULT_VERSION,
                "bundle": {"sha256": bundle.sha256, "class_names": classes, "views": bundle.views,
                           "image_size": int(bundle.preprocess.size), "views_read": list(bundle_views(bundle)[0]),
                           **about, "warning": SYNTHETIC_WARNING if about["synthetic"] else None},
                "summary": {**summary.to_dict(), "files": {k: _shown_path(v, out_dir)
                                                           for k, v in {**summary.files, **files}.items()}},
                "breasts": {result["exam_key"]: result for result in ordered},
                "refused_inputs": summary.refused_inputs}
    _write_json(files["predictions_json"], document)
    return {name: str(path) for name, path in files.items()}


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def make_predictor(bundle: Any, runtime: str, workdir: Path | None = None, threads: int | None = None,
                   spinning: bool = True) -> Callable[[np.ndarray], dict]:
    """The function giving `predict_arrays`' dict for a model input: the bundle's own (torch), or the same
    ensemble run under ONNX Runtime: from the bundle's own parity-checked ONNX files (`Bundle.onnx_predictor`) when
    it carries them, else each fold model exported to `workdir` (`tlese.predict.export`; the sessions hold the models
    in memory, so `workdir` may be removed afterwards). threads / spinning: ONNX Runtime's intra-op
    threads and busy-waiting (`OnnxModel`). Both are safe to call from several threads at once."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "torch":
        return bundle.predict_arrays
    if runtime == "onnx-int8":  # only the bundle's own int8 files, made when they passed its int8 check
        return bundle.onnx_predictor(threads=threads, spinning=spinning, int8=True)
    own = getattr(bundle, "onnx_predictor", None)
    if callable(own):  # the bundle's own ONNX files, parity-checked when it was made
        predictor = own(threads=threads, spinning=spinning)
        if predictor is not None:
            return predictor
    try:
        from tlese.predict.export import OnnxModel, export_onnx
    except ImportError:
        raise ValueError("runtime 'onnx' is not available in this version: use runtime 'torch'") from None
    from tlese.bundle.format import ensemble_outputs

    sessions = []
    for index, model in enumerate(bundle.models):
        path = export_onnx(model, Path(workdir) / f"model_{index}.onnx", image_size=int(bundle.preprocess.size),
                           views=bundle.views)
        sessions.append(OnnxModel(path, threads=threads, spinning=spinning))
    calibration = (getattr(bundle, "meta", None) or {}).get("calibration")
    ood_outputs = getattr(bundle, "ood_outputs", None)

    def predict_arrays(x: np.ndarray) -> dict[str, np.ndarray]:
        # The ensemble combined exactly as Bundle.predict_arrays combines it (`ensemble_outputs`), plus the bundle's
        # out-of-distribution outputs when it has an OOD model.
        logits = np.stack([session(np.ascontiguousarray(x, dtype=np.float32)) for session in sessions])
        logits = logits.astype(np.float64) - logits.max(axis=2, keepdims=True)
        per_model = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
        outputs = ensemble_outputs(per_model, calibration)
        return {**outputs, **(ood_outputs(x) if callable(ood_outputs) else {})}

    return predict_arrays


def _salt(out_dir: Path, salt: str | None) -> str:
    """The given salt, else the one stored in out_dir/.salt (made on the first run, readable by the owner only)."""
    if salt:
        return str(salt)
    path = out_dir / SALT_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    value = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run made it first
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return value


def _cache_key(key: str, breast: Breast, bundle_sha256: str) -> str:
    payload = json.dumps({"version": RESULT_VERSION, "exam_key": key, "bundle": bundle_sha256,
                          "inputs": sorted(image.sha256 for image in breast.images)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_previous(path: Path, cache_key: str, heatmaps: bool, salt: str) -> tuple[dict | None, str]:
    """An earlier run's result for this breast when made from the same inputs and bundle, its seal intact (and with
    heatmaps, when they are asked for now and their files are still there); with why not: "none", "stale",
    "tampered" (unreadable, or the seal does not check: edited after it was written)."""
    if not path.is_file():
        return None, "none"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, "tampered"
    if not isinstance(result, dict) or not hmac.compare_digest(str(result.get("integrity", "")),
                                                               _seal(result, salt)):
        return None, "tampered"
    if result.get("cache_key") != cache_key or result.get("version") != RESULT_VERSION:
        return None, "stale"
    if heatmaps and result["verdict"] != "refused":
        maps = result.get("heatmaps")
        if not maps or not all((path.parent.parent / entry[kind]).is_file() for entry in maps.values()
                               for kind in ("overlay", "map")):
            return None, "stale"
    return result, "reused"


def _seal(result: dict, salt: str) -> str:
    """HMAC-SHA256 of a breast result (all but its "integrity" key, canonical JSON) under a key derived from the
    run's salt: an edit of the file (a class, a probability) no longer matches."""
    body = {key: value for key, value in result.items() if key != "integrity"}
    key = hmac.new(salt.encode(), b"tlese breast result", hashlib.sha256).digest()
    return hmac.new(key, json.dumps(body, sort_keys=True, allow_nan=False).encode(), hashlib.sha256).hexdigest()


def _shown_path(path: str | Path, out_dir: Path) -> str:
    """A written file as outputs name it: relative to the output folder, else its name alone (folders above may
    carry identifiers)."""
    path = Path(path)
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return path.name


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _write_json(path: Path, document: dict) -> None:
    write_bytes_atomic(path, (json.dumps(document, indent=1, allow_nan=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# Command line


__all__ = ["DISAGREEMENT_THRESHOLD", "OVERLAY_SENTENCE", "RUNTIMES", "SYNTHETIC_WARNING", "Summary",
           "bundle_provenance", "bundle_views", "exam_key", "make_predictor", "map_to_original", "predict"]
