#!/usr/bin/env python
"""The demo recipe's detector built from different ultralytics model yamls, in one run.

    python benchmarks/detector_models.py --data DIR --out benchmarks/results/detector_models.json

``DIR`` is the demo set (``whale demo-data DIR``; generated into a temp folder when
omitted). For each model yaml (default ``yolov8n.yaml``, the baseline, then
``yolo11n.yaml`` and ``yolo26n.yaml``: ultralytics' own configs, random init, nothing
downloaded) and each seed, a fresh process runs what the pipeline runs:

* the detector's data set from ``fluke_boxes.csv`` with the stage's hold-out share and
  seed (``whale_ml.detection.detector.training_set``),
* ``train_yolo`` with the demo recipe (``configs/demo.yaml``: 50 epochs, 128 px,
  batch 16) on the CPU, timed;
* ultralytics' validation scores of the best weights (box mAP50, mAP50-95), and the
  mean IoU of the unexpanded box against the true box on the held-out photos
  (``held_out_iou``, what ``fluke_detector`` reports);
* inference: ``detect_boxes`` over every demo photo (train and test) at 128 px, timed
  (best of ``--predict-repeats``), as the boxes stage calls it.

Times are wall seconds and CPU seconds (the process and its finished children). On a
shared machine both move with the other jobs' load, so ``--timing`` measures the cost
alone: a few epochs of training and one inference pass per model, models interleaved
within each of ``--rounds`` rounds, each in a fresh process; the ratio to the first model
is taken within a round and its median reported.

    python benchmarks/detector_models.py --timing --data DIR --weights v8.pt 11.pt 26.pt --out .../detector_timing.json

Models and seeds are interleaved (v8, 11, 26, v8, ...) so that a machine whose load
drifts weighs on each alike. Every ratio in the summary is against the first model,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, json_child, machine_summary, timestamp, write_json


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the data loader's workers):
    on a shared machine, less sensitive to the other jobs than the wall time."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timing_child(args: argparse.Namespace) -> None:
    """A cost measurement in this (fresh) process: ``train`` (``--epochs`` epochs of the demo
    recipe) or ``predict`` (``detect_boxes`` over every demo photo with ``--weights``)."""
    sys.path.insert(0, str(REPO))
    import pandas as pd

    from whale_ml.detection.detector import training_set
    from whale_ml.detection.yolo import detect_boxes, train_yolo
    from whale_ml.stage_configs import DetectorConfig

    data, work = Path(args.data), Path(args.work)
    if args.timing == "train":
        settings = DetectorConfig(model_yaml=args.model, epochs=args.epochs, min_steps=0, imgsz=128, batch=16, device="cpu", seed=args.seed)
        dataset, _ = training_set(settings, data, work)
        t, cpu = time.perf_counter(), _cpu_s()
        train_yolo(dataset, work, settings.model_yaml, settings.epochs, 128, 16, "cpu", settings.seed, work)
        out = {"seconds": time.perf_counter() - t, "cpu_s": _cpu_s() - cpu}
    else:
        photos = sorted((data / "train_images").glob("*.jpg")) + sorted((data / "test_images").glob("*.jpg"))
        rows = pd.DataFrame({"image": [p.name for p in photos], "path": [str(p) for p in photos]})
        detect_boxes(rows.head(32), args.weights, 0.25, 1.0, 128, device="cpu", home=work)  # warm-up: imports, first batch
        t, cpu = time.perf_counter(), _cpu_s()
        detect_boxes(rows, args.weights, 0.25, 1.0, 128, device="cpu", home=work)
        out = {"seconds": time.perf_counter() - t, "cpu_s": _cpu_s() - cpu, "photos": len(rows)}
    print(json.dumps({"model": args.model, "timing": args.timing, **out}))


def _timing(args: argparse.Namespace) -> None:
    """Training and inference cost of each model, interleaved round by round in fresh processes:
    the ratio to the first model within each round, then the median over rounds."""
    weights = dict(zip(args.models, args.weights, strict=True))
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="detector_timing_") as tmp:
        for r in range(args.rounds):
            this: dict[str, dict[str, dict[str, float]]] = {"train": {}, "predict": {}}
            for what in ("train", "predict"):
                for model in args.models:
                    cmd = [sys.executable, __file__, "--child", "--timing", what, "--model", model, "--data", str(args.data)]
                    cmd += ["--work", str(Path(tmp) / f"{what}_{Path(model).stem}_r{r}"), "--epochs", str(args.timing_epochs)]
                    cmd += ["--weights", weights[model]] if what == "predict" else []
                    env = {**os.environ, "YOLO_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
                    row = json_child(cmd, f"{what} {model}", env=env)
                    this[what][model] = {"seconds": row["seconds"], "cpu_s": row["cpu_s"]}
                    print(json.dumps({"round": r, **row}), flush=True)
            rounds.append(this)
    base = args.models[0]
    summary = {
        what: {
            model: {
                f"{key}_median": statistics.median(rd[what][model][key] for rd in rounds)
                for key in ("seconds", "cpu_s")
            }
            | {
                f"{key}_ratio_median": statistics.median(rd[what][model][key] / rd[what][base][key] for rd in rounds)
                for key in ("seconds", "cpu_s")
            }
            for model in args.models
        }
        for what in ("train", "predict")
    }
    result = {
        "date": timestamp(),
        "machine": machine_summary(),
        "train_epochs": args.timing_epochs,
        "weights": weights,
        "rounds": rounds,
        "summary": summary,
    }
    write_json(args.out, result)
    print(f"{result['date']}, {result['machine']}, medians over {args.rounds} interleaved rounds")
    print(
        f"| model | train {args.timing_epochs} epochs: wall s (x base) | CPU s (x base) | "
        "predict 414 photos: wall s (x base) | CPU s (x base) |"
    )
    print("|---|---:|---:|---:|---:|")
    for model in args.models:
        t, p = summary["train"][model], summary["predict"][model]
        print(
            f"| {model} | {t['seconds_median']:.1f} ({t['seconds_ratio_median']:.2f}) | "
            f"{t['cpu_s_median']:.1f} ({t['cpu_s_ratio_median']:.2f}) | "
            f"{p['seconds_median']:.2f} ({p['seconds_ratio_median']:.2f}) | {p['cpu_s_median']:.2f} ({p['cpu_s_ratio_median']:.2f}) |"
        )


def _child(args: argparse.Namespace) -> None:
    """One model, one seed, in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, str(REPO))
    import pandas as pd

    from whale_ml.detection.detector import held_out_iou, training_set
    from whale_ml.detection.yolo import detect_boxes, train_yolo
    from whale_ml.stage_configs import DetectorConfig

    data, work = Path(args.data), Path(args.work)
    settings = DetectorConfig(model_yaml=args.model, epochs=args.epochs, min_steps=0, imgsz=128, batch=16, device="cpu", seed=args.seed)
    dataset, truth = training_set(settings, data, work)
    t, cpu = time.perf_counter(), _cpu_s()
    best, scores = train_yolo(
        dataset, work, settings.model_yaml, settings.epochs, settings.imgsz, settings.batch, "cpu", settings.seed, work
    )
    train_s, train_cpu_s = time.perf_counter() - t, _cpu_s() - cpu
    iou = held_out_iou(dataset, truth, best, data / "train_images", settings.imgsz, "cpu", work)
    photos = sorted((data / "train_images").glob("*.jpg")) + sorted((data / "test_images").glob("*.jpg"))
    rows = pd.DataFrame({"image": [p.name for p in photos], "path": [str(p) for p in photos]})
    predict_s, predict_cpu_s = [], []
    for _ in range(args.predict_repeats):
        t, cpu = time.perf_counter(), _cpu_s()
        boxes = detect_boxes(rows, best, 0.25, 1.0, settings.imgsz, device="cpu", home=work)
        predict_s.append(time.perf_counter() - t)
        predict_cpu_s.append(_cpu_s() - cpu)
    from ultralytics import YOLO

    info = YOLO(str(best)).info(verbose=True, imgsz=settings.imgsz)  # (layers, params, gradients, GFLOPs)
    print(
        json.dumps(
            {
                "model": args.model,
                "seed": args.seed,
                "train_images": dataset.n_train,
                "val_images": dataset.n_val,
                "train_s": train_s,
                "train_cpu_s": train_cpu_s,
                **scores,
                **iou,
                "predict_photos": len(rows),
                "predict_s": predict_s,
                "predict_cpu_s": predict_cpu_s,
                "full_frame_share": float((boxes["source"] != "detector").mean()),
                "params": int(info[1]) if info else None,
                "gflops_at_imgsz": float(info[3]) if info else None,
            }
        )
    )


def _run(model: str, seed: int, data: Path, work: Path, epochs: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--seed", str(seed), "--data", str(data), "--work", str(work)]
    cmd += ["--epochs", str(epochs), "--predict-repeats", str(repeats)]
    env = {**os.environ, "YOLO_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return json_child(cmd, f"{model} seed {seed}", env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="the demo set (generated into a temp folder when omitted)")
    ap.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"], help="the first is the baseline")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="detector seeds (the hold-out split and the init)")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--predict-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "detector_models.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument(
        "--from-rows",
        type=Path,
        help="summarise the JSON lines of runs already made (each run prints one, and they are kept in <out>.rows.jsonl) "
        "instead of running",
    )
    ap.add_argument(
        "--timing",
        nargs="?",
        const="all",
        choices=["all", "train", "predict"],
        help="cost only: --timing-epochs of training and a pass of inference per model, interleaved over --rounds "
        "(inference with --weights, one .pt per model, e.g. the 50-epoch runs' best.pt)",
    )
    ap.add_argument("--weights", nargs="+", default=[], help="with --timing: one trained .pt per model, in --models order")
    ap.add_argument("--timing-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        if args.timing in ("train", "predict"):
            args.weights = args.weights[0] if args.weights else None
            _timing_child(args)
        else:
            _child(args)
        return
    if args.timing:
        if args.out == ap.get_default("out"):
            args.out = args.out.with_name("detector_timing.json")
        if args.data is None or len(args.weights) != len(args.models):
            ap.error("--timing needs --data and one --weights file per model")
        _timing(args)
        return
    started = time.time()
    runs = []
    if args.from_rows is not None:
        runs = [json.loads(line) for line in args.from_rows.read_text().splitlines() if line.startswith("{")]
        args.models = list(dict.fromkeys(r["model"] for r in runs))
        args.seeds = sorted({r["seed"] for r in runs})
    else:
        rows_file = args.out.with_suffix(".rows.jsonl")
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text("")
        with tempfile.TemporaryDirectory(prefix="detector_models_") as tmp:
            data = args.data
            if data is None:
                sys.path.insert(0, str(REPO))
                from whale_ml.data.demo import ensure_demo_data

                data, _ = ensure_demo_data(Path(tmp) / "demo")
            for seed in args.seeds:
                for model in args.models:
                    row = _run(model, seed, data, Path(tmp) / f"{Path(model).stem}_s{seed}", args.epochs, args.predict_repeats)
                    print(json.dumps(row), flush=True)
                    with rows_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    runs.append(row)
    summary = {}
    for model in args.models:
        mine = [r for r in runs if r["model"] == model]
        summary[model] = {
            key: statistics.mean(r[key] for r in mine)
            for key in (
                *("train_s", "train_cpu_s", "map50", "map50_95", "iou_detector", "iou_full_frame"),
                *("full_frame_share", "params", "gflops_at_imgsz"),
            )
        }
        summary[model]["predict_s"] = statistics.mean(min(r["predict_s"]) for r in mine)
        summary[model]["predict_cpu_s"] = statistics.mean(min(r["predict_cpu_s"]) for r in mine)
    base = summary[args.models[0]]
    for model, s in summary.items():
        s["train_ratio"] = s["train_s"] / base["train_s"]
        s["predict_ratio"] = s["predict_s"] / base["predict_s"]
        s["train_cpu_ratio"] = s["train_cpu_s"] / base["train_cpu_s"]
        s["predict_cpu_ratio"] = s["predict_cpu_s"] / base["predict_cpu_s"]
    import torch
    import ultralytics

    result = {
        "date": timestamp(),
        "wall_s": None if args.from_rows else time.time() - started,
        "machine": machine_summary(),
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__},
        "recipe": {"epochs": args.epochs, "imgsz": 128, "batch": 16, "device": "cpu", "val_share": 0.2},
        "runs": runs,
        "summary": summary,
    }
    write_json(args.out, result)
    print(f"{result['date']}, {result['machine']}, means over seeds {args.seeds}")
    print(
        "| model | params | GFLOPs at 128 px | train wall s (x base) | train CPU s (x base) | mAP50 | mAP50-95 | held-out IoU | "
        "full-frame share | predict wall s (x base) | predict CPU s (x base) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, s in summary.items():
        print(
            f"| {model} | {s['params']:,.0f} | {s['gflops_at_imgsz']:.2f} | {s['train_s']:.0f} ({s['train_ratio']:.2f}) | "
            f"{s['train_cpu_s']:.0f} ({s['train_cpu_ratio']:.2f}) | {s['map50']:.3f} | {s['map50_95']:.3f} | {s['iou_detector']:.3f} | "
            f"{s['full_frame_share']:.3f} | {s['predict_s']:.2f} ({s['predict_ratio']:.2f}) | "
            f"{s['predict_cpu_s']:.2f} ({s['predict_cpu_ratio']:.2f}) |"
        )


if __name__ == "__main__":
    main()
