"""``python -m whale_ml``: the framework-free commands (no Dagster needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from whale_ml.data.demo import PRESETS, generate_demo_data


def demo_data(args: argparse.Namespace) -> int:
    cfg = PRESETS[args.preset].model_copy(update={"seed": args.seed})

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"  {done}/{total} photos", flush=True)

    out = generate_demo_data(args.out, cfg, progress=progress)
    print(f"demo data set ({args.preset}, seed {args.seed}) written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m whale_ml", description="Whale photo-ID core commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write a synthetic data set in the Kaggle layout")
    p.add_argument("out", help="folder to create")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="size of the set (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
