"""Dataset adapters: each turns one on-disk layout into the common table.

A table has one row per image with at least `patient_id, side, view, path, label, dataset, modality`
(see `TABLE_COLUMNS`) plus the dataset's own label columns. `side` is "L"/"R" and `view` "CC"/"MLO"
for mammograms; chest X-rays have `side == view == ""`. `path` is an absolute path string; `image_id` names the
image without it (the adapter's own ID, or the path relative to the dataset root). `table.attrs["skipped"]` lists
the (path relative to the root, reason) of every file or label row an adapter left out (`format_skipped`
words it for a report).

    table = get_adapter("cmmd")(root)            # or load_dataset("cmmd", root)

An adapter module (and any other area) uses the public helpers exported here: `finish_table` (the contract),
`walk_files`, `find_images`, `read_label_file`, `relative_id`, `format_skipped`; CBIS-DDSM names are parsed by
`tlese.data.datasets.cbis_ddsm.cbis_case`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tlese.data.datasets._common import (
    IMAGE_SUFFIXES,
    TABLE_COLUMNS,
    find_images,
    finish_table,
    format_skipped,
    read_label_file,
    relative_id,
    walk_files,
)

Adapter = Callable[..., pd.DataFrame]

_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    """Decorator adding `load_<name>(root, **options) -> DataFrame` to the registry under `name`."""

    def decorate(function: Adapter) -> Adapter:
        if name in _ADAPTERS and _ADAPTERS[name] is not function:
            raise ValueError(f"dataset adapter {name!r} is already registered ({_ADAPTERS[name].__module__})")
        _ADAPTERS[name] = function
        return function

    return decorate


def get_adapter(name: str) -> Adapter:
    """The adapter registered as `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(list_adapters())}") from None


def list_adapters() -> list[str]:
    """Registered adapter names, sorted."""
    return sorted(_ADAPTERS)


def load_dataset(name: str, root: str | Path, **options) -> pd.DataFrame:
    """Shortcut for `get_adapter(name)(root, **options)`."""
    return get_adapter(name)(root, **options)


def _register_all() -> None:
    """Import every adapter module of this package (which registers it): a new dataset is one new file here."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()

__all__ = [
    "IMAGE_SUFFIXES", "TABLE_COLUMNS", "find_images", "finish_table", "format_skipped", "get_adapter", "list_adapters",
    "load_dataset", "read_label_file", "register_adapter", "relative_id", "walk_files",
]  # fmt: skip
