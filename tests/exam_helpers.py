"""Helpers shared by the serving tests (imported as the bare module `exam_helpers`)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

CLASSES = ["Luminal A", "Luminal B", "HER2-enriched", "triple negative"]
SECRETS = {"PatientName": "Zyxwv^Secretname", "PatientID": "SECRET-ID-4711", "PatientBirthDate": "19010203",
           "AccessionNumber": "ACC998877"}


def random_bundle(views: str = "dual", n_models: int = 2, size: int = 64, seed: int = 0):
    """A real Bundle of random-weight lite0_plain models (BatchNorm statistics taken on random inputs)."""
    import torch

    from tlese.bundle.format import Bundle
    from tlese.data.preprocess import PreprocessParams
    from tlese.models import create_model

    torch.manual_seed(seed)
    models = []
    for _ in range(n_models):
        model = create_model("lite0_plain", num_classes=len(CLASSES), in_chans=1, views=views)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        shape = (8, 2, 1, size, size) if views == "dual" else (8, 1, size, size)
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(shape))
        models.append(model.eval())
    return Bundle(path=Path("fake-bundle"), sha256="ab" * 32, meta={"model": {"registry_name": "lite0_plain"}},
                  card={"intended_use": "test only"}, models=models, folds=list(range(n_models)), temperature=1.5,
                  preprocess=PreprocessParams.build(size, "mammo"), class_names=list(CLASSES), views=views,
                  image_size=size, in_chans=1)


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


def load_unsigned(path, **options):
    """Load a bundle a test made or edited, its signature not being what the test is about (test_signing.py's is)."""
    from tlese.bundle.format import load_bundle

    return load_bundle(path, allow_unsigned=True, **options)


def edit_json(path: Path, edit) -> None:
    """Apply `edit` (a function changing the parsed value in place) to a JSON file."""
    import json

    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


def keep_page_local(page) -> list[str]:
    """Route a Playwright page so it loads only from 127.0.0.1 (and data: URIs); returns the list that collects every
    other address it tried (a test asserts it stays empty: the pages must work offline)."""
    from urllib.parse import urlparse

    elsewhere: list[str] = []

    def local_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    return elsewhere

