"""`tlese models`: every registered model with its parameters and GFLOPs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list registered models with params and GFLOPs")
    parser.add_argument("--size", type=int, nargs="+", default=[224, 512], help="square input sizes (px)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--views", choices=("single", "dual"), default="single")
    parser.add_argument("--filter", default="*", help="shell-style pattern on model names, e.g. 'tlese_*'")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from tlese.models import list_models
    from tlese.models.cost import format_table, model_table

    names = list_models(args.filter)
    if not names:
        raise ValueError(f"no model matches {args.filter!r}; valid: {', '.join(list_models())}")
    rows = model_table(names, sizes=args.size, num_classes=args.num_classes, in_chans=args.in_chans, views=args.views)
    print(format_table(rows, args.format), end="")
    return 0
