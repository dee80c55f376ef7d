"""`tlese serve`: one bundle behind a local web page for clinicians and a JSON API for PACS integrators.

FastAPI + uvicorn; the page is server-rendered (Jinja2) with a little JavaScript and only local assets (the API
docs at /docs too: Swagger UI from `fastapi-offline`), so it works without any internet.

    GET  /                   the upload page (with the model card, always visible)
    POST /predict            the page's form -> the result page (or the page with the error)
    POST /api/v1/predict     multipart `files` (+ `side` / `view` per file for PNG / JPEG) -> predict's JSON
    GET  /api/v1/model       the model card
    GET  /api/v1/sr/{token}  a DICOM SR made by a request with sr=true (random token, kept in memory for 15 min)
    GET  /healthz            liveness
    GET  /docs, /openapi.json

Each request is predicted by `tlese.predict.pipeline.predict` (the path `tlese predict` takes: no second copy of
pairing or preprocessing) into a per-request temporary folder, which holds the uploads too and is removed before the
response goes out (on error and timeout too; a prediction that timed out removes it when it ends). The request
folders live in the service's own area (`<state dir>/requests`, owner-only), which is emptied at start-up and on
exit: the uploads of a service killed mid-request do not survive its restart.

Every request has one deadline from its first byte (`Limits.request_timeout_s`, `DeadlineMiddleware`): a body that
stops arriving is answered 408 and its connection closed. One client address holds at most
`Limits.max_per_client` requests at once (429 beyond), all clients together `Limits.max_uploads` uploads (503);
a request enters the prediction queue only once its body is in. A full disk is the server's fault: 507, never a 4xx.
One log line per request (logger `tlese.serve`): its id, route, status, verdict counts and seconds. Nothing outlives
a request but one line of the append-only audit log (JSON: time, request id, bundle hash, exam keys, verdicts,
outputs; no identifier, no file name) and, when asked for, the SR in memory. Heatmaps and the CSV / JSON downloads
are carried in the response itself (data: URIs).

The model is loaded once. Requests are predicted in a bounded thread pool (`Limits.workers`, a queue of
`Limits.max_queue` beyond which 503); their images are decoded and prepared in `Limits.processes` worker processes
shared by all requests (`tlese.predict.prepare.Preparer`: the decoders hold the GIL, so threads alone would take
turns), while the model runs in the request threads (ONNX Runtime and torch release the GIL). Grad-CAM (heatmaps)
hooks the shared fold models and the SR writer swaps process-wide warning filters, so requests asking for either
run alone (an exclusive lock), the others side by side.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from tlese.files import scratch_writes
from tlese.predict.pipeline import OVERLAY_SENTENCE, SYNTHETIC_WARNING, bundle_provenance, bundle_views, predict
from tlese.serve.limits import Limits
from tlese.serve.uploads import (
    Form,
    Prepared,
    RequestDeadline,
    ServiceError,
    prepare_inputs,
    receive_form,
    storage_error,
)

log = logging.getLogger("tlese.serve")

DISPLAY_LONGEST = 512  # px of the longest side of a view shown on the page
SR_TTL_S = 15 * 60
SR_MAX = 64
AUDIT_FILE = "audit.jsonl"
SALT_SUFFIX = ".salt"
REQUESTS_DIR = "requests"  # the service's temporary area, under its state folder
REQUEST_PREFIX = "tlese-serve-"  # every request folder (and ONNX work folder) in that area: what a clean-up removes
VERDICT_WORDS = {
    "ok": "Every view the model reads was usable.",
    "degraded": "Less reliable: a view the model reads was missing, or the image is unlike the training images.",
    "refused": "No prediction for this breast (see the reasons).",
}
SIDE_WORDS = {"L": "Left breast", "R": "Right breast"}


# ---------------------------------------------------------------------------------------------------------------
# State beside the requests: the salt, the audit log, SRs waiting for download, the shared/exclusive lock


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/tlese/serve (default ~/.local/state/tlese/serve): the audit log and the exam-key salt."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tlese" / "serve"


def clean_request_area(folder: Path) -> int:
    """Remove every request folder (REQUEST_PREFIX*) left in `folder` (by a service killed mid-request, or at exit);
    nothing else there is touched. Returns how many were removed."""
    removed = 0
    for path in Path(folder).glob(f"{REQUEST_PREFIX}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def load_salt(path: Path) -> str:
    """The service's exam-key secret, made once (owner-readable only) so that keys stay stable across requests and
    restarts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    value = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return value


class AuditLog:
    """Append-only JSON lines, one per request, written whole under a lock (owner-readable only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode()
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)


class SrStore:
    """SR files of recent requests, in memory, by random token: at most SR_MAX, each for SR_TTL_S seconds."""

    def __init__(self, ttl_s: float = SR_TTL_S, max_items: int = SR_MAX):
        self.ttl_s, self.max_items = ttl_s, max_items
        self._items: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, filename: str, data: bytes) -> str:
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._purge()
            self._items[token] = (time.monotonic() + self.ttl_s, filename, data)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> tuple[str, bytes] | None:
        with self._lock:
            self._purge()
            item = self._items.get(token)
        return None if item is None else (item[1], item[2])

    def _purge(self) -> None:
        now = time.monotonic()
        for token in [t for t, (expires, _, _) in self._items.items() if expires < now]:
            del self._items[token]


class SharedExclusive:
    """Many shared holders or one exclusive holder; a waiting exclusive request holds back new shared ones."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._condition:
            while self._exclusive or self._waiting:
                self._condition.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self):
        with self._condition:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._condition.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


# ---------------------------------------------------------------------------------------------------------------
# The service: one bundle, its limits, the pool


@dataclass
class Outcome:
    """One answered request: predict's document (server paths replaced by upload names), the CSV, the images to
    show per exam key and view, the SR downloads."""

    request_id: str
    document: dict
    csv: bytes
    images: dict = field(default_factory=dict)
    sr: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    options: dict = field(default_factory=dict)  # what was asked for: heatmaps, sr


class Service:
    """What the routes share: the loaded bundle, limits, salt, audit log, SR store, inference pool and lock."""

    def __init__(self, bundle: Any, limits: Limits, *, audit_log: Path, salt: str, tmp_dir: Path | None = None,
                 runtime: str = "torch", onnx_threads: int | None = None):
        from tlese.predict.pipeline import make_predictor

        self.bundle, self.limits, self.salt = bundle, limits, salt
        self.audit = AuditLog(audit_log)
        self.srs = SrStore()
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(audit_log).parent / REQUESTS_DIR
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stale = clean_request_area(self.tmp_dir)
        if stale:
            log.warning("removed %d request folder(s) left by an earlier service (killed mid-request?)", stale)
        self.runtime = runtime
        if runtime == "torch":
            self.predictor = make_predictor(bundle, "torch")
        else:  # export once; the sessions hold the models, the files go at once
            with tempfile.TemporaryDirectory(prefix=f"{REQUEST_PREFIX}onnx-", dir=self.tmp_dir) as work:
                self.predictor = make_predictor(bundle, runtime, Path(work), threads=onnx_threads, spinning=False)
        from tlese.predict.prepare import Preparer

        self.preparer = Preparer(limits.processes)
        self.lock = SharedExclusive()
        self.executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="tlese-predict")
        self._admitted = 0
        self._open = 0
        self._clients: Counter[str] = Counter()
        self._admission = threading.Condition()
        self.card = card_view(bundle)

    # entry: at most max_per_client requests of one address and max_uploads in all between first byte and answer

    def enter(self, client: str) -> None:
        with self._admission:
            if self._clients[client] >= self.limits.max_per_client:
                raise ServiceError(429, "too_many_requests", f"this address already has {self._clients[client]} "
                                   "requests in progress (the limit per client); wait for their answers")
            if self._open >= self.limits.max_uploads:
                raise ServiceError(503, "busy", "the service is busy (too many uploads at once); try again in a "
                                   "moment")
            self._clients[client] += 1
            self._open += 1

    def leave(self, client: str) -> None:
        with self._admission:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]
            self._open -= 1
            self._admission.notify_all()

    # admission: at most workers + max_queue received requests between their body's end and their answer

    def admit(self) -> None:
        with self._admission:
            if self._admitted >= self.limits.workers + self.limits.max_queue:
                raise ServiceError(503, "busy", "the service is busy (all workers and the queue are taken); try "
                                   "again in a moment")
            self._admitted += 1

    def release(self) -> None:
        with self._admission:
            self._admitted -= 1
            self._admission.notify_all()

    @property
    def in_flight(self) -> int:
        return self._admitted

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no request is admitted (also those abandoned after a timeout); True when idle."""
        end = time.monotonic() + timeout
        with self._admission:
            while self._admitted or self._open:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._admission.wait(left)
        return True

    def close(self) -> None:
        """Stop the pool (running predictions end first) and empty the request area."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.preparer.close()
        clean_request_area(self.tmp_dir)

    # one request

    async def handle(self, request, *, heatmaps: bool, sr: bool) -> Outcome:
        """Receive, check, predict; ServiceError for every answer but a result."""
        client = request.client.host if request.client else "unknown"
        self.enter(client)
        try:
            return await self._handle(request, heatmaps=heatmaps, sr=sr)
        finally:
            self.leave(client)

    async def _handle(self, request, *, heatmaps: bool, sr: bool) -> Outcome:
        started = time.monotonic()
        deadline = getattr(request.state, "deadline", None) or started + self.limits.request_timeout_s
        request_id = request.state.request_id
        handed_over = admitted = False
        folder = None
        try:
            try:
                folder = tempfile.TemporaryDirectory(prefix=REQUEST_PREFIX, dir=self.tmp_dir)
            except OSError as error:
                raise storage_error(error) from None
            form = await receive_form(request, Path(folder.name), self.limits, deadline)
            heatmaps = _or(form.flag("heatmaps"), heatmaps)
            sr = _or(form.flag("sr"), sr)
            self.admit()
            admitted = True
            cancelled = threading.Event()
            future = self.executor.submit(self._job, request_id, form, folder, heatmaps, sr, cancelled)
            handed_over = True

            def abandoned(done) -> None:  # cancelled before it ran (shutdown): its cleanup never ran either
                if done.cancelled():
                    folder.cleanup()
                    self.release()

            future.add_done_callback(abandoned)
            try:
                outcome = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                                 timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                cancelled.set()
                raise ServiceError(504, "timeout", f"no answer within the request timeout of "
                                   f"{self.limits.request_timeout_s:g} s; the service is still up") from None
            outcome.seconds = time.monotonic() - started
            outcome.options = {"heatmaps": heatmaps, "sr": sr}
            return outcome
        finally:
            if not handed_over:
                if folder is not None:
                    folder.cleanup()
                if admitted:
                    self.release()

    def _job(self, request_id: str, form: Form, folder: tempfile.TemporaryDirectory, heatmaps: bool, sr: bool,
             cancelled: threading.Event) -> Outcome:
        root = Path(folder.name)
        try:
            prepared = prepare_inputs(form, root, self.limits)
            if cancelled.is_set():
                raise ServiceError(504, "timeout", "timed out before the prediction started")
            out_dir = root / "out"
            # the outputs are read back and deleted below: no fsync (each would wait for the disk's journal)
            with self.lock.exclusive() if heatmaps or sr else self.lock.shared(), scratch_writes():
                predict(self.bundle, prepared.inputs, out_dir, salt=self.salt, heatmaps=heatmaps, sr=sr,
                        predictor=self.predictor, label_root=root, preparer=self.preparer)
            document = _clean_document(json.loads((out_dir / "predictions.json").read_text()), prepared, root,
                                       out_dir)
            outcome = Outcome(request_id=request_id, document=document,
                              csv=(out_dir / "predictions.csv").read_bytes())
            if heatmaps:
                outcome.images = _view_images(document, out_dir, prepared)
            if sr:
                for path in sorted((out_dir / "sr").glob("*.dcm")) if (out_dir / "sr").is_dir() else []:
                    token = self.srs.put(path.name, path.read_bytes())
                    outcome.sr.append({"study_key": path.stem, "file": path.name, "url": f"/api/v1/sr/{token}"})
            return outcome
        except ServiceError:
            raise
        except Exception as error:  # never the message: it may quote a header value
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise storage_error(error) from None  # a full disk while predicting: the server's fault
            log.error("request %s: prediction failed (%s)", request_id, type(error).__name__)
            raise ServiceError(500, "internal", f"the prediction failed ({type(error).__name__}); the service is "
                               "still up") from None
        finally:
            folder.cleanup()
            _return_freed_memory()
            self.release()

    def audit_record(self, request_id: str, route: str, status: int, seconds: float, outcome: Outcome | None = None,
                     error: ServiceError | None = None, options: dict | None = None) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "request_id": request_id,
                  "route": route, "status": status, "seconds": round(seconds, 3),
                  "bundle_sha256": self.bundle.sha256, "options": options or {}}
        if outcome is not None:
            breasts = outcome.document["breasts"].values()
            record["exams"] = [{"exam_key": b["exam_key"], "side": b["side"], "verdict": b["verdict"],
                                "predicted": b["predicted"], "probabilities": b["probabilities"],
                                "disagreement": b["disagreement"], "reasons": b["reasons"]} for b in breasts]
            record["refused_inputs"] = len(outcome.document["refused_inputs"])
        if error is not None:
            record["error"] = error.code  # the code only: the detail names uploads, whose names may identify
        self.audit.write(record)


def _libc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def _return_freed_memory() -> None:
    """Hand the request's freed heap back to the system (glibc keeps it in its per-thread arenas otherwise: the
    decoded images of a request are tens of MB), so the service's memory returns to its level between requests."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _or(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _clean_document(document: dict, prepared: Prepared, root: Path, out_dir: Path) -> dict:
    """predict's document for a client: the request folder's paths replaced by upload names (or dropped), the
    zip members refused by the upload checks added to the refused inputs."""
    manifest_row = re.compile(r"^(?P<csv>.*):(?P<line>\d+) \((?P<path>.*)\)$")
    labels = {}  # predict names inputs relative to the request folder (label_root)
    for path, name in prepared.labels.items():
        try:
            labels[Path(path).relative_to(root).as_posix()] = name
        except ValueError:
            labels[path] = name

    def label(text: str) -> str:
        if text in labels:
            return labels[text]
        match = manifest_row.match(text)
        if match and match["csv"] in labels:
            return labels.get((Path(match["csv"]).parent / match["path"]).as_posix(), f"image row {match['line']}")
        return text.replace(str(root), "(upload)")  # never a server path

    refused = [{**entry, "input": label(entry["input"])} for entry in document.get("refused_inputs", [])]
    document["refused_inputs"] = refused + prepared.refused
    summary = document.setdefault("summary", {})
    summary["refused_inputs"] = len(document["refused_inputs"])
    files = {}
    for name, path in (summary.get("files") or {}).items():
        try:
            files[name] = Path(path).relative_to(out_dir).as_posix()
        except ValueError:
            files[name] = Path(path).name
    summary["files"] = files
    return document


# ---------------------------------------------------------------------------------------------------------------
# What the page shows: views with their Grad-CAM layer, the model card


def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return _uri(buffer.getvalue(), "image/png")


def _uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def jet_layer(cam: np.ndarray) -> np.ndarray:
    """RGBA uint8 of a [0, 1] map: the jet colour map, transparent where the map is low."""
    x = np.clip(cam, 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - k), 0.0, 1.0) for k in (3, 2, 1)], axis=-1)
    alpha = 0.65 * np.clip(x / 0.6, 0.0, 1.0)
    return np.round(np.concatenate([rgb, alpha[..., None]], axis=-1) * 255).astype(np.uint8)


def _view_images(document: dict, out_dir: Path, prepared: Prepared) -> dict:
    """Per exam key and view: the original image ("image", grey, DISPLAY_LONGEST px), its Grad-CAM as a
    transparent colour layer of the same size ("heatmap"), and predict's overlay figure ("figure"); all data: URIs.
    The map comes from predict's 16-bit map file (already in the original image's geometry)."""
    from PIL import Image

    from tlese.data.io import read_image
    from tlese.data.preprocess import normalise_intensity
    from tlese.files import sha256_file

    by_sha = {sha256_file(path): path for path in prepared.images}
    shown: dict[str, dict] = {}
    for key, result in document["breasts"].items():
        for view, entry in (result.get("heatmaps") or {}).items():
            used = next((image for image in result["images"] if image["used"] and image["view"] == view), None)
            if used is None or used["sha256"] not in by_sha:
                continue
            try:
                pixels, _ = read_image(by_sha[used["sha256"]])
                original = normalise_intensity(pixels, None)
                scale = min(1.0, DISPLAY_LONGEST / max(original.shape))
                shape = (max(1, round(original.shape[0] * scale)), max(1, round(original.shape[1] * scale)))
                base = np.round(np.clip(_resize(original, shape), 0, 1) * 255).astype(np.uint8)
                with Image.open(out_dir / entry["map"]) as image:
                    cam = np.asarray(image, dtype=np.float32) / 65535.0
                layer = jet_layer(_resize(cam, shape))
                figure = (out_dir / entry["overlay"]).read_bytes()
            except Exception as error:  # the prediction stands without its picture
                log.warning("a view's picture could not be made (%s)", type(error).__name__)
                continue
            shown.setdefault(key, {})[view] = {"image": _png_uri(base), "heatmap": _png_uri(layer),
                                               "figure": _uri(figure, "image/png"), "width": shape[1],
                                               "height": shape[0]}
    return shown


def _number(value: Any, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if value != value else f"{value:.{digits}f}"


def card_view(bundle: Any) -> dict:
    """The model card as the page shows it (every field optional: a card lacking one shows 'not recorded')."""
    card = getattr(bundle, "card", None) or {}
    meta = getattr(bundle, "meta", None) or {}
    model = card.get("model") or {}
    data = card.get("training_data") or {}
    cv = card.get("cv_metrics") or {}
    provenance = (card.get("provenance") or {}).get("bundled_with") or {}
    calibration = card.get("calibration") or {}
    unit = data.get("unit")
    per_class = data.get("per_class") or {}
    registry = model.get("registry_name") or (meta.get("model") or {}).get("registry_name") or "model"
    training = None
    if data:
        task = (data.get("task") or {}).get("name") if isinstance(data.get("task"), dict) else data.get("task")
        training = (f"{data.get('patients', '?')} patients, {data.get(f'{unit}s', '?')} {unit}s; dataset adapter "
                    f"{data.get('dataset_adapter', '?')}, task {task or '?'}")
        if per_class:
            training += "; per class: " + ", ".join(f"{name} {counts.get('patients', '?')} patients"
                                                   for name, counts in per_class.items())
    metrics = [{"metric": row.get("metric", "?"), "pooled": _number(row.get("pooled")),
                "ci": f"{_number(row.get('ci_low'))} - {_number(row.get('ci_high'))}",
                "mean": _number(row.get("mean"))} for row in cv.get("metrics") or []]
    about = bundle_provenance(bundle)
    return {
        "synthetic": about["synthetic"], "validated_on": about["validated_on"],
        "synthetic_warning": SYNTHETIC_WARNING[:1].upper() + SYNTHETIC_WARNING[1:],
        "name": model.get("arm") or (meta.get("run") or {}).get("arm") or registry,
        "registry_name": registry,
        "version": (f"tlese {provenance.get('tlese', '?')}, bundle format {meta.get('format_version', '?')}"
                    + (f", run {meta['run']['name']}" if (meta.get("run") or {}).get("name") else "")),
        "sha256": bundle.sha256,
        "intended_use": getattr(bundle, "intended_use", None) or card.get("intended_use") or "not recorded",
        "classes": list(bundle.class_names),
        "views": getattr(bundle, "views", "?"),
        "folds": len(getattr(bundle, "models", []) or []),
        "image_size": int(bundle.preprocess.size),
        "training": training,
        "cv_unit": cv.get("unit"), "cv_ci": cv.get("ci"), "cv_boot": cv.get("n_boot"),
        "metrics": [row for row in metrics if "(" not in row["metric"]],
        "class_metrics": [row for row in metrics if "(" in row["metric"]],  # "auc (Luminal A)", ...
        "calibration": (f"temperature {_number(calibration.get('temperature'), 3)}; ECE "
                        f"{_number(calibration.get('ece_before'), 4)} -> {_number(calibration.get('ece_after'), 4)}"
                        if calibration else None),
    }


def breast_views(document: dict, images: dict, bundle: Any) -> list[dict]:
    """The breasts of a result in the page's terms: side words, verdict words, bars, views."""
    classes = list(bundle.class_names)
    read, _ = bundle_views(bundle)
    shown = []
    for key, result in document["breasts"].items():
        probabilities = result.get("probabilities") or {}
        raw = result.get("raw_probabilities") or {}
        views = []
        for view in ("CC", "MLO"):
            entries = [image for image in result["images"] if image["view"] == view]
            used = next((image for image in entries if image["used"]), None)
            why = "; ".join(dict.fromkeys(image["not_used_because"] for image in entries
                                          if image.get("not_used_because"))) or (
                "no image of this view uploaded" if view in read else f"this model reads {' and '.join(read)} "
                                                                       "images only")
            views.append({"view": view, "used": used is not None, "why": None if used else why,
                          "picture": images.get(key, {}).get(view),
                          "duplicated": bundle.views == "dual" and used is None and result["verdict"] == "degraded"})
        per_model = result.get("per_model_probabilities") or []
        shown.append({
            "key": key, "side": result["side"], "side_words": SIDE_WORDS.get(result["side"], result["side"]),
            "verdict": result["verdict"], "verdict_words": VERDICT_WORDS.get(result["verdict"], ""),
            "reasons": result.get("reasons") or [], "predicted": result.get("predicted"),
            "bars": [{"name": name, "value": probabilities.get(name), "text": _number(probabilities.get(name)),
                      "raw": _number(raw.get(name)), "predicted": name == result.get("predicted")}
                     for name in classes] if probabilities else [],
            "disagreement": _number(result.get("disagreement")), "disagreement_value": result.get("disagreement"),
            "folds": len(per_model),
            "fold_predictions": [max(row, key=row.get) for row in per_model] if per_model else [],
            "views": views,
            "ood_flag": bool(result.get("ood_flag")), "ood_score": result.get("ood_score"),
            "ood_text": _number(result.get("ood_score")),
        })
    return shown


# ---------------------------------------------------------------------------------------------------------------
# The app


def _resource(name: str) -> Path:
    return Path(str(resources.files("tlese.serve") / name))


PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
MULTIPART_SCHEMA = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "the exam's images: DICOM files, zip archives of DICOM files, PNG / JPEG"},
            "side": {"type": "array", "items": {"type": "string", "enum": ["", "L", "R"]},
                     "description": "one per file, in the files' order: the side of a PNG / JPEG (empty for DICOM "
                                    "and zip: the header says)"},
            "view": {"type": "array", "items": {"type": "string", "enum": ["", "CC", "MLO"]},
                     "description": "one per file, as `side`"},
        }}}},
}


def create_app(bundle: Any, limits: Limits | None = None, *, state_dir: str | Path | None = None,
               audit_log: str | Path | None = None, salt: str | None = None, tmp_dir: str | Path | None = None,
               runtime: str = "torch", onnx_threads: int | None = None, trusted_keys: Any = None,
               allow_unsigned: bool = False):
    """The FastAPI app serving `bundle` (a loaded `Bundle`, or a path given to `load_bundle` with `trusted_keys` /
    `allow_unsigned`, loaded and verified once here).

    limits: `tlese.serve.limits.Limits` (defaults: safe for one exam per request). audit_log: the JSON-lines audit
    file (default <state_dir>/audit.jsonl; state_dir default `default_state_dir()`); salt: the exam-key secret
    (default: made once into <audit log>.salt beside the log). tmp_dir: the service's own area for the per-request
    folders (default <audit log's folder>/requests), emptied of request folders at start and on exit. runtime:
    "torch" or "onnx" (exported once, at start)."""
    from tlese.version import __version__

    if not hasattr(bundle, "predict_arrays"):
        from tlese.bundle.format import load_bundle

        options = {"trusted_keys": trusted_keys} if trusted_keys is not None else {}
        bundle = load_bundle(bundle, **options, **({"allow_unsigned": True} if allow_unsigned else {}))
    limits = limits or Limits()
    state = Path(state_dir) if state_dir is not None else default_state_dir()
    audit_path = Path(audit_log) if audit_log is not None else state / AUDIT_FILE
    audit_path.parent.mkdir(parents=True, exist_ok=True)
    key_salt = salt or load_salt(audit_path.with_name(audit_path.name + SALT_SUFFIX))
    service = Service(bundle, limits, audit_log=audit_path, salt=key_salt, tmp_dir=tmp_dir, runtime=runtime,
                      onnx_threads=onnx_threads)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPIOffline(
        title="tlese serve", version=__version__, redoc_url=None, lifespan=lifespan,
        description=f"Breast-cancer subtype from one exam's mammograms, by bundle {bundle.sha256[:12]}. Intended "
                    f"use: {service.card['intended_use']}.")
    app.state.service = service
    templates = Jinja2Templates(directory=str(_resource("templates")))
    app.mount("/static", StaticFiles(directory=str(_resource("static"))), name="static")

    errors = {status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "bad request: no file, empty file, unsafe zip, missing side/view"), (408, "upload too slow"),
        (413, "upload, file count, image dimensions or unzipped size over its limit"),
        (415, "not multipart, or a file that is not DICOM / PNG / JPEG / zip"),
        (422, "truncated or unreadable DICOM / image"), (429, "too many requests from this address at once"),
        (503, "busy"), (504, "timed out"), (507, "the service's disk is full"))}

    app.add_middleware(DeadlineMiddleware, timeout_s=lambda: service.limits.request_timeout_s)
    app.add_middleware(RequestIdMiddleware)

    def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        context.update(card=service.card, limits=limits, overlay_sentence=OVERLAY_SENTENCE,
                       max_mb=round(limits.max_upload_bytes / 2**20))
        response = templates.TemplateResponse(request, template, context, status_code=status)
        response.headers.update(PAGE_HEADERS)
        return response

    async def answer(request: Request, route: str, heatmaps: bool, sr: bool) -> tuple[Outcome | None,
                                                                                     ServiceError | None]:
        started = time.monotonic()
        try:
            try:
                outcome = await service.handle(request, heatmaps=heatmaps, sr=sr)
            except ClientDisconnect:
                raise ServiceError(400, "client_disconnected", "the upload was interrupted") from None
            except RequestDeadline:
                raise ServiceError(408, "upload_timeout", "the upload stalled: no complete body within the request "
                                   f"timeout of {service.limits.request_timeout_s:g} s") from None
            except ServiceError:
                raise
            except OSError as unexpected:  # e.g. a full disk while receiving: the server's fault, never a 4xx
                log.error("request %s: storage fault (%s)", request.state.request_id, type(unexpected).__name__)
                raise storage_error(unexpected) from None
            except Exception as unexpected:  # the type only (see _job)
                log.error("request %s: failed (%s)", request.state.request_id, type(unexpected).__name__)
                raise ServiceError(500, "internal", f"the request failed ({type(unexpected).__name__}); the service "
                                   "is still up") from None
        except ServiceError as error:
            seconds = time.monotonic() - started
            log.info("request %s %s: status %d (%s), verdicts ok=0 degraded=0 refused=0, %.2f s",
                     request.state.request_id, route, error.status, error.code, seconds)
            service.audit_record(request.state.request_id, route, error.status, seconds,
                                 error=error, options={"heatmaps": heatmaps, "sr": sr})
            return None, error
        summary = outcome.document.get("summary", {})
        log.info("request %s %s: status 200, verdicts ok=%s degraded=%s refused=%s, %.2f s", request.state.request_id,
                 route, summary.get("ok"), summary.get("degraded"), summary.get("refused"), outcome.seconds)
        service.audit_record(request.state.request_id, route, 200, outcome.seconds, outcome=outcome,
                             options=outcome.options)
        return outcome, None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request):
        return page(request, "index.html")

    @app.post("/predict", response_class=HTMLResponse, include_in_schema=False)
    async def predict_page(request: Request):
        outcome, error = await answer(request, "page", heatmaps=False, sr=False)
        if error is not None:
            return page(request, "index.html", status=error.status, error=error.detail,
                        request_id=request.state.request_id)
        downloads = [{"name": "predictions.csv", "href": _uri(outcome.csv, "text/csv")},
                     {"name": "predictions.json", "href": _uri(_json_bytes(outcome.document), "application/json")}]
        downloads += [{"name": f"DICOM SR {item['file']}", "href": item["url"], "file": item["file"]}
                      for item in outcome.sr]
        return page(request, "result.html", result=outcome.document,
                    breasts=breast_views(outcome.document, outcome.images, bundle), downloads=downloads,
                    refused_inputs=outcome.document.get("refused_inputs", []), request_id=outcome.request_id,
                    seconds=f"{outcome.seconds:.1f}", heatmaps=bool(outcome.images))

    @app.post("/api/v1/predict", openapi_extra={"requestBody": MULTIPART_SCHEMA}, responses=errors,
              summary="Predict one exam", description=(
                  "The same JSON document as `tlese predict` (predictions.json: bundle, summary, breasts by exam key, "
                  "refused inputs) plus `request_id`; with heatmaps=true also `heatmap_images` (per exam key and "
                  "view: the image, its Grad-CAM layer and predict's overlay figure as PNG data: URIs; one backward "
                  "pass per fold model, so off by default); with sr=true also `sr`: download URLs of the DICOM SRs "
                  "(they carry the patient module of the source images), kept 15 minutes. format=csv answers "
                  "predictions.csv instead."))
    async def predict_api(request: Request, heatmaps: bool = Query(False, description="Grad-CAM per view"),
                          sr: bool = Query(False, description="DICOM SR per study"),
                          format: str = Query("json", pattern="^(json|csv)$")):  # noqa: A002 - the query name
        outcome, error = await answer(request, "api", heatmaps=heatmaps, sr=sr)
        if error is not None:
            return JSONResponse({"detail": error.detail, "code": error.code, "request_id": request.state.request_id},
                                status_code=error.status, headers=API_HEADERS)
        if format == "csv":
            return Response(outcome.csv, media_type="text/csv", headers={
                **API_HEADERS, "Content-Disposition": 'attachment; filename="predictions.csv"'})
        body = {"request_id": outcome.request_id, **outcome.document}
        if outcome.images:
            body["heatmap_images"] = outcome.images
        if outcome.options.get("sr"):
            body["sr"] = outcome.sr
        return Response(_json_bytes(body), media_type="application/json", headers=API_HEADERS)

    @app.get("/api/v1/model", summary="The model card")
    async def model_card():
        return JSONResponse({
            "bundle": {"sha256": bundle.sha256, "class_names": list(bundle.class_names), "views": bundle.views,
                       "image_size": int(bundle.preprocess.size), "folds": list(getattr(bundle, "folds", []) or []),
                       "intended_use": service.card["intended_use"]},
            "card": getattr(bundle, "card", None) or {}, "limits": limits.to_dict(),
            "service": {"tlese": __version__, "runtime": service.runtime}}, headers=API_HEADERS)

    @app.get("/api/v1/sr/{token}", summary="Download an SR made by a request with sr=true",
             responses={404: {"description": "unknown or expired token"}})
    async def sr_file(token: str):
        item = service.srs.get(token)
        if item is None:
            return JSONResponse({"detail": "no such SR (unknown or expired after 15 minutes)", "code": "not_found"},
                                status_code=404, headers=API_HEADERS)
        name, data = item
        return Response(data, media_type="application/dicom", headers={
            **API_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return JSONResponse({"status": "ok", "bundle_sha256": bundle.sha256, "in_flight": service.in_flight,
                             "workers": limits.workers}, headers=API_HEADERS)

    return app


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    detail: str
    code: str
    request_id: str


def _json_bytes(document: dict) -> bytes:
    return (json.dumps(document, indent=1, allow_nan=False) + "\n").encode()


class DeadlineMiddleware:
    """One deadline per HTTP request, from its first byte (`timeout_s()` seconds): `request.state.deadline`
    (time.monotonic()), and the request body read through a `receive` that waits no longer than what is left
    (RequestDeadline after), so a client that stops sending mid-body cannot hold a slot past it. Once the body is in,
    `receive` is passed through untouched. Plain ASGI: bodies stream through."""

    def __init__(self, app, timeout_s):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + float(self.timeout_s())
        scope.setdefault("state", {})["deadline"] = deadline
        body_done = False

        async def receive_by_deadline():
            nonlocal body_done
            if body_done:
                return await receive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestDeadline
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                raise RequestDeadline from None
            if message.get("type") != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_by_deadline, send)


class RequestIdMiddleware:
    """A random id per request (request.state.request_id, the X-Request-ID header): what the audit log and the
    service's log lines are keyed by. Plain ASGI, so request bodies stream through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


__all__ = ["AuditLog", "DeadlineMiddleware", "Limits", "Outcome", "Service", "ServiceError", "SharedExclusive",
           "SrStore", "breast_views", "card_view", "clean_request_area", "create_app", "default_state_dir", "jet_layer",
           "load_salt"]
