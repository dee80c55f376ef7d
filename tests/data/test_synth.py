"""Synthetic data: real on-disk layouts that the adapters load, proper DICOM tags, seeded, classes overlapping."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from tlese.data.datasets import load_dataset
from tlese.data.io import read_image
from tlese.data.synth import ATYPICAL_FRACTION, LESION_PARAMS, _draw_lesion, synthesize
from tlese.data.tasks import get_task
from tlese.vocab import CMMD_SUBTYPES as SUBTYPES


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    return synthesize(tmp_path_factory.mktemp("synth"), n_patients=20, image_size=96, cxr_per_class=6, seed=3)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".dcm", ".png", ".csv"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_mammograms_follow_the_cmmd_tcia_layout_and_load_with_the_cmmd_adapter(synthetic):
    files = sorted(synthetic["mammo_root"].rglob("*.dcm"))
    # CMMD/<ID1>/<study>/<series>/1-N.dcm
    assert files and all(len(path.relative_to(synthetic["mammo_root"]).parts) == 5 for path in files)
    assert all(path.parts[-5] == "CMMD" and path.name.startswith("1-") for path in files)
    clinical = pd.read_excel(synthetic["clinical_file"], dtype=str, keep_default_na=False)
    assert list(clinical.columns) == ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
    table = load_dataset("cmmd", synthetic["mammo_root"])
    assert len(table) == len(files) == 2 * len(clinical)
    views = table.groupby(["patient_id", "side"])["view"].apply(sorted)
    assert len(views) == len(clinical) and all(found == ["CC", "MLO"] for found in views)
    encoded, report = get_task("synth_subtype4").encode(table)
    assert set(encoded["target_name"]) == set(SUBTYPES)
    assert report.dropped.get("empty label", 0) == 2 * (clinical["subtype"] == "").sum() > 0  # benign breasts
    assert report.single_view_breasts == 0


def test_dicom_headers_are_proper_and_carry_no_real_identity(synthetic):
    files = sorted(synthetic["mammo_root"].rglob("*.dcm"))
    photometrics, bits = set(), set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        patient_folder = path.parts[-4]
        assert ds.Modality == "MG" and ds.PatientID == patient_folder and str(ds.PatientName) == patient_folder
        assert ds.ImageLaterality in ("L", "R") and ds.ViewPosition in ("CC", "MLO")
        assert ds.ViewCodeSequence[0].CodeMeaning in ("cranio-caudal", "medio-lateral oblique")
        photometrics.add(ds.PhotometricInterpretation)
        bits.add(int(ds.BitsStored))
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"} and bits == {12, 16}


def test_monochrome1_images_read_bright_tissue_on_dark_background(synthetic):
    for path in sorted(synthetic["mammo_root"].rglob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1":
            pixels, header = read_image(path)
            # the background corner is opposite the chest wall (left edge for L breasts, right edge for R)
            corner = pixels[:5, :5].mean() if header.side == "R" else pixels[:5, -5:].mean()
            centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2]
            assert centre > corner  # breast brighter than the background after inversion
            break
    else:
        pytest.fail("no MONOCHROME1 image written")


def test_chest_xrays_in_darkcovidnet_layout_with_repeat_patients(synthetic):
    cxr = load_dataset("darkcovidnet", synthetic["cxr_root"])
    assert cxr["label"].value_counts().to_dict() == {"covid": 6, "no_findings": 6, "pneumonia": 6}
    assert cxr["patient_id"].nunique() < len(cxr)  # follow-up images share a patient
    assert (cxr.groupby("patient_id")["label"].nunique() == 1).all()
    encoded, report = get_task("synth_cxr3").encode(cxr)
    assert report.rows_out == 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folders = load_dataset("cxr_folders", synthetic["cxr_root"] / "images")
    assert sorted(folders["path"]) == sorted(cxr["path"])


def test_same_seed_same_files_different_seed_different_files(tmp_path):
    first = synthesize(tmp_path / "a", n_patients=6, image_size=64, cxr_per_class=2, seed=5)
    second = synthesize(tmp_path / "b", n_patients=6, image_size=64, cxr_per_class=2, seed=5)
    third = synthesize(tmp_path / "c", n_patients=6, image_size=64, cxr_per_class=2, seed=6)
    assert tree_digest(first["root"]) == tree_digest(second["root"])
    assert tree_digest(first["root"]) != tree_digest(third["root"])


def test_subtype_lesions_differ_on_average_but_overlap():
    rng = np.random.default_rng(0)
    lesions = {subtype: [_draw_lesion(subtype, rng) for _ in range(400)] for subtype in SUBTYPES}
    radius = {subtype: np.array([lesion["radius"] for lesion in drawn]) for subtype, drawn in lesions.items()}
    calcs = {subtype: np.array([lesion["n_calcs"] for lesion in drawn]) for subtype, drawn in lesions.items()}
    assert radius["triple negative"].mean() > radius["Luminal A"].mean() + 0.02
    assert calcs["HER2-enriched"].mean() > calcs["Luminal A"].mean() + 5
    # overlapping: some triple-negative lesions are smaller than the median Luminal A lesion (atypical ones)
    assert 0.01 < (radius["triple negative"] < np.median(radius["Luminal A"])).mean() < 0.2
    assert set(LESION_PARAMS) >= set(SUBTYPES)


def test_exact_lesion_parameters_separate_subtypes_well_but_not_perfectly():
    """The ceiling a model could reach: high enough to learn from, below 1 because some lesions look atypical."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    features, labels = [], []
    for index, subtype in enumerate(SUBTYPES):
        for _ in range(300):
            lesion = _draw_lesion(subtype, rng)
            features.append([lesion[key] for key in ("radius", "contrast", "blur", "spicules", "n_calcs")])
            labels.append(index)
    features, labels = np.array(features), np.array(labels)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probabilities = cross_val_predict(model, features, labels, cv=5, method="predict_proba")
    accuracy = (probabilities.argmax(axis=1) == labels).mean()
    assert 0.8 < accuracy < 1 - ATYPICAL_FRACTION / 2
    assert 0.88 < roc_auc_score(labels, probabilities, multi_class="ovr") < 0.98


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    synthesize(tmp_path, n_patients=8, image_size=64, cxr_per_class=1, seed=0)
    with pytest.raises(ValueError, match="cmmd: already exists"):
        synthesize(tmp_path, n_patients=4, image_size=64, cxr_per_class=1, seed=0)
    paths = synthesize(tmp_path, n_patients=4, image_size=64, cxr_per_class=1, seed=0, overwrite=True)
    assert load_dataset("cmmd", paths["mammo_root"])["patient_id"].nunique() == 4  # no left-over patients


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_patients"):
        synthesize(tmp_path, n_patients=2)
    with pytest.raises(ValueError, match="image_size"):
        synthesize(tmp_path, image_size=16)
