#!/usr/bin/env python
"""A fold's training speed after the detector has run in the same process, before and after the thread fix.

    python benchmarks/threads.py            # ~2-3 min on 2 cores
    python benchmarks/threads.py --quick    # fewer steps, a smoke test

Ultralytics sets torch to ``cpu_count - 1`` threads (at most 8) in every training and
prediction, and nothing set it back: every later torch step of the process ran on
fewer cores (docs/deployment.md, ``WHALE_THREADS``). Measured here, in one process, on
the demo recipe's training step (``TrainConfig()``: resnet18, 64 px, batch 16, the
ArcFace loss, AdamW; uint8 batches already in memory, so only the step is timed):

1. *fresh*: no detector yet; torch's own default thread count.
2. *before the fix*: after a prediction with ultralytics called as the project called
   it before (``YOLO(weights).predict``), the step run as ``train_fold`` ran it then,
   with whatever count ultralytics left.
3. *after the fix*: after ``whale_ml.detection.yolo.detect_boxes`` (which restores the
   settings it found) and inside ``whale_ml.threads.using_threads()``, as ``train_fold``
   now runs: ``$WHALE_THREADS`` or every core.

The detector is a YOLO trained for one epoch on the tiny demo set (``train_yolo``,
threads restored too). The three measurements are interleaved over ``--repeats``
rounds (background load hits them alike) and the best round of each is kept (the
median is printed too: on a shared machine a 2-thread step loses most when another
process takes a core). The headline is the ratio of the best rounds, (3)/(2). Writes ``benchmarks/results/threads.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, cpu_model, loadavg, timestamp, write_json  # noqa: E402

from whale_ml.offline import configure_environment  # noqa: E402  (before ultralytics: offline, settings in the temp home)


def _timed_steps(steps: int, warmup: int) -> tuple[float, int]:
    """Images/s of ``steps`` demo-recipe training steps (after ``warmup``), and the torch threads they ran with."""
    import numpy as np
    import torch

    from whale_ml.stage_configs import TrainConfig
    from whale_ml.models.embedding import create_embedding_model
    from whale_ml.training.trainer import create_loss, create_optimizer, seed_everything

    cfg = TrainConfig()
    seed_everything(0)
    n_classes = 64
    model = create_embedding_model(cfg).train()
    loss_fn = create_loss(cfg, n_classes, np.full(n_classes, 4))
    optimizer = create_optimizer(cfg, model, loss_fn)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, n_classes, (cfg.batch_size,), generator=gen)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = loss_fn(model(images).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
    return steps * cfg.batch_size / (time.perf_counter() - t0), torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="5 steps, 1 warm-up, 1 round")
    p.add_argument("--out", type=Path, default=RESULTS / "threads.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 5, 1, 1
    work = Path(tempfile.mkdtemp(prefix="whale-threads-bench-"))
    configure_environment(work / "home")

    import torch

    from whale_ml.data.demo import PRESETS, generate_demo_data
    from whale_ml.data.metadata import read_train_metadata
    from whale_ml.detection.yolo import detect_boxes, read_box_file, train_yolo, write_yolo_dataset
    from whale_ml.threads import available_cores, pipeline_threads, using_threads

    default_threads = torch.get_num_threads()
    data = generate_demo_data(work / "data", PRESETS["tiny"])
    ds = write_yolo_dataset(read_box_file(data / "fluke_boxes.csv"), data / "train_images", work / "ds", 0.25, 0)
    weights, _ = train_yolo(ds, work / "yolo", epochs=1, imgsz=64, batch=8, device="cpu", home=work / "home")
    photos = read_train_metadata(data)[["image", "path"]].head(8)

    def before_fix() -> tuple[float, int]:
        from PIL import Image
        from ultralytics import YOLO

        YOLO(str(weights)).predict([Image.open(p).convert("RGB") for p in photos["path"]], imgsz=64, device="cpu", verbose=False)
        return _timed_steps(args.steps, args.warmup)

    def after_fix() -> tuple[float, int]:
        detect_boxes(photos, weights, 0.25, 1.2, 64, device="cpu", home=work / "home")
        with using_threads():
            return _timed_steps(args.steps, args.warmup)

    rounds: dict[str, list[tuple[float, int]]] = {"fresh": [], "before_fix": [], "after_fix": []}
    for _ in range(args.repeats):
        torch.set_num_threads(default_threads)  # every round starts as a fresh process would
        rounds["fresh"].append(_timed_steps(args.steps, args.warmup))
        rounds["before_fix"].append(before_fix())
        torch.set_num_threads(default_threads)
        rounds["after_fix"].append(after_fix())
    best = {k: max(v) for k, v in rounds.items()}
    ratio = best["after_fix"][0] / best["before_fix"][0]
    result = {
        "when": timestamp(),
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "cores": available_cores()},
        "torch": torch.__version__,
        "step": "TrainConfig() demo recipe: resnet18, 64 px, batch 16, ArcFace, AdamW, fp32 on CPU",
        "steps": args.steps,
        "repeats": args.repeats,
        "pipeline_threads": pipeline_threads(),
        "images_per_second": {k: [round(r, 2) for r, _ in v] for k, v in rounds.items()},
        "threads": {k: v[0][1] for k, v in rounds.items()},
        "best_images_per_second": {k: round(v[0], 2) for k, v in best.items()},
        "median_images_per_second": {k: round(statistics.median(r for r, _ in v), 2) for k, v in rounds.items()},
        "load_average_end": loadavg(),
        "ratio_after_over_before": round(ratio, 3),
    }
    lines = [
        "| measurement | torch threads | images/s (best of rounds) | median |",
        "|---|---|---|---|",
        *(f"| {k} | {result['threads'][k]} | {result['best_images_per_second'][k]} | {result['median_images_per_second'][k]} |" for k in rounds),
        f"\nratio after/before the fix: {ratio:.2f}x",
    ]
    result["markdown"] = "\n".join(lines)
    print(result["markdown"])
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
