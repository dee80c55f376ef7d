"""Orthanc's own web explorer, in headless Chromium (Debian's, driven by Playwright), shows the study with the SR
series the node filed back. With TLESE_NODE_SCREENSHOT=PATH the page is saved there (docs/orthanc_study.png).

Without /usr/bin/chromium the test skips on a developer machine and fails in CI (CI=true)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from exam_helpers import keep_page_local
from node_helpers import cbis_case, make_study, node_config, running_node
from orthanc import wait_for

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


def test_orthanc_explorer_shows_the_sr_series(tmp_path, orthanc, node_port, node_bundle, cbis_dicoms):
    if not CHROMIUM.is_file():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    files = make_study([p for p in cbis_dicoms if cbis_case(p)[0] == "P_00173"], tmp_path / "study",
                       PatientName="DEMO^Screenshot", PatientID="DEMO-0001", StudyDescription="MAMMO SCREENING")
    (study,) = {orthanc.upload(path) for path in files}
    with running_node(node_config(tmp_path / "node", node_port, orthanc), node_bundle) as node:
        orthanc.send("tlese", [study])
        wait_for(lambda: node.queue.count_results("delivered") == 1, 300, "the SR delivered")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            elsewhere = keep_page_local(page)
            page.goto(f"{orthanc.url}/app/explorer.html#study?uuid={study}")
            page.wait_for_selector("#list-series li:has-text('SR')", timeout=30_000)
            text = page.inner_text("#list-series")
            page.screenshot(path=str(tmp_path / "orthanc_study.png"), full_page=True)
            if os.environ.get("TLESE_NODE_SCREENSHOT"):
                from PIL import Image

                image = Image.open(tmp_path / "orthanc_study.png")
                image.convert("RGB").quantize(256).save(os.environ["TLESE_NODE_SCREENSHOT"], optimize=True)
        finally:
            browser.close()
    # the 4 images' series and the node's SR series (its description: the bundle's intended use)
    assert text.count("Modality: MG") == 4 and text.count("Modality: SR") == 1 and "9901" in text
    assert elsewhere == []
