"""The request limits of `tlese serve`: plain data with no heavy import, so that the command line can show their
defaults without loading the web stack."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may hold and take; the defaults fit one mammography exam with room to spare.

    max_upload_bytes: the request body (413); max_files: images per request, zip members included (413);
    max_pixels: Rows x Columns x frames of one image, read from its header before decoding (413);
    max_unzipped_bytes: all members of the request's zips together (413); request_timeout_s: the whole request from
    its first byte, upload plus prediction (408 while uploading: a stalled body is closed; 504 after); workers:
    requests predicted at once (threads, one model in memory); max_queue: received requests waiting for a worker
    beyond those (503 when full); max_per_client: requests of one client address at once, uploads included (429
    above); max_uploads: requests being received at once, all clients together (503 above); processes: worker
    processes that decode and prepare the images of all requests (`tlese.predict.prepare.Preparer`; 0: in the
    request threads, where the decoders take turns on Python's GIL).
    """

    max_upload_bytes: int = 512 * 2**20
    max_files: int = 32
    max_pixels: int = 60_000_000
    max_unzipped_bytes: int = 2**30
    request_timeout_s: float = 120.0
    workers: int = 2
    max_queue: int = 16
    max_per_client: int = 4
    max_uploads: int = 64
    processes: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0 and not (name in ("max_queue", "processes") and value == 0):
                raise ValueError(f"limit {name} must be positive, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["Limits"]
