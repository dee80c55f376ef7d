"""Helpers shared by the serving tests (imported as the bare module `serve_helpers`)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def dicom_copy(source: Path, target: Path, new_study: bool = True, **tags) -> Path:
    """A copy of `source` with new UIDs (a new exam unless `new_study` is False) and `tags` set."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if new_study:
        ds.StudyInstanceUID = generate_uid()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def cbis_truth(path: Path) -> tuple[str, str, str]:
    """(CBIS patient, side, view) as the tests know them from the CBIS PatientID (never used by the code)."""
    parts = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID).split("_")
    return f"P_{parts[2]}", parts[3][0], parts[4]
