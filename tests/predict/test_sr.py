"""The DICOM SR writer: a realistic four-image exam built from the real CBIS-DDSM DICOMs, written and read back."""

from __future__ import annotations

import logging

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from tlese.predict.sr import read_sr, write_sr

CLASSES = ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")
ALGORITHM = {"name": "tlese", "version": "0.1.0", "bundle_sha256": "ab" * 32, "model": "tlese_lite0"}
INTENDED_USE = "research use only - not for diagnostic use"
# One-component name, as CBIS-DDSM writes them: highdicom warns about it, quoting it.
PATIENT_NAME, PATIENT_ID = "TLESE-TEST-NAME", "TLESE-TEST-0001"


@pytest.fixture
def exam(cbis_dicoms) -> dict[tuple[str, str], pydicom.Dataset]:
    """Patient P_00173's four views (each its own study in CBIS-DDSM) made one study, keyed (side, view)."""
    study_uid = generate_uid()
    views = {}
    for path in cbis_dicoms:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "P_00173" not in str(ds.PatientID):
            continue
        side = "L" if "LEFT" in str(ds.PatientID) else "R"
        view = "MLO" if str(ds.PatientID).endswith("MLO") else "CC"
        ds.StudyInstanceUID, ds.PatientName, ds.PatientID = study_uid, PATIENT_NAME, PATIENT_ID
        views[side, view] = ds
    assert len(views) == 4
    return views


def _result(side, verdict, views, probs, reasons=()):
    return {"side": side, "verdict": verdict, "reasons": list(reasons), "probabilities": probs,
            "predicted": max(probs, key=probs.get) if probs else None, "views_used": [v for _, v in views],
            "sop_instance_uids": [ds.SOPInstanceUID for ds in views.values()]}


def test_sr_round_trip_both_breasts(exam, tmp_path, capsys, caplog, recwarn):
    left = {k: v for k, v in exam.items() if k[0] == "L"}
    right_cc = {("R", "CC"): exam["R", "CC"]}
    p_left = dict(zip(CLASSES, (0.61234567, 0.2, 0.1, 0.08765433)))
    p_right = dict(zip(CLASSES, (0.1, 0.15, 0.7, 0.05)))
    results = [_result("R", "degraded", right_cc, p_right, ["MLO view missing"]), _result("L", "ok", left, p_left)]
    with caplog.at_level(logging.DEBUG):
        out = write_sr(list(exam.values()), results, ALGORITHM, tmp_path / "sr" / "exam.dcm", INTENDED_USE)
    printed = capsys.readouterr()
    said = printed.out + printed.err + caplog.text + "".join(str(w.message) for w in recwarn)
    identifiers = {PATIENT_NAME, PATIENT_ID, exam["L", "CC"].StudyInstanceUID,
                   *(s.SOPInstanceUID for s in exam.values())}
    assert not [i for i in identifiers if i in said]

    ds = pydicom.dcmread(out)
    src = exam["L", "CC"]
    assert ds.Modality == "SR" and ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in exam.values()}
    assert ds.SOPInstanceUID not in {s.SOPInstanceUID for s in exam.values()}
    assert (ds.PatientName, ds.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert INTENDED_USE in ds.SeriesDescription and ds.Manufacturer == "tlese"
    evidence = {i.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert evidence == {s.SOPInstanceUID for s in exam.values()}
    hd.sr.ComprehensiveSR.from_dataset(ds)  # highdicom parses its own output

    got = read_sr(out)
    assert got["algorithm"] == {**ALGORITHM, "intended_use": INTENDED_USE}
    assert set(got["breasts"]) == {"L", "R"}
    for side, probs, verdict in (("L", p_left, "ok"), ("R", p_right, "degraded")):
        breast = got["breasts"][side]
        assert breast["verdict"] == verdict and breast["predicted"] == max(probs, key=probs.get)
        assert breast["probabilities"].keys() == probs.keys()
        assert all(abs(breast["probabilities"][c] - p) < 1e-6 for c, p in probs.items())
    assert got["breasts"]["R"]["reasons"] == ["MLO view missing"] and got["breasts"]["L"]["reasons"] == []


def test_refused_breast_carries_reason_not_prediction(exam, tmp_path):
    left = {k: v for k, v in exam.items() if k[0] == "L"}
    results = [_result("L", "ok", left, dict(zip(CLASSES, (0.4, 0.3, 0.2, 0.1)))),
               _result("R", "refused", {}, {}, ["no usable view: image unreadable"])]
    got = read_sr(write_sr(list(exam.values()), results, ALGORITHM, tmp_path / "exam.dcm", INTENDED_USE))
    assert got["breasts"]["R"] == {"verdict": "refused", "reasons": ["no usable view: image unreadable"]}
    assert got["breasts"]["L"]["predicted"] == "Luminal A"


def test_rejects_bad_exam_without_naming_the_patient(exam, tmp_path):
    left = {k: v for k, v in exam.items() if k[0] == "L"}
    result = _result("L", "ok", left, dict(zip(CLASSES, (0.4, 0.3, 0.2, 0.1))))
    other = pydicom.Dataset(exam["R", "CC"])
    other.StudyInstanceUID = generate_uid()
    cases = [
        ([*left.values(), other], [result]),  # two studies
        ([exam["L", "CC"]], [result]),  # a used image missing from the sources
        (list(left.values()), [result, result]),  # the same side twice
    ]
    for sources, results in cases:
        with pytest.raises(ValueError) as err:
            write_sr(sources, results, ALGORITHM, tmp_path / "x.dcm", INTENDED_USE)
        assert PATIENT_ID not in str(err.value) and PATIENT_NAME not in str(err.value)
    assert not (tmp_path / "x.dcm").exists()


def test_sr_is_owner_only_quiet_and_says_synthetic(exam, tmp_path, capfd, recwarn):
    left = {k: v for k, v in exam.items() if k[0] == "L"}
    results = [_result("L", "degraded", left, dict(zip(CLASSES, (0.4, 0.3, 0.2, 0.1))),
                       ["unlike the training images: out-of-distribution score 9.1 above threshold 3.2"])]
    notice = "this model was trained on SYNTHETIC images; validated on: nothing real"
    path = write_sr(list(exam.values()), results, ALGORITHM, tmp_path / "sr" / "exam.dcm", INTENDED_USE,
                    notices=[notice], synthetic=True)
    assert path.stat().st_mode & 0o777 == 0o600  # it carries the patient module
    printed = capfd.readouterr()
    assert "withheld" not in printed.out + printed.err and not [w for w in recwarn if "SR" in str(w.message)]
    got = read_sr(path)
    assert "SYNTHETIC" in got["series_description"]
    assert got["breasts"]["L"]["reasons"][0] == notice
    assert any("out-of-distribution" in reason for reason in got["breasts"]["L"]["reasons"])
