"""Write one exam's per-breast predictions as a DICOM Comprehensive SR (TID 1500) that a PACS files with the study.

The SR is a new series (new Series and SOP Instance UIDs, manufacturer "tlese", the intended-use label in the
series description) inside the study of the source images; highdicom copies the patient and study modules from
the first source image and lists every source image as evidence. Content tree:

    Imaging Measurement Report (TID 1500)
      Language; Observer Type = Device (name, model, UID derived from the bundle hash); Procedure = Mammography
      Imaging Measurements
        Measurement Group (TID 1501), one per breast in `results`
          Tracking Identifier "<L|R> breast" + new Tracking UID
          Finding Site = Breast, Laterality = Left | Right
          Algorithm Name / Version / Parameters (TID 4019): "model=...", "bundle_sha256=...", "intended_use=..."
          NUM "Probability of <class>" (UCUM {ratio}), one per class      -- verdict ok / degraded only
          CODE "Predicted class" = <class>                                  -- verdict ok / degraded only
          CODE "Algorithm verdict" = ok | degraded | refused
          TEXT "Comment" = each verdict reason (e.g. the missing view)
          IMAGE "Source of Measurement", one per image used

A refused breast keeps its group (so a reader sees it was looked at and why nothing is reported) but carries no
probabilities and no predicted class. Class and verdict codes use the private scheme 99TLESE, declared in the
Coding Scheme Identification Sequence. Nothing here logs, prints or warns an identifier (see `_quiet_highdicom`).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import copy
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tlese.files import write_bytes_atomic

SCHEME = "99TLESE"
VERDICTS = ("ok", "degraded", "refused")
PREDICTED = hd.sr.CodedConcept("PREDICTED", SCHEME, "Predicted class")
VERDICT = hd.sr.CodedConcept("VERDICT", SCHEME, "Algorithm verdict")
_PROB_PREFIX = "Probability of "
SYNTHETIC_DESCRIPTION = "SYNTHETIC-DATA MODEL - not for patient care"
log = logging.getLogger(__name__)
_LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}
# Type 2 attributes highdicom reads from the first evidence dataset without a default.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime")


def _code(text: str, meaning: str) -> hd.sr.CodedConcept:
    """A 99TLESE concept whose value is `text` upper-cased with runs of other characters turned into '-'."""
    return hd.sr.CodedConcept(re.sub(r"[^A-Z0-9]+", "-", text.upper()).strip("-"), SCHEME, meaning)


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """Keep identifiers out of logs and warnings: highdicom's INFO log names the source UIDs, and its warnings may
    quote header values (e.g. a one-component PatientName, "text withheld"), so they are caught and only counted in
    a DEBUG log line (a clinician's console stays quiet)."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.setLevel(level)
    if caught:
        kinds = ", ".join(sorted({w.category.__name__ for w in caught}))
        log.debug("%d warning(s) (%s) while writing an SR, text withheld: it may quote header values", len(caught),
                  kinds)


def _load(source: Dataset | str | Path) -> Dataset:
    """Header of one source image, with missing Type 2 patient/study attributes set empty (on a shallow copy)."""
    ds = pydicom.dcmread(source, stop_before_pixels=True) if isinstance(source, (str, Path)) else source
    missing = [kw for kw in _TYPE2 if kw not in ds]
    if missing:
        ds = copy(ds)
        for kw in missing:
            setattr(ds, kw, "")
    return ds


def _group(result: dict, algorithm_id: hd.sr.AlgorithmIdentification, sop_classes: dict[str, str],
           notices: Sequence[str] = ()):
    """The TID 1501 measurement group of one breast."""
    side, verdict = result["side"], result["verdict"]
    if side not in _LATERALITY or verdict not in VERDICTS:
        raise ValueError(f"bad side {side!r} or verdict {verdict!r}")
    unknown = [u for u in result.get("sop_instance_uids", []) if u not in sop_classes]
    if unknown:
        raise ValueError(f"{len(unknown)} image(s) of side {side} are not among the source images")
    measurements, evaluations = [], []
    if verdict != "refused":
        probs = result["probabilities"]
        names = [_code(c, _PROB_PREFIX + c) for c in probs]
        if len({n.value for n in names}) != len(names) or result["predicted"] not in probs:
            raise ValueError(f"class names collide after coding, or predicted class not among them (side {side})")
        measurements = [hd.sr.Measurement(name=n, value=float(p), unit=codes.UCUM.Ratio)
                        for n, p in zip(names, probs.values())]
        evaluations.append(hd.sr.QualitativeEvaluation(PREDICTED, _code(result["predicted"], result["predicted"])))
    evaluations.append(hd.sr.QualitativeEvaluation(VERDICT, _code(verdict, verdict)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{side} breast"),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Breast, laterality=_LATERALITY[side])],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(sop_classes[u], u)
                       for u in result.get("sop_instance_uids", [])],
    )
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=r, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for r in [*notices, *result.get("reasons", [])]
    )
    return group


def write_sr(
    source_images: Sequence[Dataset | str | Path],
    results: Sequence[dict],
    algorithm: dict,
    out_path: str | Path,
    intended_use: str,
    series_number: int = 9901,
    notices: Sequence[str] = (),
    synthetic: bool = False,
) -> Path:
    """Write the exam's predictions (one `results` dict per breast) as a Comprehensive SR to `out_path`.

    `source_images`: the exam's images (datasets, pixels not needed, or paths), all of one study; every UID in a
    result's `sop_instance_uids` must be among them. `algorithm`: {"name", "version", "bundle_sha256", "model"}.
    `intended_use`: the label put in the series description and in the algorithm parameters. `notices`: plain
    sentences every breast's group carries first (e.g. that the model was trained on synthetic data); `synthetic`:
    the series description says SYNTHETIC_DESCRIPTION instead. The file is written owner-readable only (0600): it
    carries the patient module.
    """
    sources = [_load(s) for s in source_images]
    if not sources or not results:
        raise ValueError("need at least one source image and one breast result")
    if len({ds.StudyInstanceUID for ds in sources}) != 1:
        raise ValueError("the source images belong to more than one study")
    if len({r["side"] for r in results}) != len(results):
        raise ValueError("more than one result for the same side")
    name, version, bundle = algorithm["name"], algorithm["version"], algorithm["bundle_sha256"]
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=name, version=version, manufacturer="tlese",
        parameters=[f"model={algorithm.get('model', '')}", f"bundle_sha256={bundle}", f"intended_use={intended_use}"],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[name, version, bundle]), name=name, manufacturer_name="tlese",
            model_name=algorithm.get("model"),
        ),
    )
    sop_classes = {ds.SOPInstanceUID: ds.SOPClassUID for ds in sources}
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=[_group(r, algorithm_id, sop_classes, notices)
                              for r in sorted(results, key=lambda r: r["side"])],
    )
    description = f"{name} {intended_use}" if len(name) + len(intended_use) < 64 else intended_use[:64]
    if synthetic:
        description = SYNTHETIC_DESCRIPTION
    with _quiet_highdicom():
        sr = hd.sr.ComprehensiveSR(
            evidence=sources, content=report[0],
            series_instance_uid=generate_uid(), series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="tlese", manufacturer_model_name=algorithm.get("model"), software_versions=version,
            series_description=description, is_complete=True,
            coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name="tlese private codes")],
        )
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
    out_path = Path(out_path)
    write_bytes_atomic(out_path, buffer.getvalue(), mode=0o600)
    return out_path


def _texts(item: Any, code: str) -> list[str]:
    """TEXT values of the direct children of `item` whose concept name has code value `code`."""
    return [t.TextValue for t in item.ContentSequence
            if t.ValueType == "TEXT" and t.ConceptNameCodeSequence[0].CodeValue == code]


def read_sr(path: str | Path) -> dict:
    """Values of an SR written by `write_sr`: {"algorithm": {...}, "breasts": {side: {...}}, "series_description"}.

    Per side: "verdict", "reasons", and for ok / degraded "probabilities" {class: p} and "predicted".
    `algorithm` has "name", "version" and the parameters ("model", "bundle_sha256", "intended_use").
    """
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    out: dict = {"series_description": sr.get("SeriesDescription", ""), "algorithm": {}, "breasts": {}}
    for group in report.get_image_measurement_groups():
        root = group[0]
        side = {v.value: k for k, v in _LATERALITY.items()}[group.finding_sites[0].laterality.value]
        breast: dict = {"reasons": _texts(root, codes.DCM.Comment.value)}
        for ev in group.get_qualitative_evaluations():
            key = {PREDICTED: "predicted", VERDICT: "verdict"}.get(ev.name)
            if key:
                breast[key] = ev.value.meaning
        probs = {m.name.meaning.removeprefix(_PROB_PREFIX): float(m.value) for m in group.get_measurements()}
        if probs:
            breast["probabilities"] = probs
        out["breasts"][side] = breast
        (name,), (version,) = _texts(root, "111001"), _texts(root, "111003")
        params = dict(p.split("=", 1) for p in _texts(root, "111002"))
        out["algorithm"] = {"name": name, "version": version, **params}
    return out


__all__ = ["read_sr", "write_sr"]
