"""``python -m whale_ml``: the framework-free commands (no Dagster needed)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from whale_ml.data.demo import PRESETS, generate_demo_data
from whale_ml.data.kaggle_shape import KaggleShapeConfig, generate_kaggle_shape


def _kaggle_progress(started: float) -> Callable[[int, int], None]:
    """Photos done, rate and ETA, about every 2% of the set (photos at survey size take a while)."""

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 50) == 0:
            rate = done / max(time.monotonic() - started, 1e-9)
            print(f"  {done}/{total} photos, {rate:.1f}/s, ETA {(total - done) / rate:.0f} s", flush=True)

    return progress


def kaggle_data(args: argparse.Namespace) -> int:
    widths = {} if args.photo_px is None else {"min_width": args.photo_px[0], "max_width": args.photo_px[1]}
    cfg = KaggleShapeConfig(scale=1.0 if args.scale is None else args.scale, seed=args.seed, **widths)
    out = generate_kaggle_shape(args.out, cfg, workers=args.workers, progress=_kaggle_progress(time.monotonic()))
    print(f"Kaggle-shaped data set (scale {cfg.scale}, seed {args.seed}) written to {out}")
    return 0


def demo_data(args: argparse.Namespace) -> int:
    if args.preset == "kaggle":
        return kaggle_data(args)
    if args.scale is not None or args.photo_px is not None or args.workers is not None:
        raise ValueError("--scale, --photo-px and --workers apply to --preset kaggle only")
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
    p.add_argument("--preset", choices=[*sorted(PRESETS), "kaggle"], default="demo", help="size of the set (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, help="kaggle: F, the share of the real competition's counts (default 1)")
    p.add_argument("--photo-px", type=int, nargs=2, metavar=("MIN", "MAX"), help="kaggle: photo widths (default 1500 4000)")
    p.add_argument("--workers", type=int, help="kaggle: processes drawing photos (default: all cores)")
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
