"""Decode and preprocess images beside the model: `Preparer` runs `tlese.data.preprocess.prepare_file` (the one file
-> model input path) either in the calling thread or in worker processes.

Why processes: decoding a compressed mammogram (RLE, JPEG 2000, ...) and preparing it is most of an exam's CPU time,
and the decoders hold Python's GIL, so threads of one process take turns on it. Worker processes decode and
prepare in parallel while the calling process runs the model (ONNX Runtime and torch release the GIL): `predict`
submits the next chunk of breasts before it predicts the current one, and `tlese serve` shares one pool among its
requests.

The workers are started with "spawn" (the parent may hold threads: a web server, ONNX Runtime sessions), import
the decoders and torch once, and run one intra-op thread each. An image whose decoding kills its worker (a crafted
file, the memory limit) costs that image only: the pool is started again, the other images in flight are
submitted again, and the image is refused once it has killed a worker `CRASH_RETRIES + 1` times.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from tlese.data.io import ImageReadError
from tlese.data.preprocess import PreprocessParams, prepare_file

CRASH_RETRIES = 1
# Each worker holds about 0.55 GB once started (torch, which the resize uses, pydicom, scipy, imagecodecs): the
# default stops at 4 of them.
MAX_DEFAULT_PROCESSES = 4


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_processes(runtime: str | None = None) -> int:
    """Worker processes by default: one per usable core, at most MAX_DEFAULT_PROCESSES; none for the torch runtime,
    whose model already uses every core (workers beside it were slower: benchmarks/results/batch.md, serve.md)."""
    if runtime == "torch":
        return 0
    return min(usable_cores(), MAX_DEFAULT_PROCESSES)


class PreprocessingFailed(Exception):
    """prepare_file raised something other than ImageReadError in a worker; `kind` is its type name."""

    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(kind)


class Preparer:
    """`submit(path, side, view, params)` -> a Future of `prepare_file`'s (image, info).

    Worker processes are started with "spawn": a script that makes a Preparer with processes needs the usual
    `if __name__ == "__main__":` guard (the `tlese` command has it).

    processes 0: prepared at once in the calling thread (the Future is already done). processes N >= 1: in a pool of
    N worker processes, started on first use. The Future's exception is ImageReadError (the file's problem, as
    prepare_file raises it), `PreprocessingFailed` (another exception in prepare_file, by type name) or ValueError
    (a bad side). Safe to call from several threads at once; `close()` stops the workers.
    """

    def __init__(self, processes: int = 0):
        if isinstance(processes, bool) or int(processes) != processes or processes < 0:
            raise ValueError(f"processes must be an integer >= 0, got {processes!r}")
        self.processes = int(processes)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def parallel(self) -> bool:
        return self.processes > 0

    @property
    def started(self) -> bool:
        """Whether the worker processes are running (started by `start()` or the first submit)."""
        return self._pool is not None

    def __enter__(self) -> Preparer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, wait: bool = True) -> Preparer:
        """Start the worker processes now (they import the decoders and torch), not on the first image; `wait`
        False returns at once (they start while the caller does something else, e.g. loads a bundle)."""
        if self.parallel:
            pool = self._current_pool()
            started = [pool.submit(_warm, index) for index in range(self.processes)]
            if wait:
                for future in started:
                    future.result()
        return self

    def submit(self, path: str | Path, side: Any, view: str | None, params: PreprocessParams) -> Future:
        if not self.parallel:
            future: Future = Future()
            try:
                future.set_result(prepare_file(path, side, view, params))
            except (ImageReadError, ValueError) as error:
                future.set_exception(error)
            except Exception as error:  # noqa: BLE001 - reported by type, as the pool reports it
                future.set_exception(PreprocessingFailed(type(error).__name__))
            return future
        outer: Future = Future()
        self._send(outer, (str(path), None if side is None else str(getattr(side, "value", side)), view, params),
                   crashes=0)
        return outer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # the pool

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("this Preparer is closed")
            if self._pool is None:
                import multiprocessing

                self._pool = ProcessPoolExecutor(max_workers=self.processes,
                                                 mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker)
            return self._pool

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def _send(self, outer: Future, job: tuple, crashes: int) -> None:
        try:
            pool = self._current_pool()
            inner = pool.submit(_prepare, *job)
        except BrokenProcessPool:
            self._restart(pool)
            inner = None
        except RuntimeError as error:  # closed
            outer.set_exception(error)
            return
        if inner is None:
            self._send(outer, job, crashes)
            return

        def done(finished: Future) -> None:
            try:
                kind, value = finished.result()
            except BrokenProcessPool:  # a worker died: maybe this image, maybe another one in flight
                self._restart(pool)
                if crashes >= CRASH_RETRIES:
                    outer.set_exception(PreprocessingFailed("worker process died"))
                else:
                    self._send(outer, job, crashes + 1)
                return
            except BaseException as error:  # noqa: BLE001 - cancelled at shutdown, pickling trouble
                outer.set_exception(PreprocessingFailed(type(error).__name__))
                return
            if kind == "ok":
                outer.set_result(value)
            elif kind == "read":
                outer.set_exception(ImageReadError(*value))
            elif kind == "value":
                outer.set_exception(ValueError(value))
            else:
                outer.set_exception(PreprocessingFailed(value))

        inner.add_done_callback(done)


# ---------------------------------------------------------------------------------------------------------------
# In the worker processes


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import pydicom  # noqa: F401 - imported once, not on the first image
    import scipy.ndimage  # noqa: F401


def _warm(_: int) -> int:
    return os.getpid()


def _prepare(path: str, side: str | None, view: str | None, params: PreprocessParams) -> tuple[str, Any]:
    """prepare_file in a worker; exceptions come back as plain data (ImageReadError does not pickle)."""
    try:
        image, info = prepare_file(path, side, view, params)
        return "ok", (np.ascontiguousarray(image), info)
    except ImageReadError as error:
        return "read", (error.path, error.reason)
    except ValueError as error:
        return "value", str(error)
    except Exception as error:  # noqa: BLE001
        return "failed", type(error).__name__


__all__ = ["CRASH_RETRIES", "MAX_DEFAULT_PROCESSES", "PreprocessingFailed", "Preparer", "default_processes",
           "usable_cores"]
