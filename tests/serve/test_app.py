"""`tlese serve`'s app through FastAPI's TestClient: the API gives predict's records, every limit and every bad
upload its 4xx (and the service stays up), no temporary folder outlives its request, no identifier leaves the
service, and concurrent requests each get their own answer.

The bundle is `exam_helpers.random_bundle` (two random-weight models at 64 px): the service, not the model, is
under test. Every test's service makes its request folders in a folder of its own, and Python's temporary folder is
pointed at another one (predict's own temporary folders land there); both must be empty after every test.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import re
import shutil
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from exam_helpers import SECRETS, cbis_truth, dicom_copy, random_bundle
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tlese.predict.pipeline import predict  # noqa: E402
from tlese.serve import app as app_module  # noqa: E402
from tlese.serve.app import SharedExclusive, create_app  # noqa: E402
from tlese.serve.uploads import Limits  # noqa: E402

SALT = "test-salt"


@pytest.fixture(scope="module")
def bundle():
    return random_bundle()


@pytest.fixture
def serve(bundle, tmp_path, monkeypatch):
    """serve(limits=None) -> (TestClient, Service); on teardown: no request in flight, both temp folders empty."""
    requests_dir, system_tmp = tmp_path / "requests", tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_tmp))
    made = []

    def start(limits: Limits | None = None, **kwargs):
        app = create_app(bundle, limits, audit_log=tmp_path / "state" / "audit.jsonl", salt=SALT,
                         tmp_dir=requests_dir, **kwargs)
        client = TestClient(app)
        client.__enter__()
        made.append(client)
        return client, app.state.service

    yield start
    for client in made:
        assert client.app.state.service.drain(60), "a request still running after the test"
        client.__exit__(None, None, None)
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in [*requests_dir.rglob("*"), *system_tmp.rglob("*")])
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def exam(cbis_dicoms, patient: str, views: tuple[tuple[str, str], ...] | None = None) -> list[tuple]:
    """Multipart `files` of one patient's DICOMs (all 4, or the given (side, view)s), under neutral names."""
    chosen = [path for path in cbis_dicoms if cbis_truth(path)[0] == patient
              and (views is None or cbis_truth(path)[1:] in views)]
    return [("files", (f"img_{i}.dcm", path.read_bytes(), "application/dicom")) for i, path in enumerate(chosen)]


def answer(body: dict) -> dict:
    return {b["side"]: (b["exam_key"], b["verdict"], b["probabilities"]) for b in body["breasts"].values()}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (16-bit grey) with a tiny, wrong IDAT: nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def zipped(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def post(client, files, data=None, **params):
    return client.post("/api/v1/predict", files=files, data=data, params=params)


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["request_id"] == response.headers["x-request-id"]
    return body["detail"]


# ---------------------------------------------------------------------------------------------------------------
# The API answers what `tlese predict` writes


def test_the_api_gives_predicts_records(serve, bundle, cbis_dicoms, tmp_path):
    client, _ = serve()
    files = exam(cbis_dicoms, "P_00173")
    response = post(client, files)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["summary"]["breasts"] == 2 and body["summary"]["ok"] == 2
    assert {b["side"] for b in body["breasts"].values()} == {"L", "R"}
    assert all(len(b["probabilities"]) == 4 for b in body["breasts"].values())
    assert "heatmap_images" not in body  # off by default for API requests
    # the same records as `tlese predict` on the same files with the same salt
    folder = tmp_path / "direct"
    folder.mkdir()
    for _, (name, data, _) in files:
        (folder / name).write_bytes(data)
    predict(bundle, [folder], tmp_path / "direct_out", salt=SALT)
    direct = json.loads((tmp_path / "direct_out" / "predictions.json").read_text())
    assert body["breasts"] == direct["breasts"] and body["bundle"] == direct["bundle"]
    csv = client.post("/api/v1/predict", files=files, params={"format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text == (tmp_path / "direct_out" / "predictions.csv").read_text()


def test_model_card_health_docs_and_page(serve, bundle):
    client, _ = serve()
    model = client.get("/api/v1/model").json()
    assert model["bundle"]["sha256"] == bundle.sha256 and model["card"] == bundle.card
    assert model["limits"]["max_files"] == Limits().max_files
    assert client.get("/healthz").json() == {"status": "ok", "bundle_sha256": bundle.sha256, "in_flight": 0,
                                            "workers": Limits().workers}
    docs = client.get("/docs").text
    assert "swagger-ui" in docs and "cdn" not in docs and "https://" not in docs
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/static-offline-docs/{asset}").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert {"413", "415", "422"} <= set(schema["paths"]["/api/v1/predict"]["post"]["responses"])
    page = client.get("/")
    assert page.status_code == 200 and "test only" in page.text and bundle.sha256 in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # every asset local: no URL to another host
    for asset in ("app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200


def test_zip_and_png_uploads(serve, cbis_dicoms):
    from tlese.data.io import read_image
    from tlese.data.preprocess import normalise_intensity

    client, _ = serve()
    members = {f"exam/{name}": data for _, (name, data, _) in exam(cbis_dicoms, "P_00173")}
    members["exam/readme.txt"] = b"exported from the PACS\n"
    response = post(client, [("files", ("exam.zip", zipped(members), "application/zip"))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["summary"]["ok"] == 2
    assert body["refused_inputs"] == [{"input": "exam.zip, member 5 (readme.txt)", "reason": "not a DICOM image"}]

    pictures = []
    for view in ("CC", "MLO"):
        path = next(p for p in cbis_dicoms if cbis_truth(p) == ("P_00820", "R", view))
        pixels, _ = read_image(path)
        buffer = io.BytesIO()
        Image.fromarray(np.round(normalise_intensity(pixels, None) * 65535).astype(np.uint16)).save(buffer, "PNG")
        pictures.append(("files", (f"{view.lower()}.png", buffer.getvalue(), "image/png")))
    missing = client.post("/api/v1/predict", files=pictures)
    assert "needs its side" in error_of(missing, 400, "side_view_needed")
    form = {"side": ["R", "R"], "view": ["CC", "MLO"]}
    first = client.post("/api/v1/predict", files=pictures, data=form).json()
    (breast,) = first["breasts"].values()
    assert breast["verdict"] == "ok" and breast["source"] == "manifest" and breast["side"] == "R"
    again = client.post("/api/v1/predict", files=pictures, data=form).json()
    assert list(again["breasts"]) == list(first["breasts"])  # the same images, the same exam key
    wrong_count = client.post("/api/v1/predict", files=pictures, data={"side": ["R"], "view": ["CC"]})
    error_of(wrong_count, 400, "side_view_count")


# ---------------------------------------------------------------------------------------------------------------
# Limits and bad uploads: a clear 4xx each, the service stays up


def test_every_limit_and_bad_upload_gets_its_4xx(serve, cbis_dicoms, tmp_path):
    client, service = serve(Limits(max_upload_bytes=42 * 2**20, max_files=4, max_pixels=40_000_000,
                                   max_unzipped_bytes=30 * 2**20))
    one = cbis_dicoms[0]
    dicom = one.read_bytes()

    detail = error_of(post(client, [("files", (f"f{i}.dcm", dicom)) for i in range(5)]), 413, "upload_too_large")
    assert "limit" in detail and "MB" in detail
    assert "more than 4 files" in error_of(post(client, [("files", (f"f{i}.png", b"x")) for i in range(5)]), 413,
                                           "too_many_files")
    huge = post(client, [("files", ("huge.png", png_header(20_000, 20_000)))], data={"side": "L", "view": "CC"})
    assert "huge.png" in error_of(huge, 413, "image_too_large") and "20000 x 20000" in huge.json()["detail"]
    big_dicom = dicom_copy(one, tmp_path / "big.dcm", Rows=30_000, Columns=30_000)
    assert "30000 x 30000" in error_of(post(client, [("files", ("big.dcm", big_dicom.read_bytes()))]), 413,
                                       "image_too_large")
    bomb = zipped({"bomb.dcm": bytes(25 * 2**20)})  # under the unzipped limit: the ratio gives it away
    assert len(bomb) < 2**20
    assert "zip bomb" in error_of(post(client, [("files", ("bomb.zip", bomb))]), 413, "zip_too_large")
    many = zipped({f"m{i}.dcm": b"x" for i in range(9)})
    assert "limit" in error_of(post(client, [("files", ("many.zip", many))]), 413, "zip_too_large")
    evil = zipped({"../../x.dcm": dicom[:2000], "fine.dcm": dicom[:2000]})
    assert "path traversal" in error_of(post(client, [("files", ("evil.zip", evil))]), 400, "unsafe_zip")
    assert not list(tmp_path.rglob("x.dcm"))
    assert "0 bytes" in error_of(post(client, [("files", ("empty.dcm", b""))]), 400, "empty_file")
    truncated = post(client, [("files", ("cut.dcm", dicom[: len(dicom) // 2]))])
    assert "cut.dcm: truncated DICOM" in error_of(truncated, 422, "truncated_dicom")
    text = post(client, [("files", ("x.dcm", b"patient list, not an image\n"))])
    assert "x.dcm: not a DICOM, PNG, JPEG or zip file" in error_of(text, 415, "unsupported_content")
    damaged_png = post(client, [("files", ("bad.png", png_header(100, 100)[:40]))], data={"side": "L", "view": "CC"})
    error_of(damaged_png, 422, "bad_image")
    error_of(client.post("/api/v1/predict", json={"files": []}), 415, "not_multipart")
    error_of(client.post("/api/v1/predict", data={"side": "L"}, files=[]), 415, "not_multipart")
    error_of(client.post("/api/v1/predict", files={"other": ("a.dcm", dicom)}), 400, "bad_field")
    assert client.post("/api/v1/predict", params={"heatmaps": "perhaps"}).status_code == 422  # FastAPI's check

    # the body is counted as it streams too (no Content-Length: chunked)
    def body():
        yield b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n'
        for _ in range(50):
            yield bytes(2**20)
        yield b"\r\n--B--\r\n"

    streamed = client.post("/api/v1/predict", content=body(), headers={"content-type": "multipart/form-data; "
                                                                                       "boundary=B"})
    error_of(streamed, 413, "upload_too_large")
    # still up, and a good exam still works
    assert client.get("/healthz").json()["status"] == "ok"
    assert post(client, exam(cbis_dicoms, "P_00820")).status_code == 200
    assert service.drain(30) and service.in_flight == 0


def small_png(side: str = "L", view: str = "MLO") -> tuple[list[tuple], dict]:
    """A tiny PNG upload with its side and view: checked in milliseconds, whatever the machine's load."""
    buffer = io.BytesIO()
    Image.fromarray((np.arange(128 * 96).reshape(128, 96) % 251).astype(np.uint8)).save(buffer, "PNG")
    return [("files", ("small.png", buffer.getvalue(), "image/png"))], {"side": side, "view": view}


def test_timeout_and_busy_answers_and_the_service_stays_up(serve, cbis_dicoms, monkeypatch):
    """No real prediction under a short timeout: the blocked prediction is a stand-in that waits for the test; the
    uploads are a tiny PNG; the real exam at the end runs under a generous timeout."""
    real_predict = app_module.predict
    release, started = threading.Event(), threading.Event()

    def blocked_predict(*args, **kwargs):
        started.set()
        release.wait(60)
        raise RuntimeError("released")

    monkeypatch.setattr(app_module, "predict", blocked_predict)
    client, service = serve(Limits(request_timeout_s=5.0, workers=1, max_queue=0))
    files, form = small_png()
    assert "timeout" in error_of(client.post("/api/v1/predict", files=files, data=form), 504, "timeout")
    assert started.is_set()
    # the timed-out prediction still runs (and holds the only worker): the next request is turned away
    assert service.in_flight == 1
    assert "busy" in error_of(client.post("/api/v1/predict", files=files, data=form), 503, "busy")
    release.set()
    assert service.drain(60) and service.in_flight == 0
    monkeypatch.setattr(app_module, "predict", real_predict)
    service.limits = dataclasses.replace(service.limits, request_timeout_s=600.0)  # generous: any machine
    assert post(client, exam(cbis_dicoms, "P_00173")).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# No identifier leaves the service


def test_identifiers_appear_nowhere(serve, cbis_dicoms, tmp_path, caplog, capfd, recwarn):
    client, service = serve()
    crafted = []
    for view in ("CC", "MLO"):
        source = next(p for p in cbis_dicoms if cbis_truth(p) == ("P_00820", "L", view))
        crafted.append(dicom_copy(source, tmp_path / f"secret_{view}.dcm", new_study=view == "CC", **SECRETS))
    # both views in one study (the CC copy made it), so one breast, ok
    import pydicom

    study = pydicom.dcmread(crafted[0], stop_before_pixels=True).StudyInstanceUID
    crafted[1] = dicom_copy(crafted[1], crafted[1], new_study=False, StudyInstanceUID=study)
    files = [("files", (f"image_{i}.dcm", path.read_bytes(), "application/dicom")) for i, path in enumerate(crafted)]
    secrets = [*SECRETS.values(), "Secretname", "Zyxwv", study]
    caplog.set_level(logging.DEBUG)
    api = post(client, files, heatmaps="true", sr="true")
    assert api.status_code == 200, api.text
    body = api.json()
    (breast,) = body["breasts"].values()
    assert breast["verdict"] == "ok" and body["heatmap_images"][breast["exam_key"]].keys() == {"CC", "MLO"}
    page = client.post("/predict", files=files, data={"heatmaps": "1", "sr": "1"})
    assert page.status_code == 200 and page.text.count('class="breast-card') == 1
    for _, (name, _, _) in files:
        bad = [("files", (name, b"not an image"))]
        post(client, bad)
    assert service.drain(30)
    said = capfd.readouterr()
    texts = {"api": api.text, "page": page.text, "headers": str(dict(api.headers)) + str(dict(page.headers)),
             "log": caplog.text, "stdout": said.out, "stderr": said.err,
             "warnings": "\n".join(str(warning.message) for warning in recwarn),
             "audit": (tmp_path / "state" / "audit.jsonl").read_text()}
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} in the {where}"
    audit = [json.loads(line) for line in texts["audit"].splitlines()]
    assert [record["status"] for record in audit] == [200, 200, 415, 415]
    assert audit[0]["exams"][0]["exam_key"] == breast["exam_key"] and audit[0]["bundle_sha256"]
    assert audit[1]["route"] == "page" and audit[1]["options"] == {"heatmaps": True, "sr": True}
    assert audit[2]["error"] == "unsupported_content" and "image_0" not in texts["audit"]
    # the SR is a PACS object: it carries the patient module by design, so it is only a download link away
    (sr,) = body["sr"]
    download = client.get(sr["url"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(download.content)).Modality == "SR"
    assert client.get("/api/v1/sr/unknown-token").status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Concurrency


@pytest.mark.parametrize("processes", [0, 2], ids=["threads", "worker processes"])
def test_concurrent_requests_each_get_their_own_answer(serve, cbis_dicoms, processes):
    """Images prepared in the request threads, or in worker processes shared by all requests."""
    client, service = serve(Limits(workers=4, max_queue=8, max_per_client=8, processes=processes))  # one address
    assert service.preparer.processes == processes
    inputs = {"P_00173": exam(cbis_dicoms, "P_00173"), "P_00820": exam(cbis_dicoms, "P_00820"),
              "one view": exam(cbis_dicoms, "P_00173", views=(("L", "CC"),))}
    single = {name: answer(post(client, files).json()) for name, files in inputs.items()}
    assert single["one view"]["L"][1] == "degraded" and len(set(map(str, single.values()))) == 3
    jobs = [name for name in inputs for _ in range(2)] + ["P_00820 heatmaps"]

    def run(name: str) -> tuple[str, dict]:
        if name.endswith("heatmaps"):  # Grad-CAM runs alone (exclusive lock) while the others wait
            body = post(client, inputs[name.split()[0]], heatmaps="true").json()
            return name.split()[0], answer(body)
        return name, answer(post(client, inputs[name]).json())

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for name, got in results:
        assert got == single[name], name


def test_shared_exclusive_lock():
    lock = SharedExclusive()
    inside, log = [], []

    def shared(tag):
        with lock.shared():
            inside.append(tag)
            time.sleep(0.2)
            log.append(("shared", len(inside)))
            inside.remove(tag)

    def exclusive():
        with lock.exclusive():
            log.append(("exclusive", len(inside)))

    threads = [threading.Thread(target=shared, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    writer = threading.Thread(target=exclusive)
    writer.start()
    for thread in [*threads, writer]:
        thread.join(5)
    assert ("shared", 2) in log  # the two shared holders overlapped
    assert log[-1] == ("exclusive", 0)  # the exclusive one waited for both


# ---------------------------------------------------------------------------------------------------------------
# The page


def test_page_result_and_error(serve, cbis_dicoms):
    client, _ = serve()
    result = client.post("/predict", files=exam(cbis_dicoms, "P_00173"), data={"heatmaps": ["0", "1"]})
    assert result.status_code == 200
    html = result.text
    assert html.count('class="breast-card') == 2 and len(re.findall(r'class="prob( predicted)?"', html)) == 8
    assert html.count('class="heatmap heat-layer" src="data:image/png;base64,') == 4
    assert "predictions.csv" in html and "data:text/csv;base64," in html and "P_00" not in html
    error = client.post("/predict", files=[("files", ("x.dcm", b"not an image"))])
    assert error.status_code == 415 and 'id="error-detail"' in error.text and "x.dcm: not a DICOM" in error.text
    assert 'id="upload"' in error.text  # the form, for the next upload
    named = client.post("/predict", files=[("files", ("<img src=x onerror=alert(1)>.dcm", b"not an image"))])
    assert "&lt;img src=x onerror=alert(1)&gt;.dcm" in named.text and "<img src=x" not in named.text


def test_serve_command_is_registered():
    from tlese.cli import build_parser

    args = build_parser().parse_args(["serve", "some_bundle", "--port", "8123", "--max-files", "8"])
    assert args.command == "serve" and args.port == 8123 and args.host == "127.0.0.1" and args.max_files == 8


def test_salt_is_made_once_beside_the_audit_log(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    first = create_app(bundle, audit_log=tmp_path / "logs" / "audit.jsonl", tmp_dir=tmp_path / "requests")
    second = create_app(bundle, audit_log=tmp_path / "logs" / "audit.jsonl", tmp_dir=tmp_path / "requests")
    salt = tmp_path / "logs" / "audit.jsonl.salt"
    assert salt.is_file() and (salt.stat().st_mode & 0o777) == 0o600
    assert first.state.service.salt == second.state.service.salt == salt.read_text().strip()
    for app in (first, second):
        app.state.service.close()
    shutil.rmtree(tmp_path / "requests", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Safety: a stalled upload, a cheap sniff, per-client limits, a full disk, the temporary area, the log line


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stalled_uploads_are_closed_and_a_good_request_is_answered(bundle, cbis_dicoms, tmp_path, monkeypatch):
    """20 real connections to a real uvicorn send their headers and half a body, then nothing. One client address
    holds at most max_per_client of them (the rest: 429 at once), those it holds are answered 408 at the deadline
    and closed; meanwhile a good request from another address is answered 200. Statuses only: no timing asserted."""
    import socket

    import httpx
    import uvicorn

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    limits = Limits(request_timeout_s=45.0, workers=1, max_queue=2, max_per_client=4)
    app = create_app(bundle, limits, audit_log=tmp_path / "state" / "audit.jsonl", salt=SALT,
                     tmp_dir=tmp_path / "requests")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=5, limit_concurrency=limits.max_uploads + 32))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        body = b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.dcm\"\r\n\r\n" + bytes(2**16)
        head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B"
                f"\r\nContent-Length: {2 * len(body)}\r\n\r\n").encode()
        stalled = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head + body)  # half the body, then nothing
            stalled.append(sock)
        # a good exam from another address, while the stalled ones hold their slots
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, base_url=f"http://127.0.0.1:{port}", timeout=120) as good:
            files = exam(cbis_dicoms, "P_00173")
            answer_ = good.post("/api/v1/predict", files=files)
        assert answer_.status_code == 200, answer_.text
        assert answer_.json()["summary"]["ok"] == 2
        statuses, closed = [], 0
        for sock in stalled:
            sock.settimeout(120)
            received = b""
            while chunk := sock.recv(4096):  # the answer, then the end: the server closes the connection
                received += chunk
            closed += 1
            statuses.append(int(received.split(b" ")[1]) if received else None)
            sock.close()
        assert sorted(statuses) == [408] * 4 + [429] * 16, statuses
        assert closed == 20
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["in_flight"] == 0
    finally:
        server.should_exit = True
        thread.join(60)
    assert not list((tmp_path / "requests").iterdir())  # emptied on exit


def test_a_zero_body_is_refused_from_its_first_bytes(serve, monkeypatch):
    import pydicom

    client, _ = serve()
    parsed = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parsed.append(1))
    for content in (b"\x08\x00" + bytes(4 * 2**20), bytes(128) + b"DICM" + bytes(2**20)):
        response = post(client, [("files", ("zeros.dcm", content, "application/dicom"))])
        assert "not a DICOM" in error_of(response, 415, "unsupported_content")
    assert parsed == []  # no parser was run on them


def test_one_client_address_holds_at_most_its_limit(serve, monkeypatch):
    from tlese.serve.uploads import ServiceError

    _, service = serve(Limits(max_per_client=2))
    service.enter("10.0.0.1")
    service.enter("10.0.0.1")
    with pytest.raises(ServiceError) as refused:
        service.enter("10.0.0.1")
    assert refused.value.status == 429
    service.enter("10.0.0.2")  # another address is not held back
    for client in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        service.leave(client)
    service.enter("10.0.0.1")
    service.leave("10.0.0.1")


def test_a_full_disk_is_the_servers_fault(serve, cbis_dicoms, monkeypatch):
    from tlese.serve import uploads

    client, service = serve()

    class FullDisk(io.RawIOBase):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads, "open", FullDisk, raising=False)
    response = post(client, exam(cbis_dicoms, "P_00173"))
    assert "disk is full" in error_of(response, 507, "insufficient_storage")
    monkeypatch.undo()
    assert client.get("/healthz").json()["status"] == "ok" and service.drain(30)


def test_the_request_area_is_emptied_at_start_and_exit(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "system"))
    (tmp_path / "system").mkdir()
    state = tmp_path / "state"
    left = state / "requests" / "tlese-serve-killed"
    left.mkdir(parents=True)
    (left / "000.dcm").write_bytes(b"an upload of a service killed mid-request")
    (state / "requests" / "keep.txt").write_text("not ours")
    app = create_app(bundle, audit_log=state / "audit.jsonl", salt=SALT)  # the default area: beside the audit log
    assert not left.exists() and (state / "requests" / "keep.txt").is_file()
    assert app.state.service.tmp_dir == state / "requests"
    with TestClient(app):
        (state / "requests" / "tlese-serve-late").mkdir()
    assert not (state / "requests" / "tlese-serve-late").exists()  # emptied on exit (lifespan end)


def test_one_log_line_per_request(serve, cbis_dicoms, caplog):
    client, _ = serve()
    caplog.set_level(logging.INFO, logger="tlese.serve")
    response = post(client, exam(cbis_dicoms, "P_00173"))
    bad = post(client, [("files", ("x.dcm", b"not an image"))])
    lines = [record.getMessage() for record in caplog.records if record.name == "tlese.serve"]
    ok_id, bad_id = response.headers["x-request-id"], bad.headers["x-request-id"]
    assert any(line.startswith(f"request {ok_id} api: status 200, verdicts ok=2 degraded=0 refused=0, ")
               and line.endswith(" s") for line in lines), lines
    assert any(line.startswith(f"request {bad_id} api: status 415") for line in lines), lines


def test_two_patients_sharing_a_study_are_refused_not_merged(serve, cbis_dicoms, tmp_path):
    import pydicom

    client, _ = serve()
    study = pydicom.uid.generate_uid()
    cc = next(p for p in cbis_dicoms if cbis_truth(p) == ("P_00173", "L", "CC"))
    mlo = next(p for p in cbis_dicoms if cbis_truth(p) == ("P_00820", "L", "MLO"))
    a = dicom_copy(cc, tmp_path / "a.dcm", new_study=False, StudyInstanceUID=study, PatientID="PAT-A")
    b = dicom_copy(mlo, tmp_path / "b.dcm", new_study=False, StudyInstanceUID=study, PatientID="PAT-B")
    files = [("files", (f"img_{i}.dcm", path.read_bytes(), "application/dicom")) for i, path in enumerate((a, b))]
    body = post(client, files, sr="true").json()
    assert body["summary"]["breasts"] == 2 and body["summary"]["refused"] == 2
    for breast in body["breasts"].values():
        assert breast["verdict"] == "refused" and breast["probabilities"] is None
        assert any(reason.startswith("identity conflict") and "StudyInstanceUID" in reason
                   for reason in breast["reasons"])
    assert body["sr"] == [] and "PAT-" not in json.dumps(body)
    page = client.post("/predict", files=files)
    assert page.text.count('class="breast-card') == 2 and "identity conflict" in page.text


def test_the_page_says_synthetic_and_out_of_distribution(bundle, cbis_dicoms, tmp_path, monkeypatch):
    import copy
    from types import SimpleNamespace

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    synthetic = copy.copy(bundle)
    synthetic.card = {"intended_use": "test only", "training_data": {"synthetic": True,
                                                                      "validated_on": "synthetic images only"}}
    synthetic.ood = SimpleNamespace(threshold=2.0)
    original = bundle.predict_arrays
    synthetic.predict_arrays = lambda x: {**original(x), "ood_score": np.full(len(x), 7.5),
                                          "ood_flag": np.ones(len(x), bool)}
    app = create_app(synthetic, audit_log=tmp_path / "state" / "audit.jsonl", salt=SALT)
    with TestClient(app) as client:
        index = client.get("/").text
        assert 'id="synthetic-warning"' in index and "synthetic images only" in index
        page = client.post("/predict", files=exam(cbis_dicoms, "P_00173")).text
        assert 'id="synthetic-warning"' in page and page.count('class="ood-warning"') == 2
        assert "out-of-distribution score 7.5 above threshold 2" in page
        body = post(client, exam(cbis_dicoms, "P_00173")).json()
        assert body["bundle"]["synthetic"] is True
        assert all(b["verdict"] == "degraded" and b["ood_flag"] for b in body["breasts"].values())
