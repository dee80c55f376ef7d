"""Embedded synthetic data in real on-disk layouts, so the whole pipeline runs offline with no download.

`synthesize(out_dir)` writes

- `cmmd/`: mammograms in the CMMD TCIA layout, `CMMD/<ID1>/<study>/<series>/1-N.dcm` (DICOM MG, ImageLaterality,
  ViewPosition + ViewCodeSequence, MONOCHROME2 and a few MONOCHROME1, BitsStored 12 or 16, PatientID = the
  synthetic ID1, no names), plus `CMMD_clinicaldata_revision.xlsx` (ID1, LeftRight, Age, number, abnormality,
  classification, subtype). Malignant breasts (cohort D2) carry one of the four molecular subtypes; a few
  benign breasts (D1, and some second breasts) have no subtype, as in the real file. Load with adapter `cmmd`,
  task `synth_subtype4`.
- `cxr/`: chest X-rays in the DarkCovidNet layout, `images/<class>/<stem>.png` + `labels.csv` (image_id, file,
  label, patient_id) for classes covid / no_findings / pneumonia. Load with adapter `darkcovidnet` (or
  `cxr_folders` on `cxr/images`), task `synth_cxr3`.

How the classes differ (overlapping distributions, so a CNN can learn them but not perfectly):
each malignant breast has one lesion shown in both views; by subtype its mean size, contrast, margin blur,
spiculation and number of micro-calcifications differ (Luminal A: smaller, fainter; Luminal B: spiculated;
HER2-enriched: blurred margin, more calcifications; triple negative: larger, round, brighter), each drawn with a
spread that makes the classes overlap (see LESION_PARAMS). Chest X-rays: pneumonia = one dense focal consolidation,
covid = bilateral peripheral lower-zone haze, no_findings = clear lungs; with random anatomy and noise.
Everything is drawn from one `numpy.random.Generator(seed)`: the same seed writes the same pixels and UIDs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from tlese.vocab import CMMD_SUBTYPES

SYNTH_VERSION = 2
"""Bumped whenever the same seed would draw different pixels (2: subtypes visible at 96 px, atypical lesions)."""
CXR_CLASSES = ("covid", "no_findings", "pneumonia")
MAMMO_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}

# Lesion appearance per subtype: (mean, spread) of radius (fraction of image height), contrast, margin blur
# (fraction of radius), spiculation amplitude, and the mean number of calcifications. Spreads overlap on purpose.
LESION_PARAMS = {
    "Luminal A": {"radius": (0.032, 0.008), "contrast": (0.13, 0.03), "blur": (0.10, 0.05),
                  "spicules": (0.10, 0.10), "calcs": 0.3},
    "Luminal B": {"radius": (0.045, 0.009), "contrast": (0.18, 0.04), "blur": (0.12, 0.05),
                  "spicules": (1.00, 0.30), "calcs": 0.5},
    "HER2-enriched": {"radius": (0.058, 0.011), "contrast": (0.13, 0.03), "blur": (0.60, 0.15),
                      "spicules": (0.15, 0.12), "calcs": 12.0},
    "triple negative": {"radius": (0.075, 0.012), "contrast": (0.30, 0.05), "blur": (0.08, 0.04),
                        "spicules": (0.05, 0.05), "calcs": 0.3},
    "benign": {"radius": (0.028, 0.008), "contrast": (0.09, 0.03), "blur": (0.12, 0.05),
               "spicules": (0.0, 0.05), "calcs": 0.3},
}
ATYPICAL_FRACTION = 0.1
"""Share of malignant lesions drawn with the look of another subtype: appearance does not fully determine subtype."""
# The differences are chosen to survive the demo's 96-pixel inputs (about 2.7x smaller than the synthetic 256-pixel
# height): size and brightness separate Luminal A from triple negative, long spicules mark Luminal B and a blurred
# margin with a calcification cluster marks HER2-enriched. Each parameter is drawn with a spread, so the classes
# overlap, and ATYPICAL_FRACTION of the lesions look like another subtype. A logistic regression given the exact
# parameters reaches accuracy 0.89 and macro AUC 0.93 (4 classes; tests/data/test_synth.py checks this).
_ABNORMALITY_BY_SUBTYPE = {"Luminal A": "mass", "Luminal B": "mass", "HER2-enriched": "both",
                           "triple negative": "mass", "benign": "mass"}


def synthesize(
    out_dir: str | Path, n_patients: int = 40, image_size: int = 256, cxr_per_class: int = 30, seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic mammography and chest X-ray sets under `out_dir`; return their paths.

    Keys: root, mammo_root (give it to adapter `cmmd`), clinical_file, cxr_root (adapter `darkcovidnet`),
    cxr_labels, info (JSON with the parameters). `n_patients` counts mammography patients (about one in ten
    benign); `image_size` is the mammogram height and the CXR side, in pixels. Existing `cmmd/` or `cxr/`
    sub-folders are an error (left-over files of another run would join the new set) unless `overwrite`,
    which deletes those two sub-folders first.
    """
    if n_patients < 4:
        raise ValueError(f"n_patients must be at least 4 (one per subtype), got {n_patients}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels, got {image_size}")
    out_dir = Path(out_dir)
    mammo_root, cxr_root = out_dir / "cmmd", out_dir / "cxr"
    for folder in (mammo_root, cxr_root):
        if folder.exists():
            if not overwrite:
                raise ValueError(f"{folder}: already exists; choose another output folder or overwrite it")
            shutil.rmtree(folder)
    rng = np.random.default_rng(seed)
    clinical = _write_mammograms(mammo_root, n_patients, image_size, rng, seed)
    clinical_file = mammo_root / "CMMD_clinicaldata_revision.xlsx"
    clinical.to_excel(clinical_file, index=False, sheet_name="Sheet1")
    cxr_labels = _write_chest_xrays(cxr_root, cxr_per_class, image_size, rng)
    info = out_dir / "synth_info.json"
    info.write_text(json.dumps({"generator": "tlese.data.synth.synthesize", "version": SYNTH_VERSION, "seed": seed,
                                "n_patients": n_patients, "image_size": image_size, "cxr_per_class": cxr_per_class,
                                "breasts": int(len(clinical)),
                                "subtype_counts": clinical["subtype"].value_counts().to_dict()},
                               indent=2, sort_keys=True))
    return {"root": out_dir, "mammo_root": mammo_root, "clinical_file": clinical_file, "cxr_root": cxr_root,
            "cxr_labels": cxr_labels, "info": info}


# ---------------------------------------------------------------------------------------------------------------
# Mammograms


def _patient_plan(n_patients: int, rng: np.random.Generator) -> list[dict]:
    """Who has which breast(s) with which label: ~10% benign (D1 cohort), malignant subtypes balanced (D2)."""
    n_benign = n_patients // 10
    n_malignant = n_patients - n_benign
    subtypes = list(rng.permutation(np.resize(np.array(CMMD_SUBTYPES), n_malignant)))
    plan = []
    for number, subtype in enumerate(subtypes, start=1):
        first_side = str(rng.choice(["L", "R"]))
        breasts = [(first_side, str(subtype))]
        if rng.random() < 0.25:  # some women have rows for both breasts; the other one is benign
            breasts.append(("R" if first_side == "L" else "L", "benign"))
        plan.append({"patient": f"D2-{number:04d}", "breasts": breasts})
    for number in range(1, n_benign + 1):
        plan.append({"patient": f"D1-{number:04d}", "breasts": [(str(rng.choice(["L", "R"])), "benign")]})
    return plan


def _write_mammograms(
    mammo_root: Path, n_patients: int, size: int, rng: np.random.Generator, seed: int
) -> pd.DataFrame:
    rows = []
    image_count = 0
    for entry in _patient_plan(n_patients, rng):
        patient = entry["patient"]
        study = f"{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}-2020-NA-NA-{rng.integers(10000, 99999)}"
        series_dir = mammo_root / "CMMD" / patient / study / f"1.000000-NA-{rng.integers(10000, 99999)}"
        series_dir.mkdir(parents=True, exist_ok=True)
        uids = {name: generate_uid(entropy_srcs=[str(seed), patient, name]) for name in ("study", "series")}
        images = []
        for side, kind in entry["breasts"]:
            lesion = _draw_lesion(kind, rng)
            for view in ("CC", "MLO"):
                images.append((side, view, _mammogram(size, side, view, lesion, rng)))
            rows.append({"ID1": patient, "LeftRight": side, "Age": int(rng.integers(30, 80)), "number": 2,
                         "abnormality": _ABNORMALITY_BY_SUBTYPE[kind],
                         "classification": "Benign" if kind == "benign" else "Malignant",
                         "subtype": "" if kind == "benign" else kind})
        # File numbers do not follow side/view (as in CMMD): readers must use the header.
        for number, index in enumerate(rng.permutation(len(images)), start=1):
            side, view, pixels = images[index]
            # one image in eight is MONOCHROME1 and one in three 12-bit (by count, so even tiny sets have some)
            image_count += 1
            monochrome1 = image_count % 8 == 3
            bits = 12 if image_count % 3 == 0 else 16
            _write_dicom(series_dir / f"1-{number}.dcm", pixels, patient=patient, side=side, view=view,
                         monochrome1=monochrome1, bits_stored=bits, instance=number,
                         sop_uid=generate_uid(entropy_srcs=[str(seed), patient, side, view]), **uids)
    return pd.DataFrame(rows, columns=["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"])


def _draw_lesion(kind: str, rng: np.random.Generator) -> dict:
    """One lesion per breast, shared by its CC and MLO views (same size, look and depth from the chest wall)."""
    if kind != "benign" and rng.random() < ATYPICAL_FRACTION:  # looks like another subtype
        kind = str(rng.choice([other for other in CMMD_SUBTYPES if other != kind]))
    params = LESION_PARAMS[kind]

    def draw(name: str, low: float) -> float:
        mean, spread = params[name]
        return max(low, float(rng.normal(mean, spread)))

    n_spicules = int(rng.integers(5, 11))
    return {
        "radius": draw("radius", 0.012),
        "contrast": draw("contrast", 0.03),
        "blur": draw("blur", 0.03),
        "spicules": draw("spicules", 0.0),
        "spicule_angles": rng.uniform(0, 2 * math.pi, n_spicules),
        "n_calcs": int(rng.poisson(params["calcs"])),
        "depth": float(rng.uniform(0.3, 0.7)),  # fraction of the breast depth, chest wall -> nipple
        "density": float(rng.uniform(0.2, 0.9)),  # fibroglandular density of this breast (a nuisance factor)
    }


def _mammogram(size: int, side: str, view: str, lesion: dict, rng: np.random.Generator) -> np.ndarray:
    """Float image in [0, 1], bright = dense, chest wall on the left for L breasts and on the right for R."""
    rows, cols = size, int(round(size * 0.8))
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float32)
    centre_row = rows * (0.5 if view == "CC" else rng.uniform(0.42, 0.5))
    half_height = rows * (rng.uniform(0.36, 0.44) if view == "CC" else rng.uniform(0.44, 0.5))
    depth = cols * rng.uniform(0.62, 0.8)
    radius = np.sqrt(((r - centre_row) / half_height) ** 2 + (c / depth) ** 2)
    breast = radius < 1.0
    image = np.where(breast, 0.35 + 0.25 * np.sqrt(np.clip(1 - radius**2, 0, 1)), 0.02).astype(np.float32)

    scale = size / 256
    texture = gaussian_filter(rng.standard_normal((rows, cols)).astype(np.float32), 2.0 * scale)
    blobs = gaussian_filter(rng.standard_normal((rows, cols)).astype(np.float32), 7.0 * scale)
    tissue = lesion["density"] * (0.9 * blobs / (blobs.std() + 1e-6) + 0.5 * texture / (texture.std() + 1e-6))
    image += np.where(breast, 0.05 * tissue * np.clip(1.2 - radius, 0, 1), 0)

    if view == "MLO":  # pectoral muscle: a bright triangle in the upper chest-wall corner
        width, height = cols * rng.uniform(0.25, 0.4), rows * rng.uniform(0.45, 0.65)
        muscle = breast & (c < width * (1 - r / height))
        image = np.where(muscle, image + 0.22, image)

    lesion_row = centre_row + half_height * rng.uniform(-0.45, 0.45)
    lesion_col = depth * lesion["depth"]
    image += _lesion_pixels(r, c, lesion_row, lesion_col, lesion, size, rng) * breast

    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    image = np.clip(image, 0, 1) ** rng.uniform(0.85, 1.15)  # exposure differences between images
    return image[:, ::-1] if side == "R" else image


def _lesion_pixels(r, c, row, col, lesion, size, rng) -> np.ndarray:
    radius = lesion["radius"] * size
    reach = radius * (1 + 1.6 * lesion["spicules"]) * (1 + 3 * lesion["blur"]) + 3 * radius + 4
    # Only a window around the lesion is computed: the full-image version dominated the generation time.
    top, bottom = max(0, int(row - reach)), min(r.shape[0], int(row + reach) + 1)
    left, right = max(0, int(col - reach)), min(r.shape[1], int(col + reach) + 1)
    pixels = np.zeros(r.shape, dtype=np.float32)
    if top >= bottom or left >= right:
        return pixels
    wr, wc = r[top:bottom, left:right], c[top:bottom, left:right]
    d_row, d_col = wr - row, wc - col
    rho = np.sqrt(d_row**2 + d_col**2)
    theta = np.arctan2(d_row, d_col)
    # Spicules: narrow angular spikes that stretch the boundary outwards.
    angles = lesion["spicule_angles"] + rng.normal(0, 0.1, lesion["spicule_angles"].shape)
    wrapped = (theta[..., None] - angles + math.pi) % (2 * math.pi) - math.pi
    spikes = np.exp(-((wrapped / 0.12) ** 2)).max(axis=-1)
    boundary = radius * (1 + 1.6 * lesion["spicules"] * spikes)
    softness = lesion["blur"] * radius + 0.5
    window = lesion["contrast"] / (1 + np.exp(-(boundary - rho) / softness))
    for _ in range(lesion["n_calcs"]):
        calc_row = row + rng.normal(0, radius * 1.2)
        calc_col = col + rng.normal(0, radius * 1.2)
        window += 0.5 * np.exp(-((wr - calc_row) ** 2 + (wc - calc_col) ** 2) / (2 * (1.0 * size / 256) ** 2))
    pixels[top:bottom, left:right] = window
    return pixels


def _write_dicom(path: Path, pixels: np.ndarray, *, patient: str, side: str, view: str, monochrome1: bool,
                 bits_stored: int, instance: int, sop_uid: str, study: str, series: str) -> None:
    top = 2**bits_stored - 1
    stored = np.round(np.clip(pixels, 0, 1) * top).astype(np.uint16)
    if monochrome1:
        stored = (top - stored).astype(np.uint16)  # MONOCHROME1: low values are bright
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MAMMO_SOP_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "MG"
    ds.PatientID = patient  # pseudonymous synthetic ID, as TCIA does for CMMD
    ds.PatientName = patient
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = side
    ds.ViewPosition = view
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _VIEW_CODES[view][0], "SCT", _VIEW_CODES[view][1]
    ds.ViewCodeSequence = [code]
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.SeriesDescription = "synthetic mammogram (tlese synth)"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.ImagerPixelSpacing = [0.1 * 2048 / stored.shape[0]] * 2
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------------------------
# Chest X-rays


def _write_chest_xrays(cxr_root: Path, per_class: int, size: int, rng: np.random.Generator) -> Path:
    rows = []
    patient_number = 0
    for label in CXR_CLASSES:
        folder = cxr_root / "images" / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            # Every fifth image is a follow-up of the previous patient, so patient grouping matters.
            if index % 5 != 1:
                patient_number += 1
            stem = f"synth_{label}_{index + 1:04d}"
            pixels = _chest_xray(size, label, rng)
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(folder / f"{stem}.png")
            rows.append({"image_id": stem, "file": f"images/{label}/{stem}.png", "label": label,
                         "patient_id": f"SYN_{patient_number:05d}"})
    labels_path = cxr_root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_path, index=False)
    return labels_path


def _chest_xray(size: int, label: str, rng: np.random.Generator) -> np.ndarray:
    """Float image in [0, 1]: body, two dark lung fields with ribs, heart; class-dependent opacities."""
    r, c = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((r - 0.55) / 0.55) ** 2 + ((c - 0.5) / rng.uniform(0.42, 0.48)) ** 2 < 1
    image = np.where(body, 0.55, 0.05).astype(np.float32)
    lungs = np.zeros_like(image, dtype=bool)
    lung_masks = []
    for centre in (0.3, 0.7):
        top_to_bottom = ((r - rng.uniform(0.45, 0.5)) / rng.uniform(0.27, 0.32)) ** 2
        mask = top_to_bottom + ((c - centre) / rng.uniform(0.13, 0.16)) ** 2 < 1
        lung_masks.append(mask)
        lungs |= mask
    image = np.where(lungs, 0.18, image)
    ribs = 0.06 * (np.sin(2 * math.pi * (r * rng.uniform(9, 12) + 0.15 * np.abs(c - 0.5))) > 0.6)
    image += ribs * lungs
    heart = ((r - 0.6) / 0.16) ** 2 + ((c - rng.uniform(0.52, 0.56)) / 0.13) ** 2 < 1
    image = np.where(heart, image + 0.25, image)

    opacity = np.zeros_like(image)
    if label == "pneumonia":  # one dense, focal consolidation in one lung (occasionally a second one)
        for _ in range(1 + int(rng.random() < 0.2)):
            lung = lung_masks[int(rng.integers(0, 2))]
            rows_, cols_ = np.nonzero(lung)
            pick = rng.integers(0, len(rows_))
            radius = rng.uniform(0.05, 0.11)
            blob = np.exp(-(((r - rows_[pick] / size) ** 2 + (c - cols_[pick] / size) ** 2) / (2 * radius**2)))
            opacity += rng.uniform(0.18, 0.35) * blob
    elif label == "covid":  # bilateral, peripheral, lower-zone ground-glass haze
        for centre in (0.3, 0.7):
            outer = centre + (-0.1 if centre < 0.5 else 0.1)
            for _ in range(int(rng.integers(3, 7))):
                row, col = rng.uniform(0.5, 0.72), outer + rng.normal(0, 0.03)
                radius = rng.uniform(0.04, 0.08)
                opacity += rng.uniform(0.06, 0.14) * np.exp(-(((r - row) ** 2 + (c - col) ** 2) / (2 * radius**2)))
    else:  # no findings; sometimes a faint vessel-like haze so classes overlap
        if rng.random() < 0.3:
            row, col, radius = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.08)
            opacity += rng.uniform(0.04, 0.1) * np.exp(-(((r - row) ** 2 + (c - col) ** 2) / (2 * radius**2)))
    image += opacity * lungs
    texture = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), 1.5 * size / 256)
    image += 0.05 * texture / (texture.std() + 1e-6)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image * rng.uniform(0.85, 1.15), 0, 1)
