"""`predict` on the 8 real CBIS-DDSM DICOMs (under neutral names) plus broken, foreign and identifying files.

Most checks read one shared run (`batch`) with heatmaps, SR and a link file; the bundle is a real `Bundle` of two
small random-weight models at 64 px (their BatchNorm statistics set on random inputs, so outputs depend on the image),
and, where the session fixture `tiny_bundle` is available, the real bundle of a tiny finished run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from exam_helpers import CLASSES, SECRETS, cbis_truth, dicom_copy
from exam_helpers import random_bundle as make_bundle
from PIL import Image

from tlese.bundle.format import Bundle
from tlese.data.io import read_image
from tlese.data.preprocess import PreprocessParams, normalise_intensity, prepare_file
from tlese.evaluate import explain
from tlese.predict import pipeline as predict_module
from tlese.predict.commands import register_predict
from tlese.predict.pipeline import OVERLAY_SENTENCE, exam_key, map_to_original, predict


def by_case(cbis_dicoms, patient: str, side: str, view: str) -> Path:
    return next(path for path in cbis_dicoms if cbis_truth(path) == (patient, side, view))


def all_bytes_under(folder: Path, skip: tuple[Path, ...] = ()) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(path == s or s in path.parents for s in skip)]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return make_bundle()


@pytest.fixture(scope="module")
def batch(cbis_dicoms, flat, bundle, tmp_path_factory) -> dict:
    """One run over the 8 CBIS files plus a CT, a FOR PROCESSING, a truncated, a side-contradicting, an identifying
    (MLO only: degraded) DICOM, a text file named .dcm and an unsafe zip; heatmaps, SR and a link file on. What it
    printed, logged and warned is captured."""
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "inputs"
    shutil.copytree(flat, inputs)
    left_cc = by_case(cbis_dicoms, "P_00173", "L", "CC")
    extra = {
        "ct": dicom_copy(left_cc, inputs / "img_8.dcm", Modality="CT", PatientID="ANON-1", PatientName="ANON-1"),
        "raw": dicom_copy(left_cc, inputs / "img_9.dcm", PresentationIntentType="FOR PROCESSING",
                          PatientID="ANON-2", PatientName="ANON-2"),
        "wrong_side": dicom_copy(left_cc, inputs / "img_10.dcm", Laterality="R", PatientID="ANON-3",
                                 PatientName="ANON-3"),
        "secret": dicom_copy(by_case(cbis_dicoms, "P_00820", "L", "MLO"), inputs / "img_11.dcm", **SECRETS),
    }
    truncated = dicom_copy(left_cc, root / "full.dcm", PatientID="ANON-4", PatientName="ANON-4")
    data = truncated.read_bytes()
    (inputs / "img_12.dcm").write_bytes(data[: len(data) // 2])
    extra["truncated"] = inputs / "img_12.dcm"
    (inputs / "img_13.dcm").write_text("patient list, not an image\n")
    evil = root / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../x.dcm", left_cc.read_bytes()[:1000])
    out = root / "out"
    link = out / "link.csv"
    titles = []
    original_overlay = explain.save_overlay

    def recording_overlay(images, maps, path, title=None, **kw):
        titles.append(title)
        return original_overlay(images, maps, path, title=title, **kw)

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root_logger = logging.getLogger()
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        patch.setattr(explain, "save_overlay", recording_overlay)
        root_logger.addHandler(handler)
        level = root_logger.level
        root_logger.setLevel(logging.DEBUG)
        try:
            summary = predict(bundle, [inputs, evil], out, heatmaps=True, sr=True, link_file=link)
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(level)
    said = stdout.getvalue() + stderr.getvalue() + "".join(str(w.message) for w in caught)
    said += "".join(record.getMessage() for record in records) + "\n".join(summary.lines())
    truth = {hashlib.sha256(path.read_bytes()).hexdigest(): cbis_truth(path) for path in inputs.glob("img_[0-7].dcm")}
    document = json.loads((out / "predictions.json").read_text())
    return {"out": out, "inputs": inputs, "summary": summary, "said": said, "titles": titles, "link": link,
            "extra": extra, "truth": truth, "document": document, "evil": evil, "root": root}


def breast_of(batch: dict, path: Path) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return next(b for b in batch["document"]["breasts"].values() if digest in b["input_sha256"])


def test_the_four_cbis_breasts_are_predicted(batch):
    cbis = [b for b in batch["document"]["breasts"].values() if set(b["input_sha256"]) <= set(batch["truth"])]
    assert len(cbis) == 4
    seen = set()
    for breast in cbis:
        cases = {batch["truth"][entry["sha256"]] for entry in breast["images"]}
        (patient,) = {c[0] for c in cases}
        assert {c[1] for c in cases} == {breast["side"]}
        assert breast["verdict"] == "ok"  # random weights: the two models may disagree, the one reason allowed
        assert all(reason.startswith("the fold models disagree") for reason in breast["reasons"])
        assert breast["views_used"] == ["CC", "MLO"] == breast["view_slots"]
        assert {entry["view"]: batch["truth"][entry["sha256"]][2] for entry in breast["images"]} == \
            {"CC": "CC", "MLO": "MLO"}
        for kind in ("probabilities", "raw_probabilities"):
            assert list(breast[kind]) == CLASSES and abs(sum(breast[kind].values()) - 1) < 1e-6
        assert breast["predicted"] == max(breast["probabilities"], key=breast["probabilities"].get)
        assert len(breast["per_model_probabilities"]) == 2 and breast["disagreement"] >= 0
        assert breast["bundle_sha256"] == "ab" * 32
        seen.add((patient, breast["side"]))
    assert seen == {("P_00173", "L"), ("P_00173", "R"), ("P_00820", "L"), ("P_00820", "R")}
    # the model saw different images: not one constant answer
    assert len({json.dumps(b["probabilities"]) for b in cbis}) == 4


def test_csv_and_json_agree(batch):
    import pandas as pd

    table = pd.read_csv(batch["out"] / "predictions.csv", keep_default_na=False)
    document = batch["document"]
    assert list(table.columns[:4]) == ["exam_key", "side", "verdict", "predicted"]
    assert {f"prob_{c}" for c in CLASSES} | {f"raw_prob_{c}" for c in CLASSES} <= set(table.columns)
    assert set(table["exam_key"]) == set(document["breasts"])
    for row in table.to_dict("records"):
        breast = document["breasts"][row["exam_key"]]
        assert row["verdict"] == breast["verdict"]
        if breast["probabilities"] is not None:
            for name in CLASSES:
                assert abs(float(row[f"prob_{name}"]) - breast["probabilities"][name]) < 1e-12
                assert abs(float(row[f"raw_prob_{name}"]) - breast["raw_probabilities"][name]) < 1e-12
    for name in document["breasts"]:
        assert json.loads((batch["out"] / "breasts" / f"{name}.json").read_text()) == document["breasts"][name]
    summary = batch["summary"]
    assert (summary.ok, summary.degraded, summary.refused) == (4, 1, 4)
    assert document["summary"]["ok"] == 4 and document["bundle"]["class_names"] == CLASSES


def test_bad_files_are_refused_with_reasons_and_the_batch_goes_on(batch):
    extra = batch["extra"]
    expected = {"ct": "not MG", "raw": "FOR PROCESSING", "truncated": "truncated",
                "wrong_side": "laterality contradicted"}
    for name, words in expected.items():
        breast = breast_of(batch, extra[name])
        assert breast["verdict"] == "refused", name
        assert breast["probabilities"] is None and breast["predicted"] is None
        assert any(words in reason for reason in breast["reasons"]), (name, breast["reasons"])
    refused = {Path(entry["input"].split("!")[0]).name: entry["reason"] for entry in batch["summary"].refused_inputs}
    assert set(refused) == {"img_13.dcm", "evil.zip"}
    assert "not a DICOM" in refused["img_13.dcm"] and "traversal" in refused["evil.zip"]
    # Nothing was written where "../../x.dcm" would land: beside the inputs or above the extraction folder.
    temp = Path(tempfile.gettempdir())
    assert not list(batch["root"].rglob("x.dcm")) and not (temp / "x.dcm").exists()
    assert not (temp.parent / "x.dcm").exists()
    assert (batch["out"] / "refused_inputs.csv").read_text().count("\n") == 3
    assert "refused" in batch["summary"].reasons and "degraded" in batch["summary"].reasons


def test_a_breast_with_one_view_is_degraded(batch):
    breast = breast_of(batch, batch["extra"]["secret"])
    assert breast["verdict"] == "degraded"
    assert breast["views_used"] == ["MLO"] and breast["view_slots"] == ["MLO", "MLO"]
    assert any("CC view missing" in reason and "duplicated" in reason for reason in breast["reasons"])
    assert abs(sum(breast["probabilities"].values()) - 1) < 1e-6


def test_no_identifier_leaves_a_trace(batch, cbis_dicoms):
    out, link = batch["out"], batch["link"]
    identifiers = set(SECRETS.values()) | {"P_00173", "P_00820", "Mass-Test", "ANON-1", "ANON-2", "ANON-3"}
    for path in [*batch["inputs"].glob("*.dcm"), *cbis_dicoms]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        identifiers |= {str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)}
    identifiers.add("Zyxwv")  # the family name alone
    for path, data in all_bytes_under(out, skip=(out / "sr", link)):
        found = [i for i in identifiers if i.encode() in data or i.encode("utf-16-le") in data]
        assert not found, (path, found)
    assert not [i for i in identifiers if i in batch["said"]]
    # the opt-in link file holds the identifying side of the keys; SR files carry the patient module
    linked = link.read_text()
    assert SECRETS["AccessionNumber"] in linked and str(pydicom.dcmread(
        batch["extra"]["secret"], stop_before_pixels=True).StudyInstanceUID) in linked
    assert oct(link.stat().st_mode & 0o777) == "0o600"


def test_heatmaps_lie_on_the_original_image(batch):
    done = [b for b in batch["document"]["breasts"].values() if b["verdict"] != "refused"]
    assert done and all(b["heatmaps"] for b in done)
    for breast in done:
        for view, entry in breast["heatmaps"].items():
            source = next(e for e in breast["images"] if e["used"] and e["view"] == view)
            heat = np.asarray(Image.open(batch["out"] / entry["map"]))
            assert heat.shape == (source["rows"], source["cols"]) == tuple(entry["shape"])
            assert heat.std() > 0 and heat.max() > 0
            assert (batch["out"] / entry["overlay"]).is_file()
    assert batch["titles"] and all(OVERLAY_SENTENCE in title for title in batch["titles"])
    assert "not a tumour outline" in OVERLAY_SENTENCE


def test_one_sr_per_study(batch):
    from tlese.predict.sr import read_sr

    files = sorted((batch["out"] / "sr").glob("*.dcm"))
    # 8 CBIS studies (one per view) + the refused CT / FOR PROCESSING / side / truncated exams + the degraded one
    assert len(files) == 13
    verdicts = []
    for path in files:
        got = read_sr(path)
        assert got["algorithm"]["bundle_sha256"] == "ab" * 32 and got["algorithm"]["intended_use"] == "test only"
        verdicts += [breast["verdict"] for breast in got["breasts"].values()]
    assert sorted(verdicts).count("ok") == 8 and verdicts.count("degraded") == 1 and verdicts.count("refused") == 4


def test_heatmap_geometry_undoes_crop_resize_and_flip(cbis_dicoms):
    params = PreprocessParams.build(64, "mammo")
    path = by_case(cbis_dicoms, "P_00173", "R", "MLO")
    prepared, info = prepare_file(path, "R", "MLO", params)
    assert info["flipped"]
    pixels, _ = read_image(path)
    back = map_to_original(prepared, info, params, pixels.shape)
    r0, r1, c0, c1 = info["crop_box"]
    assert back.shape == pixels.shape and not back[:, :c0].any() and not back[:, c1:].any()
    original = normalise_intensity(pixels, None)[r0:r1, c0:c1]
    assert np.corrcoef(back[r0:r1, c0:c1].ravel()[::97], original.ravel()[::97])[0, 1] > 0.8
    unflipped = dict(info, flipped=False)
    wrong = map_to_original(prepared, unflipped, params, pixels.shape)
    assert np.corrcoef(wrong[r0:r1, c0:c1].ravel()[::97], original.ravel()[::97])[0, 1] < 0.5


# ---------------------------------------------------------------------------------------------------------------
# Reruns: keys, resume


def test_rerun_resumes_without_recomputing(flat, bundle, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = predict(bundle, [flat], out)
    table = (out / "predictions.csv").read_text()
    assert (out / ".salt").is_file() and oct((out / ".salt").stat().st_mode & 0o777) == "0o600"
    (out / "predictions.csv").unlink()
    (out / "predictions.json").unlink()

    def fail(x):
        raise AssertionError("recomputed a breast already done")

    monkeypatch.setattr(bundle, "predict_arrays", fail)
    second = predict(bundle, [flat], out)
    assert (second.resumed, second.computed, second.ok) == (4, 0, 4) and first.computed == 4
    assert (out / "predictions.csv").read_text() == table
    # a changed input file is recomputed, alone
    monkeypatch.undo()
    calls = []
    original = bundle.predict_arrays

    def counting(x):
        calls.append(len(x))
        return original(x)

    monkeypatch.setattr(bundle, "predict_arrays", counting)
    changed = tmp_path / "changed"
    shutil.copytree(flat, changed)
    dicom_copy(changed / "img_0.dcm", changed / "img_0.dcm", new_study=False)
    third = predict(bundle, [changed], out)
    assert calls == [1] and (third.resumed, third.computed) == (3, 1)


def test_an_interrupted_run_keeps_what_it_finished(flat, bundle, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(predict_module, "CHUNK", 1)
    original, calls = bundle.predict_arrays, []

    def dies_on_the_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(x)

    monkeypatch.setattr(bundle, "predict_arrays", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        predict(bundle, [flat], out)
    assert len(list((out / "breasts").glob("*.json"))) == 2 and not (out / "predictions.csv").exists()
    assert not [p for p in (out / "breasts").iterdir() if p.suffix != ".json"]  # no half-written file
    monkeypatch.setattr(bundle, "predict_arrays", original)
    summary = predict(bundle, [flat], out)
    assert (summary.resumed, summary.computed, summary.ok) == (2, 2, 4)


def test_keys_are_salted_and_stable(flat, bundle, tmp_path):
    first = predict(bundle, [flat], tmp_path / "a", salt="s3cret")
    keys = set(json.loads((tmp_path / "a" / "predictions.json").read_text())["breasts"])
    assert keys == {exam_key("s3cret", f"cbis:{p}|{s}") for p in ("P_00173", "P_00820") for s in "LR"}
    assert not (tmp_path / "a" / ".salt").exists() and first.ok == 4
    predict(bundle, [flat], tmp_path / "b")
    predict(bundle, [flat], tmp_path / "b")
    other = set(json.loads((tmp_path / "b" / "predictions.json").read_text())["breasts"])
    assert len(other) == 4 and not other & keys
    assert len(list((tmp_path / "b" / "breasts").glob("*.json"))) == 4  # the rerun found its own keys


# ---------------------------------------------------------------------------------------------------------------
# Other inputs and bundles


def test_a_batch_without_any_image_still_writes_its_outputs(bundle, tmp_path):
    (tmp_path / "notes.dcm").write_text("not an image")
    summary = predict(bundle, [tmp_path / "notes.dcm"], tmp_path / "out", sr=True)
    assert summary.breasts == 0 and len(summary.refused_inputs) == 1
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert document["breasts"] == {} and document["refused_inputs"][0]["reason"].startswith("not a DICOM")


def test_manifest_png_breast(cbis_dicoms, bundle, tmp_path):
    for view in ("CC", "MLO"):
        pixels, _ = read_image(by_case(cbis_dicoms, "P_00820", "R", view))
        scaled = np.round(normalise_intensity(pixels, None) * 65535).astype(np.uint16)
        Image.fromarray(scaled).save(tmp_path / f"{view.lower()}.png")
    (tmp_path / "manifest.csv").write_text("patient,side,view,path\nW-77,R,CC,cc.png\nW-77,R,MLO,mlo.png\n")
    summary = predict(bundle, [tmp_path / "manifest.csv"], tmp_path / "out", salt="k", sr=True)
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert list(document["breasts"]) == [exam_key("k", "manifest:W-77|R")]
    (breast,) = document["breasts"].values()
    assert breast["verdict"] == "ok" and breast["source"] == "manifest" and summary.ok == 1
    assert any("no SR" in note for note in summary.notes) and not (tmp_path / "out" / "sr").exists()


def test_single_view_bundle(cbis_dicoms, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, (side, view) in enumerate((("L", "CC"), ("L", "MLO"), ("R", "CC"))):
        shutil.copy(by_case(cbis_dicoms, "P_00173", side, view), folder / f"img_{index}.dcm")
    summary = predict(make_bundle("single", n_models=1), [folder], tmp_path / "out", heatmaps=True)
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    verdicts = {b["side"]: (b["verdict"], b["views_used"]) for b in document["breasts"].values()}
    assert verdicts == {"L": ("ok", ["CC", "MLO"]), "R": ("degraded", ["CC"])} and summary.degraded == 1
    assert all(b["heatmaps"] for b in document["breasts"].values())


def test_a_bundle_for_larger_images_refuses_small_ones(cbis_dicoms, tmp_path):
    from tlese.data.preprocess import resize_keep_aspect_pad

    pixels, _ = read_image(by_case(cbis_dicoms, "P_00173", "L", "CC"))
    small = resize_keep_aspect_pad(normalise_intensity(pixels, None), 48, anchor="left")
    Image.fromarray(np.round(small * 255).astype(np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "m.csv").write_text("patient,side,view,path\nW-1,L,CC,small.png\n")
    predict(make_bundle(n_models=1), [tmp_path / "m.csv"], tmp_path / "out")
    (breast,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["breasts"].values()
    assert breast["verdict"] == "refused" and any("smaller than the model's input" in r for r in breast["reasons"])


@pytest.mark.slow
def test_onnx_runtime_matches_torch(cbis_dicoms, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "in"
    folder.mkdir()
    for index, view in enumerate(("CC", "MLO")):
        shutil.copy(by_case(cbis_dicoms, "P_00820", "L", view), folder / f"img_{index}.dcm")
    one = make_bundle(n_models=1)
    predict(one, [folder], tmp_path / "torch", salt="k")
    predict(one, [folder], tmp_path / "onnx", salt="k", runtime="onnx")
    (a,) = json.loads((tmp_path / "torch" / "predictions.json").read_text())["breasts"].values()
    (b,) = json.loads((tmp_path / "onnx" / "predictions.json").read_text())["breasts"].values()
    for kind in ("probabilities", "raw_probabilities"):
        assert max(abs(a[kind][c] - b[kind][c]) for c in CLASSES) < 1e-4
    with pytest.raises(ValueError, match="runtime"):
        predict(one, [folder], tmp_path / "x", runtime="tensorrt")


def test_real_tiny_bundle_and_cli(tiny_bundle, flat, tmp_path, capsys):
    from tlese.bundle.format import load_bundle

    real = load_bundle(tiny_bundle)
    parser = argparse.ArgumentParser()
    register_predict(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", str(tiny_bundle), str(flat), "--out", str(tmp_path / "out"),
                              "--salt", "k", "--heatmaps"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "4 breasts: " in printed and "P_00" not in printed
    assert "trained on SYNTHETIC images" in printed  # the tiny bundle is synthetic: said in plain words
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert document["bundle"]["sha256"] == real.sha256 and document["bundle"]["class_names"] == real.class_names
    assert document["bundle"]["synthetic"] is True
    for breast in document["breasts"].values():
        # real CBIS films against a model of synthetic images: ok, or degraded for being out of distribution only
        assert breast["verdict"] == "ok" or (breast["verdict"] == "degraded" and breast["ood_flag"]), breast
        assert abs(sum(breast["probabilities"].values()) - 1) < 1e-6
        assert len(breast["per_model_probabilities"]) == len(real.models) and breast["heatmaps"]


# ---------------------------------------------------------------------------------------------------------------
# Safety: identity conflicts, sealed cache, views per bundle, synthetic and out-of-distribution, files on disk


def test_two_patients_in_one_study_and_one_image_under_two_patients_are_refused(cbis_dicoms, bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    study = pydicom.uid.generate_uid()
    dicom_copy(by_case(cbis_dicoms, "P_00173", "L", "CC"), folder / "a.dcm", new_study=False, StudyInstanceUID=study,
               PatientID="PAT-A", PatientName="A^A")
    dicom_copy(by_case(cbis_dicoms, "P_00820", "L", "MLO"), folder / "b.dcm", new_study=False,
               StudyInstanceUID=study, PatientID="PAT-B", PatientName="B^B")
    shared = dicom_copy(by_case(cbis_dicoms, "P_00820", "R", "MLO"), folder / "c.dcm", PatientID="PAT-C")
    ds = pydicom.dcmread(shared)
    ds.PatientID, ds.StudyInstanceUID = "PAT-D", pydicom.uid.generate_uid()  # same SOPInstanceUID, patient D
    ds.save_as(folder / "d.dcm")
    summary = predict(bundle, [folder], tmp_path / "out", sr=True, salt="k")
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    breasts = list(document["breasts"].values())
    assert len(breasts) == 4 and summary.refused == 4  # four breasts of four patients: none merged, none dropped
    for breast in breasts:
        assert breast["verdict"] == "refused" and breast["probabilities"] is None
        assert len(breast["images"]) == 1 and not breast["images"][0]["used"]
        (conflict,) = [reason for reason in breast["reasons"] if reason.startswith("identity conflict")]
        assert ("StudyInstanceUID" in conflict) == (breast["images"][0]["sha256"] in {
            hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("a.dcm", "b.dcm")})
        assert "PAT-" not in json.dumps(breast) and str(folder) not in json.dumps(breast)
    reasons = " ".join(reason for breast in breasts for reason in breast["reasons"])
    assert all(f"{name}.dcm" in reasons for name in "abcd")  # the conflict named by the inputs' relative paths
    assert not (tmp_path / "out" / "sr").exists() and any("identity conflict" in note for note in summary.notes)


def test_an_edited_cached_result_is_detected_and_recomputed(flat, bundle, tmp_path):
    out = tmp_path / "out"
    predict(bundle, [flat], out)
    path = sorted((out / "breasts").glob("*.json"))[0]
    result = json.loads(path.read_text())
    other = next(name for name in CLASSES if name != result["predicted"])
    path.write_text(json.dumps({**result, "predicted": other}))  # the class contradicts the probabilities now
    again = predict(bundle, [flat], out)
    assert (again.resumed, again.computed) == (3, 1)
    assert any("integrity" in note for note in again.notes)
    assert json.loads(path.read_text()) == result  # recomputed: the same result as the first run


def test_a_single_view_mlo_bundle_given_mlo_images_is_ok(cbis_dicoms, tmp_path):
    from tlese.data.tasks import Task

    mlo_only = make_bundle("single", n_models=1)
    mlo_only.meta["task"] = Task("mlo_subtype", "label", tuple(CLASSES), views=("MLO",)).to_dict()
    folder = tmp_path / "in"
    folder.mkdir()
    for index, (side, view) in enumerate((("L", "MLO"), ("R", "MLO"), ("R", "CC"))):
        shutil.copy(by_case(cbis_dicoms, "P_00173", side, view), folder / f"img_{index}.dcm")
    summary = predict(mlo_only, [folder], tmp_path / "out")
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    verdicts = {b["side"]: (b["verdict"], b["views_used"]) for b in document["breasts"].values()}
    assert verdicts == {"L": ("ok", ["MLO"]), "R": ("ok", ["MLO"])} and summary.ok == 2
    right = next(b for b in document["breasts"].values() if b["side"] == "R")
    assert not any("missing" in reason for b in document["breasts"].values() for reason in b["reasons"])
    assert any("reads MLO images only" in reason for reason in right["reasons"])
    assert document["bundle"]["views_read"] == ["MLO"]


def test_synthetic_and_out_of_distribution_are_said_in_plain_words(cbis_dicoms, tmp_path, capsys):
    import copy
    from types import SimpleNamespace

    from tlese.predict.commands import cmd_predict  # noqa: F401 - the CLI prints Summary.lines()
    from tlese.predict.sr import read_sr

    synthetic = make_bundle(n_models=1)
    synthetic.card = {"intended_use": "test only",
                      "training_data": {"synthetic": True, "validated_on": "synthetic images only"}}
    flagged = copy.copy(synthetic)
    flagged.ood = SimpleNamespace(threshold=3.0)
    scores = iter([9.5, 1.0])  # the first breast unlike the training images, the second like them

    def with_ood(x):
        score = next(scores)
        return {**synthetic.predict_arrays(x), "ood_score": np.full(len(x), score), "ood_flag": np.full(len(x),
                                                                                                       score > 3)}

    folder = tmp_path / "in"
    folder.mkdir()
    for side in "LR":
        for view in ("CC", "MLO"):
            shutil.copy(by_case(cbis_dicoms, "P_00820", side, view), folder / f"{side}_{view}.dcm")
    from tlese.predict import pipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "CHUNK", 1)
        summary = predict(flagged, [folder], tmp_path / "out", sr=True, predictor=with_ood)
    lines = "\n".join(summary.lines())
    assert lines.startswith("WARNING: this model was trained on SYNTHETIC images") and "synthetic images only" in lines
    document = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert document["bundle"]["synthetic"] is True and "SYNTHETIC" in document["bundle"]["warning"]
    by_flag = {b["ood_flag"]: b for b in document["breasts"].values()}
    assert by_flag[True]["verdict"] == "degraded" and by_flag[True]["ood_score"] == 9.5
    assert any(r == "unlike the training images: out-of-distribution score 9.5 above threshold 3"
               for r in by_flag[True]["reasons"])
    assert by_flag[False]["verdict"] == "ok"
    srs = sorted((tmp_path / "out" / "sr").glob("*.dcm"))
    assert srs and all(path.stat().st_mode & 0o777 == 0o600 for path in srs)
    read = [read_sr(path) for path in srs]
    assert all("SYNTHETIC" in sr["series_description"] for sr in read)
    said = " ".join(reason for sr in read for breast in sr["breasts"].values() for reason in breast["reasons"])
    assert "out-of-distribution score 9.5" in said and "SYNTHETIC" in said


def test_outputs_name_no_absolute_path_and_out_must_be_a_folder(flat, bundle, tmp_path):
    secret = tmp_path / "Doe_Jane_19500101"
    shutil.copytree(flat, secret / "exam")
    (secret / "exam" / "notes.dcm").write_text("not an image")
    out = tmp_path / "Doe_Jane_out"
    link = out / "link.csv"
    summary = predict(bundle, [secret], out, link_file=link)
    texts = ["\n".join(summary.lines()), (out / "predictions.json").read_text(),
             (out / "refused_inputs.csv").read_text(), (out / "predictions.csv").read_text()]
    for text in texts:
        assert "Doe_Jane" not in text and str(tmp_path) not in text
    assert "exam/notes.dcm" in texts[2] and link.stat().st_mode & 0o777 == 0o600
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        predict(bundle, [secret], tmp_path / "a_file")


def test_onnx_runtime_uses_the_bundles_own_onnx(bundle, tmp_path):
    import copy

    calls = []

    def own(threads=None, spinning=True):
        calls.append((threads, spinning))
        return bundle.predict_arrays

    with_onnx = copy.copy(bundle)
    with_onnx.onnx_predictor = own
    assert predict_module.make_predictor(with_onnx, "onnx", tmp_path, threads=2, spinning=False) \
        == bundle.predict_arrays
    assert calls == [(2, False)] and not list(tmp_path.iterdir())  # nothing exported
