"""The page in a real browser: Debian's Chromium driven by Playwright against the real `tlese serve` subprocess.

`tlese serve` runs on 127.0.0.1 (a free port) with the bundle of the tiny end-to-end run (`tiny_bundle`; or
TLESE_SERVE_BUNDLE=PATH) and its TMPDIR pointed at a folder of the test's own. The browser uploads the 4 real
CBIS-DDSM DICOMs of one patient and must show two breast cards with four probabilities each and heatmap images that
loaded; then a text file named x.dcm, whose error the page must show; then the exam again, which must work. Every
request the browser makes must stay on 127.0.0.1 (no CDN). Screenshots go to the test's temporary folder; with
TLESE_SERVE_SCREENSHOT=PATH the result page is also saved there (256 colours: the docs' picture).

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it): Playwright's own browser download
does not work here, so it is launched with executable_path. Without /usr/bin/chromium the test skips on a developer
machine and fails in CI (CI=true).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from exam_helpers import cbis_truth, keep_page_local

CHROMIUM = Path("/usr/bin/chromium")
BENCH_SERVE = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
pytestmark = pytest.mark.slow


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must have it: .ci/run installs it)")
        pytest.skip(reason)


@pytest.fixture
def playwright_api():
    _need(CHROMIUM.is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


@pytest.fixture
def server(request, tmp_path):
    """`tlese serve` on a free loopback port; yields (base URL, its TMPDIR, its state folder). The bundle: the tiny
    run's, or TLESE_SERVE_BUNDLE (e.g. the demo's, for the docs' screenshot)."""

    bundle = os.environ.get("TLESE_SERVE_BUNDLE") or request.getfixturevalue("tiny_bundle")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    temporary, state = tmp_path / "server_tmp", tmp_path / "state"
    temporary.mkdir()
    state.mkdir()
    process = _bench_serve().start_server(Path(bundle), state, port, [], wait_s=180,
                                          env={**os.environ, "TMPDIR": str(temporary)},
                                          log_path=tmp_path / "server.log")
    try:
        yield f"http://127.0.0.1:{port}", temporary, state
    finally:
        _bench_serve().stop_server(process)


def _bench_serve():
    """The load benchmark's module: it owns starting and stopping a real `tlese serve`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", BENCH_SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_in_chromium(playwright_api, server, cbis_dicoms, tmp_path):
    import pydicom

    base, temporary, state = server
    exam = tmp_path / "exam"
    exam.mkdir()
    files = []
    for index, path in enumerate(p for p in cbis_dicoms if cbis_truth(p)[0] == "P_00173"):
        files.append(shutil.copy(path, exam / f"image_{index}.dcm"))
    assert len(files) == 4
    identifiers = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.get(k)) for k in ("PatientID", "PatientName", "AccessionNumber", "PatientBirthDate",
                                                   "StudyInstanceUID") if str(ds.get(k) or "").strip()}
    bad = tmp_path / "x.dcm"
    bad.write_text("patient list, not an image\n")

    with playwright_api() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            elsewhere = keep_page_local(page)
            page.goto(f"{base}/")
            assert "research use only" in page.inner_text("#intended-use")
            assert len(page.inner_text("#card-sha256").strip()) == 64

            # drag and drop: a PNG dropped on the zone asks for its side and view
            page.evaluate("""() => {
                const data = new DataTransfer();
                data.items.add(new File([new Uint8Array([137, 80, 78, 71])], "cc.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data,
                                                                                     bubbles: true}));
            }""")
            assert page.locator("#file-list li").count() == 1 and page.locator("#file-list li select").count() == 2

            def upload(paths):
                page.set_input_files("#files", [str(p) for p in paths])
                with page.expect_navigation(timeout=240_000):
                    page.click("#submit")

            def check_result(shot: str):
                cards = page.locator(".breast-card")
                assert cards.count() == 2
                assert sorted(cards.nth(i).get_attribute("data-side") for i in range(2)) == ["L", "R"]
                for i in range(2):
                    assert cards.nth(i).locator("tr.prob").count() == 4
                    assert cards.nth(i).locator("meter").count() == 4
                page.wait_for_function("() => Array.from(document.images).every(image => image.complete)")
                widths = page.evaluate("() => Array.from(document.querySelectorAll('img.heatmap'))"
                                       ".map(image => image.naturalWidth)")
                assert len(widths) == 4 and all(width > 0 for width in widths)
                page.screenshot(path=str(tmp_path / shot), full_page=True)

            upload(files)
            check_result("result.png")
            layer = page.locator("img.heatmap").first
            assert layer.is_visible()
            page.uncheck("#heat-toggle")
            assert not layer.is_visible()
            page.check("#heat-toggle")
            html = page.content()
            for value in identifiers:
                assert value not in html and value not in page.url, "an identifier on the page"
            assert "P_00173" not in html
            if os.environ.get("TLESE_SERVE_SCREENSHOT"):
                from PIL import Image

                with Image.open(tmp_path / "result.png") as image:
                    image.convert("RGB").quantize(256).save(os.environ["TLESE_SERVE_SCREENSHOT"], optimize=True)

            upload([bad])
            detail = page.inner_text("#error-detail")
            assert "x.dcm" in detail and "not a DICOM" in detail
            assert page.locator(".breast-card").count() == 0
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

            upload(files)  # the service is still up and the next upload works
            check_result("result_again.png")

            page.goto(f"{base}/docs")
            page.wait_for_selector(".swagger-ui .info", timeout=60_000)  # Swagger UI, from local files
            assert "tlese serve" in page.inner_text(".swagger-ui .info")
            assert elsewhere == [], f"the browser asked for other hosts: {elsewhere}"
        finally:
            browser.close()
    audit = (state / "audit.jsonl").read_text().splitlines()
    assert len(audit) == 3
    assert not any(value in "\n".join(audit) for value in identifiers)
    time.sleep(0.5)
    # torch may make its own cache folder there (torchinductor_<user>) when some models are imported
    assert not [p for p in temporary.iterdir() if p.name.startswith("tlese")], "request folders left behind"
