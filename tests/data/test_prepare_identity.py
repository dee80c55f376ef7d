"""prepare_table: one image under two patients is refused, a repeat for one patient is kept once, damaged cached
PNGs are rebuilt, and summaries show paths relative to the dataset root."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import synthetic_breast, write_dicom
from PIL import Image

import tlese.data.cache as cache
from tlese.data.cache import DataIntegrityError, prepare_table, read_png16
from tlese.data.datasets import finish_table, load_dataset
from tlese.data.io import ImageReadError

PARAMS = cache.PreprocessParams(size=48)


def _png(path, side="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_breast(side=side, seed=seed).astype(np.uint16)).save(path)
    return path


def _rows(*entries) -> pd.DataFrame:
    return pd.DataFrame([{"patient_id": patient, "side": side, "view": "CC", "path": str(path)}
                         for patient, side, path in entries])


# ---------------------------------------------------------------------------------------------------------------
# One image, two patients


def test_the_same_file_under_two_patients_is_refused_naming_both(tmp_path):
    image = _png(tmp_path / "data" / "a.png")
    table = _rows(("P1", "L", image), ("P2", "L", image), ("P2", "R", _png(tmp_path / "data" / "b.png", "R", 1)))
    with pytest.raises(DataIntegrityError, match=r"one image \(same file and same file content \(sha256\)\) under 2 "
                                                 r"patients: patient P1 \(data/a\.png\), patient P2 \(data/a\.png\)"):
        prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False, root=tmp_path)


def test_a_copy_of_an_image_under_another_patient_is_refused(tmp_path):
    original = _png(tmp_path / "P1" / "a.png")
    copy = tmp_path / "P2" / "copy.png"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    table = _rows(("P1", "L", original), ("P2", "L", copy))
    with pytest.raises(DataIntegrityError) as caught:
        prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False, root=tmp_path)
    assert caught.value.conflicts == ["one image (same file content (sha256)) under 2 patients: "
                                      "patient P1 (P1/a.png), patient P2 (P2/copy.png)"]
    # the work is not lost: once the table is fixed, both images come from the cache
    _, summary = prepare_table(table.iloc[:1], PARAMS, tmp_path / "cache", workers=1, progress=False)
    assert summary.cached == 1


def test_one_sop_instance_uid_under_two_patients_is_refused_and_the_uid_is_never_stored(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    paths = []
    for patient, seed in (("P1", 0), ("P2", 1)):  # different pixels, so different bytes: only the UID is shared
        path = write_dicom(tmp_path / f"{patient}.dcm", synthetic_breast(seed=seed).astype(np.uint16),
                           image_laterality="L", view_position="CC")
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(path)
        paths.append(path)
    table = _rows(("P1", "L", paths[0]), ("P2", "L", paths[1]))
    with pytest.raises(DataIntegrityError, match=r"same SOPInstanceUID\) under 2 patients: patient P1 \(P1\.dcm\), "
                                                 r"patient P2 \(P2\.dcm\)"):
        prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False, root=tmp_path)
    manifest_text = (tmp_path / "cache" / PARAMS.fingerprint() / "manifest.csv").read_text()
    manifest = pd.read_csv(tmp_path / "cache" / PARAMS.fingerprint() / "manifest.csv", dtype=str)
    assert uid not in manifest_text
    assert set(manifest["instance_hash"]) == {hashlib.sha256(uid.encode()).hexdigest()[:32]}


def test_one_image_with_two_labels_for_one_patient_is_refused(tmp_path):
    image = _png(tmp_path / "a.png")
    with pytest.raises(DataIntegrityError, match=r"of patient P1 listed with different side/view: L/CC \(a\.png\), "
                                                 r"R/CC \(a\.png\)"):
        prepare_table(_rows(("P1", "L", image), ("P1", "R", image)), PARAMS, tmp_path / "cache", workers=1,
                      progress=False, root=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# One image listed twice for one patient


def test_an_image_listed_twice_for_one_patient_is_kept_once_and_noted(tmp_path):
    image = _png(tmp_path / "a.png")
    twin = tmp_path / "twin.png"
    shutil.copy(image, twin)
    other = _png(tmp_path / "b.png", "R", 1)
    table = _rows(("P1", "L", image), ("P1", "L", image), ("P1", "L", twin), ("P1", "R", other))
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\) listing an image again for the same patient"):
        prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False,
                                          root=tmp_path)
    assert prepared["path"].tolist() == [str(image), str(other)]
    assert summary.duplicates == [("a.png", "listed again for patient P1; kept once"),
                                  ("twin.png", "same file content (sha256) as a.png for patient P1; kept once")]
    assert "2 row(s) dropped: the same image listed again for the same patient" in str(summary)
    assert prepared["source_sha256"].tolist() == [hashlib.sha256(path.read_bytes()).hexdigest()
                                                  for path in (image, other)]


def test_a_cached_run_does_not_hash_the_sources_again(tmp_path, monkeypatch):
    sources = [_png(tmp_path / "src" / f"{index}.png", seed=index) for index in range(3)]
    table = _rows(*[(f"P{index}", "L", path) for index, path in enumerate(sources)])
    prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False)
    hashed = []
    original = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: hashed.append(str(path)) or original(path))
    prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False)
    assert summary.cached == 3
    assert sorted(hashed) == sorted(prepared["prepared_path"])  # only the cached PNGs are checked


# ---------------------------------------------------------------------------------------------------------------
# Damaged cache


def test_a_truncated_or_altered_cached_png_is_prepared_again_and_noted(tmp_path):
    sources = [_png(tmp_path / f"{index}.png", seed=index) for index in range(3)]
    table = _rows(*[(f"P{index}", "L", path) for index, path in enumerate(sources)])
    first, _ = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False, root=tmp_path)
    expected = [read_png16(path) for path in first["prepared_path"]]
    truncated, altered = first["prepared_path"][0], first["prepared_path"][1]
    data = Path(truncated).read_bytes()
    size = len(data)
    Path(truncated).write_bytes(data[: size // 2])
    data = bytearray(open(altered, "rb").read())
    data[-20] ^= 0xFF  # same size, different bytes
    open(altered, "wb").write(bytes(data))

    with pytest.raises(ImageReadError, match=rf"{truncated}: damaged prepared PNG"):
        read_png16(truncated)
    second_table, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False,
                                          root=tmp_path)
    assert (summary.prepared, summary.cached) == (2, 1)
    assert summary.repaired == [
        ("0.png", f"cached PNG damaged ({size // 2} bytes, the manifest says {size}); prepared again"),
        ("1.png", "cached PNG damaged (its sha256 differs from the manifest's); prepared again")]
    assert "2 damaged cached image(s) prepared again" in str(summary)
    for path, image in zip(second_table["prepared_path"], expected):
        np.testing.assert_array_equal(read_png16(path), image)
    manifest = pd.read_csv(tmp_path / "cache" / PARAMS.fingerprint() / "manifest.csv")
    assert {"png_size", "png_sha256", "sha256"} <= set(manifest.columns)


# ---------------------------------------------------------------------------------------------------------------
# Paths in outputs


def test_root_makes_every_summary_path_relative(tmp_path):
    root = tmp_path / "dataset"
    mirrored = _png(root / "img" / "mirrored.png", "L")  # faces L, labelled R
    image = _png(root / "img" / "a.png", seed=1)
    table = _rows(("P1", "R", mirrored), ("P2", "L", image), ("P2", "L", image), ("P3", "L", root / "img" / "gone.png"))
    with pytest.warns(UserWarning):
        _, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False, root=root,
                                   max_skipped_fraction=1.0)
    assert summary.skipped == [("img/gone.png", "cannot access file (No such file or directory)")]
    assert summary.facing_mismatch == ["img/mirrored.png"]
    assert summary.duplicates == [("img/a.png", "listed again for patient P2; kept once")]
    listed = [line for line in str(summary).splitlines() if not line.startswith("cache:")]
    assert not any(str(root) in line for line in listed)


def test_every_adapter_table_gets_an_image_id_relative_to_its_root(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "sub" / "b.png")
    (tmp_path / "manifest.csv").write_text("patient_id,side,view,path\nH1,L,CC,img/a.png\nH1,L,MLO,img/sub/b.png\n")
    table = load_dataset("manifest", tmp_path)
    assert table["image_id"].tolist() == ["img/a.png", "img/sub/b.png"]
    assert table.attrs["skipped"] == []
    # an adapter's own image_id is kept when it names each image once, replaced when it names several
    rows = [{"patient_id": "P", "side": "L", "view": "CC", "path": str(tmp_path / "img" / name), "image_id": "1-1"}
            for name in ("a.png", "sub/b.png")]
    shared = finish_table(rows, dataset="x", modality="mammo", label_column=None, source=tmp_path)
    assert shared["image_id"].tolist() == ["img/a.png", "img/sub/b.png"]
    rows[1]["image_id"] = "1-2"
    own = finish_table(rows, dataset="x", modality="mammo", label_column=None, source=tmp_path)
    assert own["image_id"].tolist() == ["1-1", "1-2"]
