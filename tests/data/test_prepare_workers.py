"""prepare_table when a worker process really dies: the pool is rebuilt, and the file that killed it is named.

A worker is killed with SIGKILL (as the out-of-memory killer does) by a `sitecustomize` module put on PYTHONPATH
for this test only: every spawned worker imports it at start-up and wraps `tlese.data.io.read_image` so that
reading one chosen file kills its own process. Production code has no hook for this.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_breast
from PIL import Image

from tlese.data.cache import PrepareError, prepare_table, read_png16
from tlese.data.preprocess import PreprocessParams

PARAMS = PreprocessParams(size=48)

SITECUSTOMIZE = '''
import os

_doomed = set(filter(None, os.environ.get("TLESE_TEST_KILL_ON", "").split(os.pathsep)))
if _doomed:
    import signal

    import tlese.data.io as _io

    _read_image = _io.read_image

    def _read_or_die(path, **options):
        if os.path.basename(str(path)) in _doomed:
            os.kill(os.getpid(), signal.SIGKILL)
        return _read_image(path, **options)

    _io.read_image = _read_or_die
'''


@pytest.fixture
def killing_worker(tmp_path, monkeypatch):
    """Make spawned workers die on the file names passed to the returned function."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    def doom(*names: str) -> None:
        monkeypatch.setenv("TLESE_TEST_KILL_ON", os.pathsep.join(names))

    return doom


def _table(folder, n: int) -> pd.DataFrame:
    folder.mkdir()
    rows = []
    for index in range(n):
        path = folder / f"img{index:02d}.png"
        Image.fromarray(synthetic_breast(seed=index).astype(np.uint16)).save(path)
        rows.append({"patient_id": f"P{index}", "side": "L", "view": "CC", "path": str(path)})
    return pd.DataFrame(rows)


def test_a_killed_worker_is_replaced_and_the_file_that_killed_it_is_named(tmp_path, killing_worker):
    table = _table(tmp_path / "src", 12)
    killing_worker("img05.png")
    with pytest.warns(UserWarning, match=r"skipped 1 of 12 images"):
        prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=2, progress=False,
                                          root=tmp_path)
    # only the file that kills its worker is lost, not every job that was pending when the pool broke
    assert summary.skipped == [("src/img05.png", "worker died while preparing this file "
                                                 "(killed by SIGKILL, e.g. by the out-of-memory killer)")]
    assert summary.prepared == 11 and len(prepared) == 11
    assert "img05.png" not in " ".join(prepared["path"])
    for path in prepared["prepared_path"]:
        assert read_png16(path).shape == (48, 48)


def test_too_many_skips_fail_with_the_count_the_reasons_and_the_override(tmp_path):
    table = _table(tmp_path / "src", 8)
    for index in (1, 4):
        (tmp_path / "src" / f"img{index:02d}.png").write_bytes(b"")  # 2 of 8 = 25% > 10%
    with pytest.warns(UserWarning), pytest.raises(PrepareError) as caught:
        prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False)
    message = str(caught.value)
    assert "skipped 2 of 8 images (25%)" in message and "max_skipped_fraction=0.1" in message
    assert "top reasons: empty file (2)" in message and "--max-skipped-fraction" in message
    assert caught.value.summary.prepared == 6  # the good images are prepared and cached all the same
    with pytest.warns(UserWarning, match="skipped 2 of 8"):
        prepared, summary = prepare_table(table, PARAMS, tmp_path / "cache", workers=1, progress=False,
                                          max_skipped_fraction=0.25)
    assert (len(prepared), summary.cached, summary.prepared) == (6, 6, 0)
    with pytest.raises(ValueError, match="max_skipped_fraction must be within"):
        prepare_table(table, PARAMS, tmp_path / "cache", max_skipped_fraction=1.5)
