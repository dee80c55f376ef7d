"""A real one-node SLURM for the cluster tests (started once, stopped at the end), and the tiny grid they submit.

The cluster skips with a reason where it cannot start (not root, SLURM or munge not installed); CI installs
Debian's slurm-wlm and munge and runs as root.
"""

from __future__ import annotations

import os
import shutil

import pytest
from minicluster import MiniSlurm, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster():
    """munged + slurmctld + slurmd in a temporary folder; SLURM_CONF points the clients (and the jobs) at it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = MiniSlurm().start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def grid_data(tmp_path_factory) -> dict:
    """Synthetic CMMD-like mammograms and chest X-rays, as small as a 2-fold CV with a stage 1 allows."""
    from tlese.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("grid_data"), n_patients=12, image_size=64, cxr_per_class=4, seed=3)
