"""`tlese` data commands: one small function per command, registered by `register(subparsers)`."""

from __future__ import annotations

import argparse

from tlese.vocab import MODALITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data commands to the `tlese` parser."""
    _register_prepare(subparsers)
    _register_synth(subparsers)
    _register_folds(subparsers)


# ---------------------------------------------------------------------------------------------------------------
# tlese prepare


def _register_prepare(subparsers: argparse._SubParsersAction) -> None:
    from tlese.data.preprocess import DEFAULT_IMAGE_SIZE, PREPROCESS_OVERRIDES, PreprocessParams

    defaults = PreprocessParams.build(DEFAULT_IMAGE_SIZE).to_dict()
    keys = "; ".join(f"{key} (default {defaults[key]}): {meaning}" for key, meaning in PREPROCESS_OVERRIDES.items())
    parser = subparsers.add_parser(
        "prepare",
        help="preprocess a dataset's images into a 16-bit PNG cache (parallel, reused on later runs)",
        description="Read every image of a dataset, crop/orient/resize/normalise it and cache it; "
        "prints how many were prepared, reused and skipped (with reasons).",
    )
    parser.add_argument("--dataset", required=True, help="dataset adapter name (see tlese.data.datasets)")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--out", required=True, help="cache folder (a sub-folder per parameter set is created)")
    parser.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help=f"output side in pixels (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--modality", choices=MODALITIES, default=None,
                        help="preprocessing path (default: the dataset's own `modality` column, else mammo)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                        help=f"override one preprocessing parameter (repeatable). Keys: {keys}")
    parser.add_argument("--max-skipped-fraction", type=float, default=None, metavar="F",
                        help="fail when more than this fraction of the images is skipped "
                        "(default 0.1; 1 accepts any number of skips)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Load the dataset table, prepare it into the cache, print the summary with every skip (paths relative to
    the root). Exit code 0; too many skips or one image under two patients fail (PrepareError /
    DataIntegrityError, exit code 2)."""
    from tlese.data.cache import DEFAULT_MAX_SKIPPED_FRACTION, PrepareError, prepare_table
    from tlese.data.datasets import format_skipped, get_adapter
    from tlese.data.preprocess import PreprocessParams

    overrides = dict(args.param)
    PreprocessParams.build(args.size, "mammo", overrides)  # a bad --param fails before the dataset is read
    table = get_adapter(args.dataset)(args.root)
    if table.attrs.get("skipped"):
        print(f"dataset {args.dataset}: {format_skipped(table.attrs['skipped'])}")
    modality = args.modality
    if modality is None:
        found = set(table["modality"].dropna().astype(str)) if "modality" in table.columns else set()
        modality = found.pop() if len(found) == 1 and found <= set(MODALITIES) else "mammo"
    params = PreprocessParams.build(args.size, modality, overrides)
    fraction = DEFAULT_MAX_SKIPPED_FRACTION if args.max_skipped_fraction is None else args.max_skipped_fraction
    try:
        _, summary = prepare_table(table, params, args.out, workers=args.workers, progress=not args.no_progress,
                                   root=args.root, max_skipped_fraction=fraction)
    except PrepareError as error:
        print(error.summary)  # every skip with its reason, before the error line
        raise
    print(summary)
    return 0


def _key_value(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE); the value is checked by PreprocessParams.build."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


# ---------------------------------------------------------------------------------------------------------------
# tlese synth


def _register_synth(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write the embedded synthetic data (CMMD-layout mammograms + chest X-ray class folders)",
        description="Generate a small synthetic mammography set in the CMMD TCIA layout (DICOM + clinical xlsx) "
        "and a chest X-ray set in the DarkCovidNet layout, so the pipeline runs offline.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--patients", type=int, default=40, help="mammography patients (default 40)")
    parser.add_argument("--size", type=int, default=256, help="image height in pixels (default 256)")
    parser.add_argument("--cxr-per-class", type=int, default=30, help="chest X-rays per class (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing cmmd/ and cxr/ sub-folders")
    parser.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the synthetic sets and print where they are and how to load them."""
    from tlese.data.synth import synthesize

    paths = synthesize(args.out, n_patients=args.patients, image_size=args.size, cxr_per_class=args.cxr_per_class,
                       seed=args.seed, overwrite=args.overwrite)
    print(f"mammograms (adapter cmmd, task synth_subtype4): {paths['mammo_root']}")
    print(f"chest X-rays (adapter darkcovidnet, task synth_cxr3): {paths['cxr_root']}")
    print(f"parameters: {paths['info']}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# tlese folds


def _register_folds(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "folds",
        help="make patient-level stratified folds for a dataset and task, save them as CSV",
        description="Load a dataset, encode it for a task (reporting dropped rows), assign patients to k "
        "stratified folds and write the fold file (seed and data hash in its first line); prints a per-fold summary.",
    )
    parser.add_argument("--dataset", required=True, help="dataset adapter name (see tlese.data.datasets)")
    parser.add_argument("--root", required=True, help="dataset root folder (or manifest CSV)")
    parser.add_argument("--task", required=True,
                        help="a registered task name (see tlese.data.tasks), a YAML file holding a task mapping, or "
                        "the mapping inline, e.g. '{name: her2, label_column: subtype, classes: [other, HER2], "
                        "grouping: {HER2-enriched: HER2, Luminal A: other}}'")
    parser.add_argument("--out", required=True, help="fold file to write, e.g. folds/cmmd_seed0.csv")
    parser.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=cmd_folds)


def cmd_folds(args: argparse.Namespace) -> int:
    """Encode the dataset for the task, make and save the folds, print the encode report and the fold summary."""
    from tlese.data.datasets import get_adapter
    from tlese.data.splits import fold_summary, make_folds, save_folds
    from tlese.data.tasks import resolve_task

    task = resolve_task(args.task)
    table, report = task.encode(get_adapter(args.dataset)(args.root))
    print(report.summary())
    folds = make_folds(table, k=args.k, seed=args.seed)
    path = save_folds(folds, args.out, seed=args.seed, source=f"{args.dataset}:{args.root} task={task.name}")
    print(fold_summary(table, folds, classes=task.classes).to_string(index=False))
    print(f"folds written to {path}")
    return 0
