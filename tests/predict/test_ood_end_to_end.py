"""Out-of-distribution check end to end (issue 18): a single-view MLO bundle whose OOD model is fitted on mini-MIAS
women; held-out mini-MIAS women are rarely flagged (the false-flag rate is printed), chest X-rays labelled MG / MLO
are flagged in predict (PNG manifest and DICOM), in the DICOM SR and in serve's JSON answer and result page.

The bundle is `exam_helpers.random_bundle` (two random-weight lite0_plain models, 64 px) with an MLO-only task:
random features vary with the input (1-epoch trained models collapse, docs/ood_and_calibration.md) but separate
chest X-rays from mammograms only coarsely (8 of 9 flagged; one of two grey photographs: the xfail test). The OOD
model is fitted with few principal components (`OOD_COMPONENTS`); fit_ood's defaults (at most one component per 10
training images, the threshold from cross-fitted scores only) flag the same chest X-rays. Before that change its 64
components on 192 images over-fitted: in-sample scores set the threshold (98 % quantile 110), far above unseen
mammograms' cross-fitted scores (about 45), and no chest X-ray was flagged.
Chest X-rays and photographs are labelled with the side they face, so the laterality check does not refuse them
before the OOD check runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from exam_helpers import CLASSES, cbis_truth, random_bundle
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tlese.bundle.ood import fit_ood, penultimate_features
from tlese.data.preprocess import prepare_file
from tlese.predict.pipeline import predict
from tlese.predict.sr import read_sr

TRAIN_WOMEN = 96  # of mini-MIAS's 128, in patient order; the other 32 are the held-out women
OOD_COMPONENTS = 8
CXR_EVERY = 100  # every 100th chest X-ray of labels.csv: 9 images
MAX_FALSE_FLAG_RATE = 0.10  # measured 0.0 (0 of 64 held-out images); the OOD model aims at 2 % (98 % quantile)
MIN_CXR_FLAG_RATE = 0.8  # measured 8 of 9: random-weight features miss one chest X-ray (score 13.9, threshold 18.9)
REASON = "unlike the training images"


def mias_rows(mias_dir: Path) -> list[dict]:
    with (mias_dir / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def features_of(bundle, files: list[tuple[Path, str]]) -> np.ndarray:
    """`penultimate_features` of (file, side) pairs prepared exactly as predict prepares an MLO image."""
    x = np.stack([prepare_file(path, side, "MLO", bundle.preprocess)[0] for path, side in files])[:, None]
    return penultimate_features(bundle.models, x)


@pytest.fixture(scope="module")
def mias_split(mias_dir) -> tuple[list[dict], list[dict]]:
    rows = mias_rows(mias_dir)
    women = sorted({row["patient_id"] for row in rows})
    train = set(women[:TRAIN_WOMEN])
    return [r for r in rows if r["patient_id"] in train], [r for r in rows if r["patient_id"] not in train]


@pytest.fixture(scope="module")
def train_features(mias_dir, mias_split):
    bundle = random_bundle("single", n_models=2, size=64)
    train, _ = mias_split
    features = features_of(bundle, [(mias_dir / row["file"], row["side"]) for row in train])
    return bundle, features, np.array([row["patient_id"] for row in train])


@pytest.fixture(scope="module")
def bundle(train_features):
    """The random single-view bundle with an OOD model fitted on the training women's MLOs, grouped by woman."""
    from tlese.data.tasks import Task

    base, features, groups = train_features
    ood = fit_ood(features, views=1, seed=0, groups=groups, max_components=OOD_COMPONENTS)
    task = Task("ood_test_mlo", "label", tuple(CLASSES), views=("MLO",))  # an MLO-only task: MLO alone is "ok"
    return dataclasses.replace(base, ood=ood, meta={**base.meta, "task": task.to_dict()})


@pytest.fixture(scope="module")
def cxr_files(cxr_dir, train_features) -> list[tuple[Path, str]]:
    """(chest X-ray, the side its "breast" faces): labelled with that side, the laterality check does not refuse it
    before the OOD check runs (a chest X-ray labelled against its facing is refused for that, verdict "refused")."""
    params = train_features[0].preprocess
    with (cxr_dir / "labels.csv").open(newline="") as handle:
        files = [cxr_dir / row["file"] for row in list(csv.DictReader(handle))[::CXR_EVERY]]
    return [(path, prepare_file(path, None, "MLO", params)[1]["facing"]) for path in files]


def write_manifest(path: Path, rows: list[tuple[str, str, str, Path]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "side", "view", "path"])
        writer.writerows([patient, side, view, str(file)] for patient, side, view, file in rows)
    return path


def breasts_of(out: Path) -> list[dict]:
    return list(json.loads((out / "predictions.json").read_text())["breasts"].values())


def grey_photographs(folder: Path) -> list[Path]:
    from skimage import color, data

    paths = []
    for name in ("astronaut", "camera"):
        image = getattr(data, name)()
        if image.ndim == 3:
            image = (color.rgb2gray(image) * 255).round().astype(np.uint8)
        paths.append(folder / f"{name}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def assert_flagged(breast: dict) -> None:
    assert breast["ood_flag"] is True, (breast["ood_score"], breast["reasons"])
    assert any(reason.startswith(REASON) for reason in breast["reasons"]), breast["reasons"]
    assert breast["verdict"] in ("degraded", "refused") and breast["verdict"] != "ok"


def cxr_as_mammogram_dicom(template: Path, cxr: Path, target: Path) -> Path:
    """`template` (a CBIS left MLO) with the chest X-ray's pixels as 16-bit MONOCHROME2, uncompressed, new UIDs."""
    ds = pydicom.dcmread(template)
    pixels = np.asarray(Image.open(cxr).convert("L"), dtype=np.uint16) * 257
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "ModalityLUTSequence", "RescaleSlope",
                    "RescaleIntercept", "PresentationLUTShape"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.ViewPosition, ds.ImageLaterality = "MG", "MLO", "L"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def cxr_dicom(bundle, cbis_dicoms, cxr_files, tmp_path_factory) -> Path:
    """The chest X-ray facing L that scores highest as a DICOM MG / MLO / L: these tests are about the flag reaching
    the SR and the service, not about the detection margin (which the manifest test covers)."""
    left = [path for path, side in cxr_files if side == "L"]
    chest = left[int(np.argmax(bundle.ood.score(features_of(bundle, [(path, "L") for path in left]))))]
    template = next(path for path in cbis_dicoms if cbis_truth(path)[1:] == ("L", "MLO"))
    return cxr_as_mammogram_dicom(template, chest, tmp_path_factory.mktemp("cxr_dicom") / "chest.dcm")


def test_held_out_mias_women_are_rarely_flagged(bundle, mias_dir, mias_split, tmp_path):
    _, held_out = mias_split
    manifest = write_manifest(tmp_path / "mias.csv", [(row["patient_id"], row["side"], "MLO", mias_dir / row["file"])
                                                       for row in held_out])
    summary = predict(bundle, [manifest], tmp_path / "out")
    breasts = breasts_of(tmp_path / "out")
    assert len(breasts) == len(held_out) == 64 and summary.refused == 0
    flags = np.array([breast["ood_flag"] for breast in breasts])
    assert all(breast["ood_score"] is not None for breast in breasts)
    for breast, flagged in zip(breasts, flags):
        assert any(reason.startswith(REASON) for reason in breast["reasons"]) == flagged
        assert not any("view missing" in reason for reason in breast["reasons"])  # an MLO task needs no CC
    print("held-out verdicts:", {verdict: sum(b["verdict"] == verdict for b in breasts) for verdict in
                                 ("ok", "degraded", "refused")})
    rate = float(flags.mean())
    print(f"mini-MIAS held-out women: false-flag rate {rate:.3f} ({int(flags.sum())} of {len(flags)} images; "
          f"threshold {bundle.ood.threshold:.4g}, cross-fitted training rate {bundle.ood.info['false_flag_rate']:.3f})")
    assert rate <= MAX_FALSE_FLAG_RATE


def test_chest_xrays_labelled_mlo_are_flagged_in_predict(bundle, cxr_files, tmp_path):
    rows = [(f"cxr{index}", side, "MLO", path) for index, (path, side) in enumerate(cxr_files)]
    predict(bundle, [write_manifest(tmp_path / "cxr.csv", rows)], tmp_path / "out")
    breasts = breasts_of(tmp_path / "out")
    assert len(breasts) == len(cxr_files)
    print("chest X-ray OOD scores:", sorted(round(b["ood_score"], 1) for b in breasts),
          f"threshold {bundle.ood.threshold:.4g}")
    flagged = [breast for breast in breasts if breast["ood_flag"]]
    for breast in flagged:
        assert_flagged(breast)
    assert all(breast["ood_score"] is not None for breast in breasts)
    assert len(flagged) >= MIN_CXR_FLAG_RATE * len(breasts), f"{len(flagged)} of {len(breasts)} chest X-rays flagged"


def test_dicom_chest_xray_labelled_mg_mlo_is_flagged_in_predict_and_the_sr(bundle, cxr_dicom, tmp_path):
    summary = predict(bundle, [cxr_dicom], tmp_path / "out", sr=True)
    (breast,) = breasts_of(tmp_path / "out")
    assert breast["side"] == "L" and breast["views_used"] == ["MLO"]
    assert_flagged(breast)
    assert summary.degraded + summary.refused == 1 and summary.ok == 0
    (sr_file,) = sorted((tmp_path / "out" / "sr").glob("*.dcm"))
    reported = read_sr(sr_file)["breasts"]["L"]
    assert reported["verdict"] == breast["verdict"]
    assert any(REASON in reason for reason in reported["reasons"]), reported["reasons"]


def test_serve_says_unlike_the_training_images(bundle, cxr_dicom, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tlese.serve.app import create_app
    from tlese.serve.uploads import Limits

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    files = [("files", ("chest.dcm", cxr_dicom.read_bytes(), "application/dicom"))]
    with TestClient(create_app(bundle, Limits(), state_dir=tmp_path / "state")) as client:
        api = client.post("/api/v1/predict", files=files)
        assert api.status_code == 200, api.text
        (breast,) = api.json()["breasts"].values()
        assert_flagged(breast)
        page = client.post("/predict", files=files)
        assert page.status_code == 200, page.text
        assert page.text.count('class="ood-warning"') == 1 and "Unlike the training" in page.text
        assert REASON in page.text


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="random-weight features do not separate every grey photograph from mammograms (measured: "
                   "camera 10.6, astronaut 32.0, threshold 18.9); needs a trained bundle's features")
def test_a_grey_photograph_labelled_mlo_is_flagged(bundle, tmp_path):
    rows = [(path.stem, prepare_file(path, None, "MLO", bundle.preprocess)[1]["facing"], "MLO", path)
            for path in grey_photographs(tmp_path)]
    predict(bundle, [write_manifest(tmp_path / "photos.csv", rows)], tmp_path / "out")
    breasts = breasts_of(tmp_path / "out")
    scores = [round(b["ood_score"], 1) for b in breasts]
    print("photograph OOD scores:", scores, f"threshold {bundle.ood.threshold:.4g}")
    for breast in breasts:
        assert_flagged(breast)


def test_the_default_ood_fit_flags_chest_xrays(train_features, cxr_files):
    """fit_ood's defaults (what bundles use): at most one principal component per 10 training images and the threshold
    from cross-fitted scores only. With 64 components on 192 images and the threshold floored at the in-sample
    quantile, no chest X-ray was flagged; now 8 of these 9 are (the same as with 8 components)."""
    base, features, groups = train_features
    ood = fit_ood(features, views=1, seed=0, groups=groups)
    assert ood.meta()["n_components"] <= len(features) // 10
    assert ood.flag(features_of(base, cxr_files)).mean() >= 0.8
