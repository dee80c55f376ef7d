"""Decoding and preprocessing in worker processes (`tlese.predict.prepare.Preparer`): the same outputs as in the
calling thread, errors named as there, a killed worker costs nothing, and `predict` overlaps chunks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from exam_helpers import dicom_copy
from exam_helpers import random_bundle as make_bundle

from tlese.data.io import ImageReadError
from tlese.data.preprocess import PreprocessParams, prepare_file
from tlese.predict import pipeline
from tlese.predict.pipeline import predict
from tlese.predict.prepare import CRASH_RETRIES, Preparer, PreprocessingFailed

PARAMS = PreprocessParams.build(64)


@pytest.fixture(scope="module")
def workers():
    with Preparer(2) as preparer:
        yield preparer.start()


@pytest.fixture(scope="module")
def bundle():
    return make_bundle()


def breasts_of(out) -> dict:
    document = json.loads((out / "predictions.json").read_text())
    return {key: {name: value for name, value in breast.items() if name != "integrity"}
            for key, breast in document["breasts"].items()}


def test_a_worker_prepares_exactly_what_the_thread_prepares(workers, cbis_dicoms):
    futures = [workers.submit(path, None, None, PARAMS) for path in cbis_dicoms[:4]]
    for path, future in zip(cbis_dicoms[:4], futures):
        image, info = future.result(timeout=300)
        expected, expected_info = prepare_file(path, None, None, PARAMS)
        assert np.array_equal(image, expected) and image.dtype == np.float32
        assert info["header"] == expected_info["header"]
        assert info["crop_box"] == expected_info["crop_box"] and info["flipped"] == expected_info["flipped"]


def test_errors_come_back_as_the_thread_raises_them(workers, cbis_dicoms, tmp_path):
    truncated = tmp_path / "cut.dcm"
    data = cbis_dicoms[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.dcm"
    text.write_text("not an image\n")
    for path in (truncated, text):
        with pytest.raises(ImageReadError) as inline:
            prepare_file(path, None, None, PARAMS)
        with pytest.raises(ImageReadError) as pooled:
            workers.submit(path, None, None, PARAMS).result(timeout=300)
        assert str(pooled.value) == str(inline.value) and str(path) in str(pooled.value)
    with pytest.raises(ValueError, match="side"):
        workers.submit(cbis_dicoms[0], "upper", None, PARAMS).result(timeout=300)
    with pytest.raises(ValueError, match="side"):
        Preparer(0).submit(cbis_dicoms[0], "upper", None, PARAMS).result()


def test_a_killed_worker_costs_no_image(cbis_dicoms):
    """SIGKILL of the only worker while it works: the pool is started again and every image still comes back right."""
    with Preparer(1) as preparer:
        preparer.start()
        (pid,) = list(preparer._pool._processes)
        futures = [preparer.submit(path, None, None, PARAMS) for path in cbis_dicoms[:3]]
        os.kill(pid, signal.SIGKILL)
        for path, future in zip(cbis_dicoms[:3], futures):
            image, _ = future.result(timeout=300)
            assert np.array_equal(image, prepare_file(path, None, None, PARAMS)[0])
        assert pid not in preparer._pool._processes  # a new worker did the work


def test_an_image_that_keeps_killing_its_worker_is_refused_alone(cbis_dicoms):
    """Every worker that takes the image up dies (here: killed at once, twice): after CRASH_RETRIES restarts its
    Future says so, as PreprocessingFailed, and the Preparer goes on working."""
    with Preparer(1) as preparer:
        preparer.start()
        future = preparer.submit(cbis_dicoms[0], None, None, PARAMS)
        for _ in range(CRASH_RETRIES + 1):
            pool = preparer._pool
            for pid in list(pool._processes):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 60
            while (preparer._pool in (pool, None) or not preparer._pool._processes) and not future.done() \
                    and time.monotonic() < end:
                time.sleep(0.01)  # the pool is started again (and the image sent again) from a callback
        error = future.exception(timeout=120)
        if error is None:
            pytest.skip("a worker finished the image before it could be killed")
        assert isinstance(error, PreprocessingFailed) and "worker process died" in str(error)
        image, _ = preparer.submit(cbis_dicoms[1], None, None, PARAMS).result(timeout=300)
        assert image.shape == (64, 64)


def test_predict_with_workers_and_small_chunks_gives_the_same_outputs(bundle, flat, cbis_dicoms, workers, tmp_path,
                                                                      monkeypatch):
    """Chunks of one breast, so the next breast is always prepared while one is predicted; the 8 CBIS files, a
    truncated copy and a breast with a contradicted side: outputs equal to the one-thread run, progress reported."""
    inputs = tmp_path / "inputs"
    shutil.copytree(flat, inputs)
    first = sorted(inputs.iterdir())[0]
    data = dicom_copy(first, tmp_path / "copy.dcm", PatientID="ANON-9", PatientName="ANON-9").read_bytes()
    (inputs / "cut.dcm").write_bytes(data[: len(data) // 2])
    dicom_copy(first, inputs / "wrong.dcm", Laterality="R" if "L" in str(first) else "L", PatientID="ANON-8",
               PatientName="ANON-8")
    monkeypatch.setattr(pipeline, "CHUNK", 1)
    inline = predict(bundle, [inputs], tmp_path / "inline", salt="s")
    seen = []
    pooled = predict(bundle, [inputs], tmp_path / "pooled", salt="s", preparer=workers,
                     progress=lambda done, total: seen.append((done, total)))
    assert breasts_of(tmp_path / "pooled") == breasts_of(tmp_path / "inline")
    assert pooled.to_dict()["reasons"] == inline.to_dict()["reasons"] and pooled.breasts == inline.breasts >= 4
    assert seen[0] == (0, pooled.breasts) and seen[-1] == (pooled.breasts, pooled.breasts)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_predict_processes_argument(bundle, flat, tmp_path, monkeypatch):
    """processes=N makes (and closes) its own workers; with one chunk to do it prepares in this process."""
    made = []
    original = Preparer.__init__

    def recording(self, processes=0):
        original(self, processes)
        made.append(self)

    monkeypatch.setattr(Preparer, "__init__", recording)
    monkeypatch.setattr(pipeline, "CHUNK", 2)
    predict(bundle, [flat], tmp_path / "out", salt="s", processes=2)
    own = made[0]
    assert own.processes == 2 and own._closed and own._pool is None
    assert breasts_of(tmp_path / "out")
    made.clear()
    monkeypatch.setattr(pipeline, "CHUNK", 8)
    predict(bundle, [flat], tmp_path / "one_chunk", salt="s", processes=2)
    assert not made[0].started  # 4 breasts: one chunk, no workers started
    with pytest.raises(ValueError, match="processes"):
        Preparer(-1)


def test_predict_command_shows_progress_on_request_and_checks_processes(tiny_bundle, flat, tmp_path, capsys):
    from tlese.cli import main

    assert main(["predict", str(tiny_bundle), str(flat), "--out", str(tmp_path / "a"), "--progress", "on",
                 "--processes", "0"]) == 0
    said = capsys.readouterr()
    assert "4/4" in said.err and "breast" in said.err and "4 breasts" in said.out
    assert main(["predict", str(tiny_bundle), str(flat), "--out", str(tmp_path / "b"), "--progress", "off"]) == 0
    said = capsys.readouterr()
    assert "4/4" not in said.err and "4 breasts" in said.out  # auto / off: no bar when not asked or not a terminal
    assert main(["predict", str(tiny_bundle), str(flat), "--out", str(tmp_path / "c"), "--processes", "-1"]) == 2
    said = capsys.readouterr()
    assert "--processes -1" in said.out + said.err and "Traceback" not in said.out + said.err
