"""prepare_table: cache layout, reuse, bad files reported as skips (never a crash), workers, the CLI command."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_breast, write_dicom
from PIL import Image
from pydicom.uid import RLELossless

from tlese.data.cache import PrepareSummary, prepare_table, read_png16
from tlese.data.preprocess import PreprocessParams, prepare_file

PARAMS = PreprocessParams.build(64)


@pytest.fixture
def good_files(tmp_path):
    """Two DICOMs (one RLE) and a 16-bit PNG, with a table row each."""
    src = tmp_path / "src"
    src.mkdir()
    left = write_dicom(src / "l.dcm", synthetic_breast(side="L").astype(np.uint16), laterality="L",
                       view_position="CC")
    right = write_dicom(src / "r.dcm", synthetic_breast(side="R", seed=1).astype(np.uint16), laterality="R",
                        view_position="MLO", transfer_syntax=RLELossless)
    png = src / "p.png"
    Image.fromarray((synthetic_breast(seed=2) * 10).astype(np.uint16)).save(png)
    rows = [("P1", "L", "CC", left), ("P1", "R", "MLO", right), ("P2", "L", "CC", png)]
    return pd.DataFrame([{"patient_id": p, "side": s, "view": v, "path": str(f)} for p, s, v, f in rows])


@pytest.fixture
def bad_files(tmp_path, good_files):
    """A truncated DICOM, a zero-byte file, a text file, a laterality conflict and a missing file."""
    src = tmp_path / "src"
    data = (src / "l.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "empty.dcm").write_bytes(b"")
    (src / "notes.png").write_text("not an image\n")
    write_dicom(src / "conflict.dcm", synthetic_breast(side="R").astype(np.uint16), image_laterality="R")
    rows = [("truncated.dcm", "L"), ("empty.dcm", "L"), ("notes.png", "L"), ("conflict.dcm", "L"),
            ("missing.dcm", "R")]
    return pd.DataFrame([{"patient_id": "P9", "side": s, "view": "CC", "path": str(src / n)} for n, s in rows])


def test_prepare_writes_16_bit_pngs_and_reuses_them(tmp_path, good_files):
    cache = tmp_path / "cache"
    table, summary = prepare_table(good_files, PARAMS, cache, workers=1, progress=False)
    assert (summary.images, summary.prepared, summary.cached, summary.skipped) == (3, 3, 0, [])
    assert list(table["path"]) == list(good_files["path"])
    folder = cache / PARAMS.fingerprint()
    assert (folder / "params.json").is_file()
    manifest = pd.read_csv(folder / "manifest.csv")
    assert sorted(manifest["source"]) == sorted(good_files["path"])
    for row in table.itertuples():
        assert os.path.dirname(row.prepared_path) == str(folder)
        with Image.open(row.prepared_path) as image:
            assert image.mode.startswith("I;16") and image.size == (64, 64)
        expected, _ = prepare_file(row.path, row.side, row.view, PARAMS)  # the worker's own path
        np.testing.assert_allclose(read_png16(row.prepared_path), expected, atol=1.0 / 65535)

    again, second = prepare_table(good_files, PARAMS, cache, workers=1, progress=False)
    assert (second.prepared, second.cached) == (0, 3)
    assert list(again["prepared_path"]) == list(table["prepared_path"])


def test_changed_source_or_params_are_prepared_again(tmp_path, good_files):
    cache = tmp_path / "cache"
    prepare_table(good_files, PARAMS, cache, workers=1, progress=False)
    source = good_files["path"][0]
    stat = os.stat(source)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    _, summary = prepare_table(good_files, PARAMS, cache, workers=1, progress=False)
    assert (summary.prepared, summary.cached) == (1, 2)
    _, other = prepare_table(good_files, PreprocessParams.build(32), cache, workers=1, progress=False)
    assert other.prepared == 3 and other.cache_dir != summary.cache_dir


def test_bad_files_are_reported_not_fatal(tmp_path, good_files, bad_files):
    table = pd.concat([good_files, bad_files], ignore_index=True)
    with pytest.warns(UserWarning, match="skipped 5 of 8"):
        # 5 of 8 skipped is far above the default max_skipped_fraction: accepted here on purpose
        prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False,
                                          max_skipped_fraction=1.0)
    assert len(prepared) == 3 and prepared["prepared_path"].notna().all()
    reasons = dict(summary.skipped)
    assert set(reasons) == set(bad_files["path"])
    by_name = {os.path.basename(path): reason for path, reason in reasons.items()}
    assert "truncated" in by_name["truncated.dcm"] or "cannot decode" in by_name["truncated.dcm"]
    assert by_name["empty.dcm"] == "empty file (0 bytes)"
    assert "not a DICOM" in by_name["notes.png"]
    assert by_name["conflict.dcm"].startswith("laterality conflict: DICOM ImageLaterality says R, dataset says L")
    assert "cannot access" in by_name["missing.dcm"] or "not found" in by_name["missing.dcm"]
    text = str(summary)
    assert "skipped: 5" in text and "conflict.dcm: laterality conflict" in text


def test_workers_in_parallel_processes(tmp_path, good_files, bad_files):
    table = pd.concat([good_files, bad_files], ignore_index=True)
    with pytest.warns(UserWarning):
        prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=2, progress=False,
                                          max_skipped_fraction=1.0)
    assert (summary.prepared, len(summary.skipped)) == (3, 5)
    serial, _ = prepare_table(good_files, PARAMS, tmp_path / "serial", workers=1, progress=False)
    for parallel_path, serial_path in zip(prepared["prepared_path"], serial["prepared_path"]):
        np.testing.assert_array_equal(read_png16(parallel_path), read_png16(serial_path))


def test_facing_mismatch_is_reported(tmp_path):
    path = tmp_path / "mirrored.png"
    Image.fromarray(synthetic_breast(side="L").astype(np.uint16)).save(path)  # faces L, labelled R
    table = pd.DataFrame([{"path": str(path), "side": "R"}])
    _, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False)
    assert summary.facing_mismatch == [str(path)] and "face the other way" in str(summary)


def test_missing_columns_raise(tmp_path):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['side'\]"):
        prepare_table(pd.DataFrame({"path": ["x.png"]}), PARAMS, tmp_path)


def test_prepare_command(tmp_path, good_files, monkeypatch, capsys):
    import tlese.data.datasets as datasets
    from tlese.cli import main

    monkeypatch.setattr(datasets, "get_adapter", lambda name: (lambda root: good_files))
    code = main(["prepare", "--dataset", "fake", "--root", str(tmp_path), "--out", str(tmp_path / "c"),
                 "--size", "48", "--workers", "1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "images: 3  prepared: 3  cached: 0  skipped: 0" in out
    assert (tmp_path / "c" / PreprocessParams.build(48).fingerprint() / "manifest.csv").is_file()


def test_prepare_command_param_overrides_go_through_build(tmp_path, good_files, monkeypatch, capsys):
    import tlese.data.datasets as datasets
    from tlese.cli import main

    monkeypatch.setattr(datasets, "get_adapter", lambda name: (lambda root: good_files))
    command = ["prepare", "--dataset", "fake", "--root", str(tmp_path), "--out", str(tmp_path / "c"), "--size", "48",
               "--workers", "1", "--no-progress"]
    assert main([*command, "--param", "crop=false", "--param", "low_pct=1"]) == 0
    expected = PreprocessParams.build(48, "mammo", {"crop": False, "low_pct": 1.0})
    assert (tmp_path / "c" / expected.fingerprint() / "manifest.csv").is_file()
    assert main([*command, "--param", "colour=true"]) == 2
    assert "unknown preprocessing parameter(s) ['colour']; valid: ['crop', 'orient'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--param", "crop"])  # not KEY=VALUE: argparse's own error


def test_summary_text():
    summary = PrepareSummary(images=2, prepared=1, skipped=[("a.dcm", "empty file (0 bytes)")], seconds=1.25)
    assert str(summary).startswith("images: 2  prepared: 1  cached: 0  skipped: 1  seconds: 1.2")
    assert "skipped a.dcm: empty file (0 bytes)" in str(summary)


def _full_disk_while_compacting(monkeypatch):
    """Make `manifest.compact` meet a full disk half-way through writing (in this process only: the workers that
    write the PNGs are done by then)."""
    import errno

    import tlese.data.cache as cache

    real_fdopen, real_compact = os.fdopen, cache._Manifest.compact

    class HalfWritten:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def compact(self, own):
        with monkeypatch.context() as patch:
            patch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: HalfWritten(real_fdopen(fd, mode, *a, **k)))
            real_compact(self, own)

    monkeypatch.setattr(cache._Manifest, "compact", compact)


def test_a_full_disk_leaves_the_old_manifest_whole_and_loses_nothing(tmp_path, good_files, monkeypatch, capsys):
    import errno

    from tlese.cli import main

    cache_dir = tmp_path / "cache"
    first = good_files.iloc[:2]
    prepare_table(first, PARAMS, cache_dir, workers=1, progress=False)
    folder = cache_dir / PARAMS.fingerprint()
    before = (folder / "manifest.csv").read_bytes()

    with monkeypatch.context() as patch:
        _full_disk_while_compacting(patch)
        with pytest.raises(OSError) as error:
            prepare_table(good_files, PARAMS, cache_dir, workers=1, progress=False)
        assert error.value.errno == errno.ENOSPC
    assert (folder / "manifest.csv").read_bytes() == before  # whole, not truncated
    assert not list(folder.glob(".*.tmp"))  # the half-written temporary is gone
    assert "p.png" in (folder / "manifest.journal").read_text()  # the finished image is kept in the journal

    _, summary = prepare_table(good_files, PARAMS, cache_dir, workers=1, progress=False)
    assert (summary.prepared, summary.cached) == (0, 3)  # nothing was lost: the third image is reused
    assert len(pd.read_csv(folder / "manifest.csv")) == 3 and not (folder / "manifest.journal").exists()

    import tlese.data.datasets as datasets

    monkeypatch.setattr(datasets, "get_adapter", lambda name: (lambda root: good_files))
    _full_disk_while_compacting(monkeypatch)
    out = tmp_path / "other_cache"
    assert main(["prepare", "--dataset", "fake", "--root", str(tmp_path), "--out", str(out), "--size", "48",
                 "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tlese prepare: error: writing under {out}: no space left on the disk (free some space or write "
                   "elsewhere; finished work is kept and the same command resumes)"]


def test_a_full_disk_while_writing_pngs_stops_the_run_instead_of_skipping_images(tmp_path, good_files, monkeypatch,
                                                                                  capsys):
    import errno

    import tlese.data.cache as cache
    import tlese.data.datasets as datasets
    from tlese.cli import main

    real_write, written = cache.write_png16, []

    def write_until_full(image, path):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real_write(image, path)

    monkeypatch.setattr(cache, "write_png16", write_until_full)
    with pytest.raises(OSError) as error:
        prepare_table(good_files, PARAMS, tmp_path / "cache", workers=1, progress=False)
    assert error.value.errno == errno.ENOSPC and error.value.filename.endswith(".png")

    monkeypatch.setattr(cache, "write_png16", real_write)  # space freed: the image written before is reused
    _, summary = prepare_table(good_files, PARAMS, tmp_path / "cache", workers=1, progress=False)
    assert (summary.prepared, summary.cached, summary.skipped) == (2, 1, [])

    written.clear()
    monkeypatch.setattr(cache, "write_png16", write_until_full)
    monkeypatch.setattr(datasets, "get_adapter", lambda name: (lambda root: good_files))
    assert main(["prepare", "--dataset", "fake", "--root", str(tmp_path), "--out", str(tmp_path / "other"),
                 "--size", "48", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tlese prepare: error: {tmp_path / 'other'}")
    assert ".png: no space left on the disk (free some space" in err[0]
