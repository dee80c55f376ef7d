"""Fixtures of the node tests: a real Orthanc per test (skipped only when /usr/sbin/Orthanc is missing; CI installs
it), the tiny bundle loaded once, and the DICOMweb plugin check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port  # noqa: E402


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must have it: .ci/run installs orthanc and orthanc-dicomweb)")
        pytest.skip(reason)


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path, node_port):
    """A running Orthanc that knows the node as modality `tlese` (AE TLESE at 127.0.0.1:node_port)."""
    _need(ORTHANC.is_file(), f"Orthanc is not installed at {ORTHANC} (apt-get install orthanc orthanc-dicomweb)")
    _need(DICOMWEB_PLUGIN.is_file(), f"the Orthanc DICOMweb plugin is missing at {DICOMWEB_PLUGIN}")
    server = Orthanc(tmp_path / "orthanc", {"tlese": ("TLESE", node_port)})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def node_bundle_path(request) -> Path:
    """The tiny run's bundle folder (or TLESE_NODE_BUNDLE=PATH, e.g. the demo's for the docs' screenshot)."""
    return Path(os.environ.get("TLESE_NODE_BUNDLE") or request.getfixturevalue("tiny_bundle"))


@pytest.fixture(scope="session")
def node_bundle(node_bundle_path):
    """The bundle, loaded as the node loads it (unsigned accepted: tests use their own bundles)."""
    from tlese.node.commands import load_node_bundle

    return load_node_bundle(node_bundle_path, None, allow_unsigned=True)
