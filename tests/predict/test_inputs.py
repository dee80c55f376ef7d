"""Collecting prediction inputs: folders, zips (safely), manifests; grouping into breasts from the tags alone."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from exam_helpers import cbis_truth, dicom_copy
from pydicom.uid import generate_uid

from tlese.predict.inputs import (
    UnsafeArchiveError,
    cbis_patient,
    collect_inputs,
    header_problems,
    read_input,
    safe_extract_zip,
    safe_reason,
    sniff_image,
)


def test_groups_the_cbis_files_into_four_breasts_by_their_tags(flat):
    truth = {path.name: cbis_truth(path) for path in flat.iterdir()}
    with collect_inputs([flat]) as found:
        assert found.refused == []
        assert len(found.breasts) == 4
        for breast in found.breasts:
            assert breast.group[0] == "cbis"
            assert sorted(image.view for image in breast.images) == ["CC", "MLO"]
            for image in breast.images:
                patient, side, view = truth[image.path.name]
                assert (breast.group[1], breast.side, image.view) == (patient, side, view)
        keys = sorted(breast.key_material for breast in found.breasts)
    assert keys == ["cbis:P_00173|L", "cbis:P_00173|R", "cbis:P_00820|L", "cbis:P_00820|R"]


def test_file_names_play_no_part(flat, tmp_path):
    """Misleading names (a right MLO named left CC) change nothing: sides and views come from the tags."""
    files = sorted(flat.iterdir())
    for index, path in enumerate(files):
        os.symlink(path, tmp_path / f"LEFT_CC_{len(files) - index}.dcm")
    with collect_inputs([tmp_path]) as renamed, collect_inputs([flat]) as plain:
        def layout(found):
            return sorted((b.key_material, tuple(sorted((i.sha256, i.view) for i in b.images))) for b in found.breasts)

        assert layout(renamed) == layout(plain)


def test_other_exams_group_by_study_and_side(cbis_dicoms, tmp_path):
    study = generate_uid()
    left_cc = next(p for p in cbis_dicoms if cbis_truth(p)[1:] == ("L", "CC"))
    left_mlo = next(p for p in cbis_dicoms if cbis_truth(p)[1:] == ("L", "MLO"))
    dicom_copy(left_cc, tmp_path / "a.dcm", StudyInstanceUID=study, PatientID="HOSP-1")
    dicom_copy(left_mlo, tmp_path / "b.dcm", StudyInstanceUID=study, PatientID="HOSP-1")
    dicom_copy(left_mlo, tmp_path / "c.dcm", PatientID="HOSP-1")  # same patient, another exam
    with collect_inputs([tmp_path]) as found:
        groups = sorted((breast.group[0], breast.group[1] == study, len(breast.images)) for breast in found.breasts)
    assert groups == [("study", False, 1), ("study", True, 2)]


def test_not_images_and_missing_laterality_are_refused_inputs(cbis_dicoms, tmp_path):
    (tmp_path / "notes.dcm").write_text("this is not a DICOM file\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    dicom_copy(cbis_dicoms[0], tmp_path / "noside.dcm", Laterality="")
    head = (tmp_path / "head.dcm")
    head.write_bytes(Path(cbis_dicoms[0]).read_bytes()[:400])
    shutil.copy(cbis_dicoms[1], tmp_path / "good.dcm")
    with collect_inputs([tmp_path, tmp_path / "missing.dcm"]) as found:
        reasons = {Path(entry.label).name: entry.reason for entry in found.refused}
        assert len(found.breasts) == 1
    assert set(reasons) == {"notes.dcm", "empty.dcm", "noside.dcm", "head.dcm", "missing.dcm"}
    assert "not a DICOM" in reasons["notes.dcm"] and "empty" in reasons["empty.dcm"]
    assert "laterality" in reasons["noside.dcm"] and "DICOM" in reasons["head.dcm"]
    assert reasons["missing.dcm"] == "not found"


def test_symlinked_folders_are_followed_and_files_read_once(flat, tmp_path):
    os.symlink(flat, tmp_path / "linked")
    with collect_inputs([tmp_path, flat / "img_0.dcm"]) as found:
        assert sum(len(breast.images) for breast in found.breasts) == 8
        assert found.refused == []


def test_header_problems(cbis_dicoms, tmp_path):
    ct = read_input(dicom_copy(cbis_dicoms[0], tmp_path / "ct.dcm", Modality="CT"), "ct")
    raw = read_input(dicom_copy(cbis_dicoms[0], tmp_path / "raw.dcm", PresentationIntentType="FOR PROCESSING"), "r")
    good = read_input(Path(cbis_dicoms[0]), "good")
    assert any("not MG" in problem for problem in ct.problems)
    assert any("FOR PROCESSING" in problem for problem in raw.problems)
    assert good.problems == ()
    assert header_problems(good.header, {"PatientID": "Mass-Test_P_00173_LEFT_CC_1"}) == (
        "ROI mask or cropped image, not a full mammogram",)


def test_cbis_rule_is_the_data_layers():
    assert cbis_patient("Mass-Test_P_00173_LEFT_CC") == "P_00173"
    assert cbis_patient("Calc-Training_P_01234_RIGHT_MLO") == "P_01234"
    assert cbis_patient("HOSP-12345") is None and cbis_patient(None) is None


def test_safe_reason_cuts_free_text_and_scrubs_identifiers():
    assert safe_reason("unreadable DICOM (ValueError: bad value '19700101')") == "unreadable DICOM"
    assert safe_reason("cannot decode pixel data (truncated or corrupt?): short read") == \
        "cannot decode pixel data (truncated or corrupt?)"
    assert safe_reason("DICOM has no Pixel Data (truncated or not an image object)") == \
        "DICOM has no Pixel Data (truncated or not an image object)"
    assert safe_reason("weird SMITH^JOHN thing", ["SMITH^JOHN"]) == "weird [identifier removed] thing"


# ---------------------------------------------------------------------------------------------------------------
# Zip archives


def test_a_zip_is_extracted_and_grouped(flat, tmp_path):
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for index in (0, 1):
            zf.write(flat / f"img_{index}.dcm", f"study/img_{index}.dcm")
    with collect_inputs([archive]) as found:
        assert len(found.breasts) == 1 and found.refused == []
        image = found.breasts[0].images[0]
        assert image.label.startswith("exam.zip!study/") and image.path.is_file()
        extracted = image.path
    assert not extracted.exists()  # the temporary folder is gone once the set is closed


def test_a_zip_with_path_traversal_is_refused_and_writes_nothing(flat, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = work / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(flat / "img_0.dcm", "good.dcm")
        zf.writestr("../../x.dcm", b"DICM" * 10)
    with collect_inputs([archive, flat / "img_1.dcm"]) as found:
        assert [entry.label for entry in found.refused] == ["evil.zip"]  # relative: never the folders above
        assert "traversal" in found.refused[0].reason
        assert len(found.breasts) == 1  # the other input still counts
    assert not list(tmp_path.rglob("x.dcm"))
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError):
        safe_extract_zip(archive, dest)
    assert not (dest / "good.dcm").exists()


def test_zip_links_absolute_paths_and_size_limits_are_refused(flat, tmp_path):
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("x.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    absolute = tmp_path / "absolute.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/tmp/x.dcm", b"x")
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        zf.write(flat / "img_0.dcm", "a.dcm")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", np.zeros(50 * 2**20, dtype=np.uint8).tobytes())
    for archive, words in ((link, "link"), (absolute, "traversal"), (bomb, "bomb")):
        with pytest.raises(UnsafeArchiveError, match=words):
            safe_extract_zip(archive, tmp_path / "out")
    with pytest.raises(UnsafeArchiveError, match="limit"):
        safe_extract_zip(big, tmp_path / "out", max_bytes=1000)
    with pytest.raises(UnsafeArchiveError, match="limit"):
        safe_extract_zip(big, tmp_path / "out", max_members=0)


# ---------------------------------------------------------------------------------------------------------------
# Manifest CSVs


def test_manifest_rows(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 48), dtype=np.uint8)).save(tmp_path / "b.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient,side,view,path\nW-1,left,CC,a.png\nW-1,L,mlo,b.png\nW-1,X,CC,a.png\n"
                        "W-2,R,CC,nothere.png\n")
    with collect_inputs([manifest, tmp_path / "b.png"]) as found:
        assert [(b.group, b.side, sorted(i.view for i in b.images)) for b in found.breasts] == [
            (("manifest", "W-1"), "L", ["CC", "MLO"])]
        reasons = sorted(entry.reason for entry in found.refused)
    assert len(reasons) == 2  # the bad side and the missing file; b.png given again is read once
    assert any("side" in reason for reason in reasons) and any("not found" in reason for reason in reasons)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with collect_inputs([tmp_path / "other.csv"]) as found:
        assert "not a manifest" in found.refused[0].reason


def test_a_png_without_manifest_is_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "lonely.png")
    with collect_inputs([tmp_path]) as found:
        assert found.breasts == [] and "manifest" in found.refused[0].reason


# ---------------------------------------------------------------------------------------------------------------
# Identity conflicts: never a merge, never a silent choice, never a drop


def _two_patients_one_study(cbis_dicoms, folder):
    """Patient A's CC and patient B's MLO (left breast), both under one StudyInstanceUID."""
    folder.mkdir()
    study = generate_uid()
    cc = next(p for p in cbis_dicoms if cbis_truth(p)[1:] == ("L", "CC"))
    mlo = next(p for p in cbis_dicoms if cbis_truth(p)[1:] == ("L", "MLO"))
    dicom_copy(cc, folder / "a.dcm", new_study=False, StudyInstanceUID=study, PatientID="PAT-A")
    dicom_copy(mlo, folder / "b.dcm", new_study=False, StudyInstanceUID=study, PatientID="PAT-B")
    return folder


def test_two_patients_sharing_a_study_uid_are_two_breasts_both_in_conflict(cbis_dicoms, tmp_path):
    folder = _two_patients_one_study(cbis_dicoms, tmp_path / "shared_study")
    with collect_inputs([folder]) as found:
        assert len(found.breasts) == 2  # not merged into one
        assert sorted(len(breast.images) for breast in found.breasts) == [1, 1]
        for breast in found.breasts:
            (conflict,) = breast.conflicts
            assert "StudyInstanceUID" in conflict and "another patient" in conflict
            assert ("b.dcm" if breast.images[0].label == "a.dcm" else "a.dcm") in conflict
            assert "PAT-" not in conflict
        assert found.breasts[0].key_material != found.breasts[1].key_material


def test_one_image_under_two_patients_is_kept_for_both_and_in_conflict(cbis_dicoms, tmp_path):
    source = next(p for p in cbis_dicoms if cbis_truth(p)[1:] == ("R", "MLO"))
    folder = tmp_path / "shared_image"
    folder.mkdir()
    first = dicom_copy(source, folder / "x1.dcm", PatientID="PAT-A")
    import pydicom

    ds = pydicom.dcmread(first)
    ds.PatientID, ds.StudyInstanceUID = "PAT-B", generate_uid()  # same SOPInstanceUID, another patient and study
    ds.save_as(folder / "x2.dcm")
    with collect_inputs([folder]) as found:
        assert len(found.breasts) == 2 and found.refused == []  # neither dropped
        for breast in found.breasts:
            assert any("also given under another patient" in conflict for conflict in breast.conflicts)
    # the same PNG under two patients in a manifest: the bytes match
    from PIL import Image

    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "m.csv").write_text("patient,side,view,path\nA,L,MLO,p.png\nB,L,MLO,p.png\n")
    with collect_inputs([tmp_path / "m.csv"]) as found:
        assert len(found.breasts) == 2
        assert all("m.csv:" in breast.conflicts[0] for breast in found.breasts)
    # the same image twice for one patient is no conflict: used once, noted
    (tmp_path / "n.csv").write_text("patient,side,view,path\nA,L,MLO,p.png\nA,L,MLO,p.png\n")
    with collect_inputs([tmp_path / "n.csv"]) as found:
        (breast,) = found.breasts
        assert breast.conflicts == [] and len(breast.images) == 1 and "given twice" in breast.notes[0]


def test_labels_are_relative_to_the_input_root(flat, tmp_path):
    secret_folder = tmp_path / "Doe_Jane_1950"
    shutil.copytree(flat, secret_folder / "exam")
    with collect_inputs([secret_folder, secret_folder / "exam" / "img_0.dcm", secret_folder / "nothing.dcm"]) as found:
        labels = [image.label for image in found.images] + [entry.label for entry in found.refused]
    assert labels and not any("Doe_Jane" in label or label.startswith("/") for label in labels)
    assert "exam/img_0.dcm" in labels and "nothing.dcm" in labels
    with collect_inputs([secret_folder / "exam" / "img_1.dcm"], label_root=secret_folder) as found:
        assert [image.label for image in found.images] == ["exam/img_1.dcm"]


def test_a_zero_filled_dicom_is_refused_from_its_first_bytes(cbis_dicoms, tmp_path, monkeypatch):
    from tlese.predict import inputs as inputs_module

    zeros = tmp_path / "zeros.dcm"
    with open(zeros, "wb") as handle:
        handle.truncate(300 * 2**20)  # 300 MB of zeros (sparse: nothing written)
    body = tmp_path / "body"
    body.write_bytes(b"\x08\x00" + bytes(2**20))
    parsed = []
    monkeypatch.setattr(inputs_module, "read_header_and_tags", lambda *a: parsed.append(a) or None)
    for path in (zeros, body):
        assert sniff_image(path) is None
        refused = read_input(path, path.name)
        assert "not a DICOM" in refused.reason
    assert parsed == []  # no parser was asked
    bare = tmp_path / "bare"
    bare.write_bytes(Path(cbis_dicoms[0]).read_bytes()[132:])  # no preamble: a bare data set (group 0002 first)
    assert sniff_image(bare) == "dicom" and sniff_image(cbis_dicoms[0]) == "dicom"
