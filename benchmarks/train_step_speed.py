#!/usr/bin/env python
"""Speed of the ArcFace training step on CPU: channels_last, bf16 autocast, torch.compile.

    python benchmarks/train_step_speed.py                     # 64/96/128 px, compile at 64 px: ~30-60 min on 2 busy cores
    python benchmarks/train_step_speed.py --compile-sizes     # no torch.compile (minutes)
    python benchmarks/train_step_speed.py --threads 1         # CPU time per image on one thread: robust on a shared machine
    python benchmarks/train_step_speed.py --only loss         # fp32 against bf16 loss curves only
    python benchmarks/train_step_speed.py --quick             # tiny data, timm's test_resnet, few steps: a smoke test

What it times is the pipeline's own training step: for every variant, ``build_training``
builds the demo recipe (``configs/demo.yaml``: resnet18 from scratch, batch 16, embedding
512, ArcFace, AdamW, the schedule) with that variant's ``precision`` and ``memory_format``
(``TrainConfig``), and ``train_one_epoch`` runs it over an in-memory "loader" of real
augmented batches. The batches are drawn once from the training loader of the fp32 build
(the pipeline's ``ImageDataset`` + ``train_transform`` over square JPEG crops that the
pipeline's ``write_crops`` cut from the generated demo set, full-frame boxes) and reused
by every variant, so every variant sees the same uint8 pixels; loading is not timed
(``train_input.py`` measures it). ``torch.compile`` (inductor, default mode) is not a
setting of the pipeline: its variants wrap the built step module in ``torch.compile``,
which compiles the forward and, through AOTAutograd, the backward; the optimiser step
stays eager.

Variants: fp32 (the baseline: what ``precision: auto`` runs on CPU), channels_last,
bf16 autocast, channels_last + bf16, and at ``--compile-sizes`` also compile and
compile + channels_last + bf16. Every variant of a size starts from the same seed (the
same initial weights).

Timing: ``--warmup`` untimed steps (for a compiled variant the first one compiles: its
wall time is reported as the compile time, next to a warm-cache recompile measured at
the end, after ``torch._dynamo.reset()``, when inductor's on-disk caches hit), then
``--rounds`` rounds of ``--steps`` timed steps of every variant in turn (ABCD ABCD ...),
so that background load hits them alike. Per variant: images/s of the best round and the
median round (wall clock), CPU seconds of this process per image (``time.process_time``;
inductor's compile workers are other processes and not counted), and the ratio to fp32
of both. With ``--threads 1`` the CPU time per image is close to the work itself even on
a loaded machine; with 2 threads it also counts OpenMP threads spinning at barriers while
the other is descheduled. Peak RSS: VmHWM of this process during the variant's timed
steps (reset through ``/proc/self/clear_refs`` before each), and its increase over the
resident set just before (all variants' models live in the one process, so the absolute
peak counts them all). ``other_cores``: CPU used by other processes during the round,
from ``/proc/stat`` (``common.cpu_meter``).

Compile amortisation: the steps a fold must train before the compiled step has paid for
its compile, ``compile_s / (s_per_step_eager - s_per_step_compiled)``, against the
demo's ~480 steps per fold (60 epochs of 8 batches of 16 from ~135 photos).

Loss check (``--loss-steps``, default 100): fp32, bf16 and channels_last + bf16 builds
from the same seed train on the same ``--loss-steps`` batches (drawn in order from the
training loader: real augmented epochs), one ``train_one_epoch`` per batch, and every
step's loss is recorded. Reported: the mean loss of the first and last 10 steps and the
largest per-step difference from fp32.

Fold check (``--fold-epochs N``, default 0: off; a quality check, not a timing, so it may
run under ``nice``): ``train_fold`` on fold 0 of 2 of the demo set (full-frame crops), N
epochs, per variant in ``--fold-variants``, validation every ``--fold-val-every`` epochs;
reports best validation MAP@5 and its epoch, and the training images/s.

Writes everything to ``--out`` (default ``benchmarks/results/train_step_speed.json``,
``train_step_speed_quick.json`` with ``--quick``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # common, and train_input's data preparation

from common import (  # noqa: E402
    RESULTS,
    cpu_meter,
    environment,
    recipe_train_config,
    reset_peak_rss,
    save_results,
    status_kib,
    write_json,
)
from train_input import prepare_crops  # noqa: E402

from whale_ml.stage_configs import TrainConfig  # noqa: E402
from whale_ml.threads import pipeline_threads, using_threads  # noqa: E402
from whale_ml.training.trainer import TrainParts, build_training, seed_everything, train_one_epoch  # noqa: E402

CPU = torch.device("cpu")
DEMO_STEPS_PER_FOLD = 60 * 8  # 60 epochs x 8 batches of 16 (~135 training photos a fold)

# name -> (TrainConfig overrides, wrap the step in torch.compile)
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {
    "fp32": ({"precision": "fp32", "memory_format": "contiguous"}, False),
    "channels_last": ({"precision": "fp32", "memory_format": "channels_last"}, False),
    "bf16": ({"precision": "bf16", "memory_format": "contiguous"}, False),
    "channels_last+bf16": ({"precision": "bf16", "memory_format": "channels_last"}, False),
    "compile": ({"precision": "fp32", "memory_format": "contiguous"}, True),
    "compile+channels_last+bf16": ({"precision": "bf16", "memory_format": "channels_last"}, True),
}
EAGER = [v for v, (_, c) in VARIANTS.items() if not c]
LOSS_VARIANTS = ["fp32", "bf16", "channels_last+bf16"]


class InMemoryBatches:
    """Batches already in memory, shaped like the DataLoader ``train_one_epoch`` reads (``len``, iteration, ``sampler``)."""

    sampler = None

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):  # noqa: ANN204
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def run_steps(parts: TrainParts, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, epoch: int = 1) -> dict[str, float]:
    """``steps`` training steps as ``train_fold`` takes them; wall, CPU time, memory."""
    reset_peak_rss()
    rss0 = status_kib("VmRSS") * 1024
    with cpu_meter() as cpu:
        c0, w0 = time.process_time(), time.perf_counter()
        stats = train_one_epoch(epoch, parts.step, InMemoryBatches(batches, steps), parts.optimizer, parts.scheduler, parts.scaler, CPU)  # type: ignore[arg-type]
        wall, cpu_s = time.perf_counter() - w0, time.process_time() - c0
    peak = status_kib("VmHWM") * 1024
    return {
        "images_per_s": stats.images / wall,
        "cpu_ms_per_image": 1e3 * cpu_s / stats.images,
        "wall_s": wall,
        "loss": stats.train_loss,
        "peak_rss_mb": peak / 2**20,
        "peak_rss_increase_mb": max(0, peak - rss0) / 2**20,
        **cpu,
    }


def build(cfg: TrainConfig, compile_step: bool, train: pd.DataFrame, num_classes: int) -> TrainParts:
    seed_everything(cfg.seed)
    parts = build_training(cfg, train, num_classes, CPU, log=lambda _m: None)
    if compile_step:
        parts.step = torch.compile(parts.step)  # type: ignore[assignment]
    return parts


def draw_batches(parts: TrainParts, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` augmented batches from the training loader, epoch after epoch."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < n:
        for images, targets, *_ in parts.loader:
            out.append((images, targets))
            if len(out) == n:
                break
    return out


def speed_at(size: int, args: argparse.Namespace, work: Path, with_compile: bool) -> dict[str, Any]:
    paths, labels, num_classes = prepare_crops(work, args.preset, size)
    train = pd.DataFrame({"path": paths, "label": labels})
    names = [v for v in VARIANTS if with_compile or not VARIANTS[v][1]]
    base = recipe_train_config(args.recipe, image_size=size, backbone=args.backbone, seed=args.seed)
    cfgs = {v: base.model_copy(update=VARIANTS[v][0]) for v in names}
    parts = {v: build(cfgs[v], VARIANTS[v][1], train, num_classes) for v in names}
    batches = draw_batches(parts["fp32"], args.batches)
    out: dict[str, Any] = {"image_size": size, "crops": len(paths), "num_classes": num_classes, "variants": {}}
    for v in names:  # warm-up; a compiled variant compiles on its first step
        print(f"  {size} px {v}: warm-up ...", file=sys.stderr, flush=True)
        first = run_steps(parts[v], batches, 1)
        rest = run_steps(parts[v], batches, max(1, args.warmup - 1))
        out["variants"][v] = {"first_step_s": first["wall_s"], "warm_step_s": rest["wall_s"] / max(1, args.warmup - 1), "rounds": []}
    for r in range(args.rounds):
        for v in names:
            m = run_steps(parts[v], batches, args.steps, epoch=2 + r)
            out["variants"][v]["rounds"].append(m)
            print(f"  {size} px round {r + 1}/{args.rounds} {v}: {m['images_per_s']:.1f} images/s, {m['cpu_ms_per_image']:.1f} CPU ms/image", file=sys.stderr, flush=True)
    for v in names:
        rec = out["variants"][v]
        rounds = rec["rounds"]
        rec["best_images_per_s"] = max(m["images_per_s"] for m in rounds)
        rec["median_images_per_s"] = statistics.median(m["images_per_s"] for m in rounds)
        rec["best_cpu_ms_per_image"] = min(m["cpu_ms_per_image"] for m in rounds)
        rec["median_cpu_ms_per_image"] = statistics.median(m["cpu_ms_per_image"] for m in rounds)
        rec["peak_rss_mb"] = max(m["peak_rss_mb"] for m in rounds)
        rec["peak_rss_increase_mb"] = max(m["peak_rss_increase_mb"] for m in rounds)
        rec["max_other_cores"] = max((m.get("other_cores", 0.0) for m in rounds), default=0.0)
    fp32 = out["variants"]["fp32"]
    for v in names:
        rec = out["variants"][v]
        rec["ratio_best"] = rec["best_images_per_s"] / fp32["best_images_per_s"]
        rec["ratio_median"] = rec["median_images_per_s"] / fp32["median_images_per_s"]
        rec["ratio_cpu"] = fp32["median_cpu_ms_per_image"] / rec["median_cpu_ms_per_image"]
        # Per round, against the fp32 run of the same round (the fairest pairing on a shared machine).
        rec["ratio_by_round"] = [m["images_per_s"] / f["images_per_s"] for m, f in zip(rec["rounds"], fp32["rounds"], strict=True)]
    for v in [n for n in names if VARIANTS[n][1]]:
        rec = out["variants"][v]
        eager = out["variants"][v.replace("compile+", "") if v != "compile" else "fp32"]
        step_s = args.batch_size / rec["median_images_per_s"]
        eager_step_s = args.batch_size / eager["median_images_per_s"]
        rec["compile_s"] = rec["first_step_s"] - step_s
        rec["eager_counterpart"] = "fp32" if v == "compile" else v.replace("compile+", "")
        gain = eager_step_s - step_s
        rec["break_even_steps"] = rec["compile_s"] / gain if gain > 0 else None
        rec["demo_fold_net_s"] = DEMO_STEPS_PER_FOLD * gain - rec["compile_s"]  # > 0: the fold is faster compiled
    if with_compile:  # the same compiles again with inductor's on-disk caches warm (a second fold, a second run)
        torch._dynamo.reset()
        for v in [n for n in names if VARIANTS[n][1]]:
            print(f"  {size} px {v}: recompile with warm caches ...", file=sys.stderr, flush=True)
            again = build(cfgs[v], True, train, num_classes)
            first = run_steps(again, batches, 1)
            rec = out["variants"][v]
            rec["warm_cache_compile_s"] = first["wall_s"] - args.batch_size / rec["median_images_per_s"]
            del again
    return out


def loss_curves(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.sizes[0]
    paths, labels, num_classes = prepare_crops(work, args.preset, size)
    train = pd.DataFrame({"path": paths, "label": labels})
    base = recipe_train_config(args.recipe, image_size=size, backbone=args.backbone, seed=args.seed)
    batches = draw_batches(build(base.model_copy(update=VARIANTS["fp32"][0]), False, train, num_classes), args.loss_steps)
    curves: dict[str, list[float]] = {}
    for v in LOSS_VARIANTS:
        print(f"  loss curve {v} ({args.loss_steps} steps) ...", file=sys.stderr, flush=True)
        parts = build(base.model_copy(update=VARIANTS[v][0]), False, train, num_classes)
        curves[v] = [run_steps(parts, [b], 1, epoch=i + 1)["loss"] for i, b in enumerate(batches)]
    k = min(10, args.loss_steps)
    summary = {
        v: {
            "first_mean": statistics.fmean(c[:k]),
            "last_mean": statistics.fmean(c[-k:]),
            "final": c[-1],
            "max_abs_diff_vs_fp32": max(abs(a - b) for a, b in zip(c, curves["fp32"], strict=True)),
        }
        for v, c in curves.items()
    }
    return {"image_size": size, "steps": args.loss_steps, "summary": summary, "curves": curves}


def fold_check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from validation_cost import full_frame_crops

    from whale_ml.data.folds import fold_split, make_folds
    from whale_ml.data.metadata import read_train_metadata
    from whale_ml.training.trainer import train_fold

    size = args.sizes[0]
    prepare_crops(work, args.preset, size)  # generates the demo set into work/demo_<preset> when it is not there
    data = work / f"demo_{args.preset}"
    train = read_train_metadata(data)
    train["path"] = full_frame_crops(train["path"].tolist(), work / f"fold_crops_{size}", size)
    tr, val = fold_split(make_folds(train, 2, 0.16, 0), 0)
    num_classes = int(train["label"].max()) + 1
    out: dict[str, Any] = {"image_size": size, "epochs": args.fold_epochs, "train_photos": len(tr), "val_photos": len(val), "variants": {}}
    for v in args.fold_variants:
        cfg = recipe_train_config(
            args.recipe, image_size=size, backbone=args.backbone, seed=args.seed, epochs=args.fold_epochs, val_every=args.fold_val_every, **VARIANTS[v][0]
        )
        print(f"  fold check {v} ({args.fold_epochs} epochs) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        result = train_fold(cfg, tr, val, num_classes, work / f"fold_{v}", log=lambda _m: None)
        out["variants"][v] = {
            "best_map5": result.best_map5,
            "best_epoch": result.best_epoch,
            "val_map5_by_epoch": {int(h["epoch"]): h["val_map5"] for h in result.history if "val_map5" in h and h["val_map5"] == h["val_map5"]},
            "final_train_loss": result.history[-1]["train_loss"],
            "train_images_per_s": result.images_per_second,
            "wall_s": time.perf_counter() - t,
        }
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = []
    for rec in res.get("speed", []):
        lines += [
            f"\n{rec['image_size']} px ({rec['crops']} crops, {rec['num_classes']} classes):\n",
            "| variant | images/s best | median | ratio best / median (vs fp32) | CPU ms / image | ratio (CPU) | per-round ratios | peak RSS MB (+ during) | compile s (warm cache) |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for v, m in rec["variants"].items():
            comp = f"{m['compile_s']:.0f} ({m.get('warm_cache_compile_s', float('nan')):.0f})" if "compile_s" in m else ""
            lines.append(
                f"| {v} | {m['best_images_per_s']:.1f} | {m['median_images_per_s']:.1f} | {m['ratio_best']:.2f} / {m['ratio_median']:.2f} "
                f"| {m['median_cpu_ms_per_image']:.1f} | {m['ratio_cpu']:.2f} | {', '.join(f'{r:.2f}' for r in m['ratio_by_round'])} "
                f"| {m['peak_rss_mb']:.0f} (+{m['peak_rss_increase_mb']:.0f}) | {comp} |"
            )
        for v, m in rec["variants"].items():
            if "compile_s" in m:
                be = "never (not faster)" if m["break_even_steps"] is None else f"{m['break_even_steps']:.0f} steps"
                lines.append(
                    f"\n{v}: compile {m['compile_s']:.0f} s against {m['eager_counterpart']}; break-even {be}; "
                    f"a demo fold ({DEMO_STEPS_PER_FOLD} steps) {'saves' if m['demo_fold_net_s'] > 0 else 'loses'} {abs(m['demo_fold_net_s']):.0f} s."
                )
    if "loss" in res:
        loss = res["loss"]
        lines += [
            f"\nLoss over {loss['steps']} steps at {loss['image_size']} px, same seed and batches:\n",
            "| variant | mean loss, first 10 | mean loss, last 10 | final | max per-step |diff| vs fp32 |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {v} | {s['first_mean']:.3f} | {s['last_mean']:.3f} | {s['final']:.3f} | {s['max_abs_diff_vs_fp32']:.3f} |"
                for v, s in loss["summary"].items()
            ),
        ]
    if "fold" in res:
        fold = res["fold"]
        lines += [
            f"\nFold 0 of 2, {fold['epochs']} epochs at {fold['image_size']} px ({fold['train_photos']} training, {fold['val_photos']} validation photos):\n",
            "| variant | best val MAP@5 | best epoch | final train loss | train images/s |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {v} | {m['best_map5']:.3f} | {m['best_epoch']} | {m['final_train_loss']:.3f} | {m['train_images_per_s']:.1f} |"
                for v, m in fold["variants"].items()
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--backbone", default=None, help="timm model (default: the recipe's; test_resnet with --quick)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 64 96 128; the first is the loss and fold checks')")
    p.add_argument("--compile-sizes", type=int, nargs="*", default=None, help="sizes that also time torch.compile (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 12)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--batches", type=int, default=8, help="distinct augmented batches the timed steps cycle through")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the fp32/bf16 loss comparison (default 100; 0: skip)")
    p.add_argument("--fold-epochs", type=int, default=0, help="epochs of the fold check (default 0: skip)")
    p.add_argument("--fold-val-every", type=int, default=5)
    p.add_argument("--fold-variants", nargs="+", default=["fp32", "channels_last+bf16"], choices=EAGER)
    p.add_argument("--only", choices=["speed", "loss", "fold"], nargs="+", default=None, help="parts to run (default: speed and loss)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the pipeline's, $WHALE_THREADS or every core)")
    p.add_argument("--preset", choices=["demo", "tiny"], default=None)
    p.add_argument("--work", type=Path, default=None, help="keep and reuse the data set and crops here (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, test_resnet, 32 px, 2 steps, 1 round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.backbone = args.backbone or ("test_resnet" if q else recipe_train_config(args.recipe).backbone)
    args.sizes = args.sizes or ([32, 48] if q else [64, 96, 128])
    args.compile_sizes = args.compile_sizes if args.compile_sizes is not None else ([] if q else [64])
    args.steps = args.steps or (2 if q else 12)
    args.warmup = args.warmup or (2 if q else 3)
    args.rounds = args.rounds or (1 if q else 3)
    args.loss_steps = args.loss_steps if args.loss_steps is not None else (5 if q else 100)
    args.preset = args.preset or ("tiny" if q else "demo")
    args.batch_size = recipe_train_config(args.recipe).batch_size
    parts = args.only or ["speed", "loss", *(["fold"] if args.fold_epochs else [])]
    out = args.out or RESULTS / ("train_step_speed_quick.json" if q else "train_step_speed.json")

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="whale-step-speed-")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor_cache"))  # a cold first compile, then a warm one
    res: dict[str, Any] = {"argv": sys.argv[1:], "recipe": str(args.recipe), "backbone": args.backbone}
    t0 = time.perf_counter()
    try:
        with using_threads(args.threads):
            res["environment"] = environment("torch", "torchvision", "timm", "pillow", "pytorch_metric_learning")
            res["environment"]["pipeline_threads"] = pipeline_threads(args.threads)
            if "speed" in parts:
                res["speed"] = []
                for size in args.sizes:
                    res["speed"].append(speed_at(size, args, work, size in args.compile_sizes))
                    write_json(out, res)  # what is measured so far survives a stop
            if "loss" in parts and args.loss_steps:
                res["loss"] = loss_curves(args, work)
            if "fold" in parts and args.fold_epochs:
                res["fold"] = fold_check(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    save_results(res, out, markdown, t0)
    print(res["markdown"])
    print(f"\nResults: {out} ({res['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
