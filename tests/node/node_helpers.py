"""Helpers of the node tests and benchmark (imported as the bare module `node_helpers`): 4-image studies made from
the real CBIS-DDSM files, the node's configuration for a test Orthanc, a node running in a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tlese.node.config import NodeConfig, parse_config


def cbis_case(path: Path) -> tuple[str, str, str]:
    """(CBIS patient, side L/R, view) from the CBIS PatientID (the tests' truth, never used by the node)."""
    parts = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID).split("_")
    return f"P_{parts[2]}", parts[3][0], parts[4]


def make_study(sources: list[Path], folder: Path, **tags) -> list[Path]:
    """Copies of `sources` (the 4 images of one CBIS patient) as ONE new study of a new patient: new Study /
    Series / SOP Instance UIDs, ImageLaterality and ViewPosition set from the CBIS case, then `tags`."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    patient_id = tags.pop("PatientID", f"TEST-{study_uid[-8:]}")
    patient_name = tags.pop("PatientName", patient_id)
    out = []
    for index, source in enumerate(sources):
        _, side, view = cbis_case(source)
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.ImageLaterality, ds.ViewPosition = side, view
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        path = folder / f"{study_uid[-12:]}_{index}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def node_config(work_dir: Path, node_port: int, orthanc, **overrides) -> NodeConfig:
    """The node as the tests run it: SCP on 127.0.0.1:node_port accepting ORTHANC, results back by C-STORE."""
    data = {"ae_title": "TLESE", "host": "127.0.0.1", "port": node_port, "allowed_calling_aets": ["ORTHANC"],
            "work_dir": str(work_dir), "quiet_seconds": 1.0, "retention_minutes": 0,
            "destination": {"dimse": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "retry": {"first_seconds": 0.5, "max_seconds": 2}, "allow_unsigned": True}
    data.update(overrides)
    return parse_config(data, "test node config")


@contextmanager
def running_node(config: NodeConfig, bundle) -> Iterator:
    """A Node started and looping in a thread; stopped (and joined) on exit."""
    from tlese.node.service import Node

    node = Node(config, bundle)
    node.start()
    thread = threading.Thread(target=node.run, kwargs={"idle_seconds": 0.1}, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        node.stop()
        thread.join(120)


def truncate_pixels(path: Path) -> Path:
    """Cut the compressed pixel data of `path` (in place) to a third: the header and the DICOM structure stay valid
    (a PACS stores it), the image cannot be decoded: a truncated acquisition as a reader meets it."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    (frame,) = list(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3 // 2 * 2]])
    ds.save_as(path)
    return path
