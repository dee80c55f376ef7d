"""CMMD adapter on a messy tree: every bad file is skipped and reported (relative path, reason), never guessed and
never fatal; symlinked patient folders are read; the report carries no patient name, birth date or accession."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tlese.data.datasets import format_skipped, load_dataset, walk_files

CLINICAL_HEADER = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
STUDY = "07-18-2010-NA-NA-79377/1.000000-NA-70244"
# Identifying values written into the headers: none may reach a skip reason or a warning.
SECRETS = {"PatientName": "Doe^Jane", "PatientBirthDate": "19600101", "AccessionNumber": "ACC98765"}


def _dicom(path: Path, patient: str | None, **tags) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    if patient:
        ds.PatientID = patient
    for keyword, value in {**SECRETS, "ViewPosition": "CC", **tags}.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 8, 6
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "download"
    cmmd = root / "CMMD"
    clinical = [["D1-0001", "L", 40, 2, "mass", "Benign", ""],
                ["D1-0002", "L", 41, 2, "mass", "Benign", ""], ["D1-0002", "R", 41, 2, "mass", "Benign", ""],
                ["D1-0003", "L", 42, 2, "mass", "Benign", ""],
                ["D2-0004", "L", 43, 2, "mass", "Malignant", "Luminal A"],
                ["D2-0004", "R", 43, 2, "mass", "Malignant", "Luminal B"],
                ["D1-0005", "R", 44, 2, "mass", "Benign", ""],
                ["D1-0006", "L", 45, 2, "mass", "Benign", ""], ["D1-0007", "L", 46, 2, "mass", "Benign", ""],
                ["D1-0008", "L", 47, 2, "mass", "Benign", ""], ["D1-0009", "L", 48, 2, "mass", "Benign", ""],
                ["D1-0010", "R", 49, 2, "mass", "Benign", ""]]
    root.mkdir()
    pd.DataFrame(clinical, columns=CLINICAL_HEADER).to_csv(root / "CMMD_clinicaldata_revision.csv", index=False)
    good = cmmd / "D1-0001" / STUDY
    _dicom(good / "1-1.dcm", "D1-0001", ImageLaterality="L")
    _dicom(good / "1-2.dcm", "D1-0001", ImageLaterality="L", ViewPosition="MLO")
    (good / "1-3.dcm").write_text("exported by the viewer: not an image\n")  # a .dcm that is text
    (good / "README").write_text("notes\n")  # a stray file without suffix
    data = _dicom(good / "1-4.dcm", "D1-0001", ImageLaterality="L").read_bytes()
    (good / "1-4.dcm").write_bytes(data[:200])  # truncated inside the header
    # the two laterality tags of one image disagree, for a patient with both breasts
    _dicom(cmmd / "D1-0002" / STUDY / "1-1.dcm", "D1-0002", ImageLaterality="R", Laterality="L")
    _dicom(cmmd / "D1-0002" / STUDY / "1-2.dcm", "D1-0002", ImageLaterality="R")
    # a header side the clinical file does not list for this patient
    _dicom(cmmd / "D1-0003" / STUDY / "1-1.dcm", "D1-0003", ImageLaterality="R")
    # no laterality at all, patient with both breasts: cannot tell
    _dicom(cmmd / "D2-0004" / STUDY / "1-1.dcm", "D2-0004")
    _dicom(cmmd / "D2-0004" / STUDY / "1-2.dcm", "D2-0004", ImageLaterality="L")
    # a patient folder kept elsewhere and linked in (and a link back up the tree: a loop)
    elsewhere = tmp_path / "elsewhere" / "D1-0005"
    _dicom(elsewhere / STUDY / "1-1.dcm", "D1-0005", ImageLaterality="R")
    os.symlink(elsewhere, cmmd / "D1-0005")
    os.symlink(cmmd, cmmd / "D1-0001" / "loop")
    # patient D1-0007's folder copied into D1-0006's
    _dicom(cmmd / "D1-0006" / STUDY / "1-1.dcm", "D1-0006", ImageLaterality="L")
    _dicom(cmmd / "D1-0006" / "D1-0007" / STUDY / "1-1.dcm", "D1-0007", ImageLaterality="L")
    # the folder says D1-0008, the header another clinical patient
    _dicom(cmmd / "D1-0008" / STUDY / "1-1.dcm", "D1-0009", ImageLaterality="L")
    # no view
    _dicom(cmmd / "D1-0010" / STUDY / "1-1.dcm", "D1-0010", ImageLaterality="R", ViewPosition=None)
    return root


def test_messy_cmmd_tree_loads_the_good_images_and_reports_every_other_one(messy):
    with pytest.warns(UserWarning, match=r"cmmd at .*: 1[0-9] skipped"):
        table = load_dataset("cmmd", messy)
    assert sorted(table["image_id"]) == [f"CMMD/D1-0001/{STUDY}/1-1.dcm", f"CMMD/D1-0001/{STUDY}/1-2.dcm",
                                         f"CMMD/D1-0002/{STUDY}/1-2.dcm", f"CMMD/D1-0005/{STUDY}/1-1.dcm",
                                         f"CMMD/D1-0006/{STUDY}/1-1.dcm", f"CMMD/D2-0004/{STUDY}/1-2.dcm"]
    assert table.set_index("patient_id").loc["D1-0005", "side"] == "R"  # read through the symlinked folder
    skipped = dict(table.attrs["skipped"])
    expected = {
        f"CMMD/D1-0001/{STUDY}/1-3.dcm": "not a DICOM file",
        f"CMMD/D1-0001/{STUDY}/README": "not a DICOM file (no .dcm suffix): ignored",
        f"CMMD/D1-0001/{STUDY}/1-4.dcm": "DICOM",
        "CMMD/D1-0001/loop": "folder already seen through another path",
        f"CMMD/D1-0002/{STUDY}/1-1.dcm": "laterality tags disagree: ImageLaterality says R, Laterality says L",
        f"CMMD/D1-0003/{STUDY}/1-1.dcm": "laterality conflict: DICOM ImageLaterality says R, "
                                         "CMMD_clinicaldata_revision.csv lists D1-0003 only for L",
        f"CMMD/D2-0004/{STUDY}/1-1.dcm": "no laterality in the header and D2-0004 has rows for both breasts",
        f"CMMD/D1-0006/D1-0007/{STUDY}/1-1.dcm": "the path holds folders of two patients (D1-0006, D1-0007)",
        f"CMMD/D1-0008/{STUDY}/1-1.dcm": "folder D1-0008 but DICOM PatientID D1-0009",
        f"CMMD/D1-0010/{STUDY}/1-1.dcm": "no view in the header",
        "CMMD_clinicaldata_revision.csv: D1-0003 L": "clinical row without any usable image",
        "CMMD_clinicaldata_revision.csv: D2-0004 R": "clinical row without any usable image",
        "CMMD_clinicaldata_revision.csv: D1-0007 L": "clinical row without any usable image",
    }
    for where, reason in expected.items():
        assert where in skipped, where
        assert reason in skipped[where], (where, skipped[where])
    # nothing absolute, nothing identifying
    report = format_skipped(table.attrs["skipped"], limit=100)
    assert str(messy) not in report
    for value in (*SECRETS.values(), "Doe", "Jane"):
        assert value not in report


def test_walk_files_follows_symlinked_folders_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "linked")
    os.symlink(tmp_path, tmp_path / "real" / "up")  # a loop
    files, skipped = walk_files(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in files] == ["linked/a.dcm"]  # folders in sorted order
    assert [where for where, _ in skipped] == ["linked/up", "real"]
    assert all("already seen" in reason for _, reason in skipped)
