"""File helpers every area shares: content hashes and atomic writes (a kill leaves the old file or the new one)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

# Whether write_bytes_atomic forces its data to the disk (fsync): on, except inside `scratch_writes()`.
_DURABLE: ContextVar[bool] = ContextVar("tlese_durable_writes", default=True)


@contextlib.contextmanager
def scratch_writes() -> Iterator[None]:
    """Within this block (this thread / task only), atomic writes skip the fsync: for outputs that are read back
    and deleted within the same request (a service's per-request folder), where forcing them to the disk buys
    nothing and each fsync waits for the disk's journal (behind the other requests' uploads)."""
    token = _DURABLE.set(False)
    try:
        yield
    finally:
        _DURABLE.reset(token)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk (not inside `scratch_writes()`), then rename
    it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            if _DURABLE.get():
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, value: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, default=str))
