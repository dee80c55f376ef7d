"""The node against a real Orthanc (started per test, loopback only): push and pull intake, the SR filed back into
each original study and equal to `tlese predict`'s, the PACS down when results are ready, duplicates, a CT study,
an unknown calling AE, a truncated image, late images (a second result referencing the first), no identifiers in
the node's logs, audit or status."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from exam_helpers import SECRETS
from node_helpers import cbis_case, make_study, node_config, running_node, truncate_pixels
from orthanc import wait_for

from tlese.node.commands import status_lines
from tlese.node.queue import read_status
from tlese.predict.pipeline import predict
from tlese.predict.sr import read_sr

pytestmark = pytest.mark.slow
TOL = 1e-6


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def expected_by_study(bundle, files: list[Path], out: Path) -> dict[str, dict]:
    """`tlese predict --sr` on the same files: {StudyInstanceUID: read_sr(...)}."""
    summary = predict(bundle, files, out, sr=True)
    return {study_uid(Path(path)): read_sr(path) for name, path in summary.files.items() if name.startswith("sr_")}


def fetch_srs(orthanc, uid: str, folder: Path) -> list[Path]:
    """The SR instances Orthanc holds in the study, saved as files."""
    paths = []
    for instance in orthanc.sr_instances(uid):
        path = folder / f"{instance}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orthanc.file(instance))
        paths.append(path)
    return paths


def assert_same_breasts(got: dict, expected: dict) -> None:
    assert set(got["breasts"]) == set(expected["breasts"])
    for side, breast in expected["breasts"].items():
        mine = got["breasts"][side]
        assert mine["verdict"] == breast["verdict"] and mine.get("predicted") == breast.get("predicted")
        assert set(mine.get("probabilities", {})) == set(breast.get("probabilities", {}))
        for name, p in breast.get("probabilities", {}).items():
            assert abs(mine["probabilities"][name] - p) <= TOL, (side, name)


def check_results(orthanc, files: list[Path], expected: dict, folder: Path) -> None:
    """Exactly one SR per study, in that very study (read back with highdicom), with predict's probabilities."""
    for path in files:
        uid = study_uid(path)
        (sr_path,) = fetch_srs(orthanc, uid, folder)
        sr = hd.sr.srread(sr_path)
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert sr.StudyInstanceUID == uid and sr.PatientID == source.PatientID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.Manufacturer == "tlese"
        assert_same_breasts(read_sr(sr_path), expected[uid])


def test_push_sr_back_in_each_study_equals_predict(tmp_path, orthanc, node_port, node_bundle, cbis_dicoms):
    study_ids = sorted({orthanc.upload(path) for path in cbis_dicoms})
    assert len(study_ids) == 8  # CBIS-DDSM: one study per image; the node pairs a breast's views like predict
    config = node_config(tmp_path / "node", node_port, orthanc)
    with running_node(config, node_bundle) as node:
        orthanc.post("/modalities/tlese/echo", json={})  # Orthanc reaches the node's SCP (C-ECHO)
        orthanc.send("tlese", study_ids)
        wait_for(lambda: node.queue.count_results("delivered") == 8, 300, "8 delivered results")
        wait_for(lambda: not list((config.work_dir / "images").rglob("*.dcm")), 30, "received images deleted")
    expected = expected_by_study(node_bundle, cbis_dicoms, tmp_path / "predict")
    assert len(expected) == 8
    check_results(orthanc, cbis_dicoms, expected, tmp_path / "got")
    rows = read_status(config.work_dir / "queue.sqlite")
    assert [(r["state"], r["delivery"], r["on_disk"]) for r in rows] == [("done", "delivered", 0)] * 8


def test_pull_with_the_dicomweb_watcher_and_stow_rs(tmp_path, orthanc, node_bundle, cbis_dicoms):
    for path in cbis_dicoms:
        orthanc.upload(path)
    # pull by QIDO-RS / WADO-RS, results back by STOW-RS: DICOMweb both ways
    config = node_config(tmp_path / "node", 0, orthanc, port=0, allowed_calling_aets=[],
                         watch={"url": orthanc.dicomweb, "interval_seconds": 1},
                         destination={"dicomweb": {"url": orthanc.dicomweb}})
    with running_node(config, node_bundle) as node:
        wait_for(lambda: node.queue.count_results("delivered") == 8, 300, "8 delivered results")
        node.step()  # one more poll after delivery: the SRs in the studies fetch nothing
        assert node.watcher.poll() == 0
    expected = expected_by_study(node_bundle, cbis_dicoms, tmp_path / "predict")
    check_results(orthanc, cbis_dicoms, expected, tmp_path / "got")
    audit = [json.loads(line) for line in (config.work_dir / "audit.jsonl").read_text().splitlines()]
    assert sum(1 for a in audit if a["event"] == "received" and a["source"] == "wado-rs") == 8


def test_pacs_down_when_the_result_is_ready(tmp_path, orthanc, node_port, node_bundle, cbis_dicoms):
    files = cbis_dicoms[:4]  # one patient
    study_ids = sorted({orthanc.upload(path) for path in files})
    config = node_config(tmp_path / "node", node_port, orthanc, quiet_seconds=2)
    with running_node(config, node_bundle) as node:
        orthanc.send("tlese", study_ids)
        orthanc.stop()  # down before the studies are even quiet
        wait_for(lambda: all((r["attempts"] or 0) >= 2 for r in node.queue.status()) and len(node.queue.status())
                 == 4, 300, "deliveries to fail twice while Orthanc is down")
        assert node.queue.count_results("delivered") == 0
        assert all(Path(r.sr_path).is_file() for r in node.queue.due_results(now=float("inf")))  # waiting on disk
        assert list((config.work_dir / "images").rglob("*.dcm"))  # images kept until delivered
        orthanc.start()
        wait_for(lambda: node.queue.count_results("delivered") == 4, 120, "delivery once Orthanc is back")
    expected = expected_by_study(node_bundle, files, tmp_path / "predict")
    check_results(orthanc, files, expected, tmp_path / "got")
    audit = [json.loads(line) for line in (config.work_dir / "audit.jsonl").read_text().splitlines()]
    failures = [a for a in audit if a["event"] == "delivery_failed"]
    assert len(failures) >= 8 and all("no association" in a["reason"] for a in failures)
    delays = [a["retry_in_seconds"] for a in failures]
    # backoff 0.5 s doubling, capped at retry.max_seconds (2 s); how many retries fit before Orthanc is back depends
    # on the machine's speed, so only the schedule is checked (every result failed at least twice: 0.5 then 1)
    assert min(delays) == 0.5 and 1.0 in delays and set(delays) <= {0.5, 1.0, 2.0}


def test_duplicates_ct_unknown_ae_truncated_late_images_and_no_identifiers(tmp_path, orthanc, node_port, node_bundle,
                                                                          cbis_dicoms, caplog):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    caplog.set_level(logging.INFO)
    p173 = [p for p in cbis_dicoms if cbis_case(p)[0] == "P_00173"]
    p820 = [p for p in cbis_dicoms if cbis_case(p)[0] == "P_00820"]
    secret = make_study(p173, tmp_path / "secret", **SECRETS)
    truncated = make_study(p820, tmp_path / "truncated")
    for path in truncated:
        if _side_view(path)[0] == "L":  # both left images: the left breast has nothing usable
            truncate_pixels(path)
    ct = make_study(p820, tmp_path / "ct", Modality="CT")
    raw = make_study(p820[:1], tmp_path / "raw", PresentationIntentType="FOR PROCESSING")
    late = make_study(p173, tmp_path / "late")
    late_last = next(p for p in late if _side_view(p) == ("R", "MLO"))
    studies = {"secret": secret, "truncated": truncated, "ct": ct, "raw": raw, "late": late}
    first = {name: sorted({orthanc.upload(p) for p in files if p != late_last}) for name, files in studies.items()}
    assert all(len(ids) == 1 for ids in first.values())
    config = node_config(tmp_path / "node", node_port, orthanc, retention_minutes=10)
    with running_node(config, node_bundle) as node:
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assoc = stranger.associate("127.0.0.1", node.port, ae_title="TLESE")
        assert assoc.is_rejected and not assoc.is_established
        orthanc.send("tlese", [ids[0] for ids in first.values()])
        wait_for(lambda: node.queue.count_results("delivered") == 3, 300, "3 delivered results")
        # the late image of a delivered study, and the secret study sent a second time
        orthanc.upload(late_last)
        orthanc.send("tlese", [first["late"][0], first["secret"][0]])
        wait_for(lambda: node.queue.count_results("delivered") == 4, 300, "the late study's second result")
        duplicates = wait_for(lambda: _events(config, "duplicate"), 30, "duplicate audit lines")
        node.step()
        assert node.queue.claim(now=float("inf"), quiet_seconds=0) == []  # nothing more to do
        rows = node.queue.status()
    # the same study twice: one SR; a CT study: ignored, audit line, nothing sent
    assert len(duplicates) == 4 + 3  # the secret study again, and the late study's first three images
    assert len(orthanc.sr_instances(study_uid(secret[0]))) == 1
    assert orthanc.sr_instances(study_uid(ct[0])) == []
    ignored = sorted(event["reason"] for event in _events(config, "ignored"))
    # the CT study once (4 images, one line), the FOR PROCESSING one; the SRs that came back with the studies sent
    # again
    assert ignored == ["FOR PROCESSING image (only FOR PRESENTATION images are read)", "modality CT is not MG",
                       "modality SR is not MG", "modality SR is not MG"]
    assert orthanc.sr_instances(study_uid(raw[0])) == []
    assert sorted(row["state"] for row in rows) == ["done", "done", "done", "ignored", "ignored"]
    # an unknown calling AE: rejected at association, with a log line and an audit line
    (rejected,) = _events(config, "association_rejected")
    assert rejected["calling_ae"] == "STRANGER" and "not allowed" in rejected["reason"]
    assert "rejected association from calling AE 'STRANGER'" in caplog.text
    # a truncated image: that breast refused in the SR, the other reported
    (path,) = fetch_srs(orthanc, study_uid(truncated[0]), tmp_path / "got_truncated")
    breasts = read_sr(path)["breasts"]
    assert breasts["L"]["verdict"] == "refused" and "probabilities" not in breasts["L"]
    assert breasts["R"]["verdict"] != "refused"  # ok, or degraded (e.g. the tiny bundle's out-of-distribution flag)
    assert len(breasts["R"]["probabilities"]) == len(node_bundle.class_names)
    # late images: a second result in the same series that references the first (never a silent overwrite)
    got = fetch_srs(orthanc, study_uid(late[0]), tmp_path / "got_late")
    by_number = {int(pydicom.dcmread(p).InstanceNumber): pydicom.dcmread(p) for p in got}
    assert sorted(by_number) == [1, 2]
    reference = by_number[2].PredecessorDocumentsSequence[0]
    assert reference.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        by_number[1].SOPInstanceUID
    assert by_number[1].SeriesInstanceUID == by_number[2].SeriesInstanceUID
    assert read_sr(got[0])["breasts"].keys() == {"L", "R"}
    expected = expected_by_study(node_bundle, secret, tmp_path / "predict")
    (secret_sr,) = fetch_srs(orthanc, study_uid(secret[0]), tmp_path / "got_secret")
    assert_same_breasts(read_sr(secret_sr), expected[study_uid(secret[0])])
    # no identifier in the audit log, the log or the status output (the SR itself carries them: it is the study's)
    status = "\n".join(status_lines(read_status(config.work_dir / "queue.sqlite")))
    texts = {"audit": (config.work_dir / "audit.jsonl").read_text(), "log": caplog.text, "status": status}
    for where, text in texts.items():
        for keyword, value in SECRETS.items():
            assert value not in text and value.split("^")[0] not in text, (where, keyword)
    assert "Zyxwv^Secretname" in str(pydicom.dcmread(secret_sr).PatientName)  # the test's secrets are real


def _side_view(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.ImageLaterality), str(ds.ViewPosition)


def _events(config, event: str) -> list[dict]:
    lines = (config.work_dir / "audit.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def test_orthanc_lua_autosend_from_the_docs(tmp_path, node_port, node_bundle, cbis_dicoms):
    """docs/tlese_autosend.lua in Orthanc: the images of an MG study stored into Orthanc reach the node, which files
    the SR back, with no one sending anything; the SR itself is not forwarded back to the node."""
    from orthanc import Orthanc

    lua = Path(__file__).resolve().parents[2] / "docs" / "tlese_autosend.lua"
    server = Orthanc(tmp_path / "orthanc", {"tlese": ("TLESE", node_port)}, LuaScripts=[str(lua)])
    server.start()
    try:
        files = make_study([p for p in cbis_dicoms if cbis_case(p)[0] == "P_00820"], tmp_path / "study")
        config = node_config(tmp_path / "node", node_port, server)
        with running_node(config, node_bundle) as node:
            for path in files:
                server.upload(path)
            wait_for(lambda: node.queue.count_results("delivered") == 1, 120, "the SR of the auto-sent study")
            assert len(server.sr_instances(study_uid(files[0]))) == 1
            node.step()
        audit = (config.work_dir / "audit.jsonl").read_text()
        assert audit.count('"received"') == 4 and '"ignored"' not in audit and '"duplicate"' not in audit
    finally:
        server.stop()
