#!/usr/bin/env python
"""The detector's training on the same photos at demo size and at survey size, in one run.

    python benchmarks/detector_photo_size.py --out benchmarks/results/detector_photo_size.json

The demo set (``whale_ml demo-data``, 240-400 px photos; generated into a temp folder unless
``--data`` names one, with every training photo boxed: ``--box-share``, see below) and the
same boxed photos upscaled ``--upscale`` times (default 8: 1,920-3,200 px, survey size),
their boxes scaled alike. The upscaled photos get a little
sensor-like noise (``--grain``, the standard deviation in grey levels) so that their JPEGs
are as large as survey photos' (about 0.3 bytes a pixel at quality 90, like the
Kaggle-shaped generator's): a smooth upscaled JPEG is several times smaller and decodes
faster than a real photo of its size. On each, the detector's training
as ``fluke_detector`` runs it, with the demo recipe's detector settings
(``configs/demo.yaml``: model yaml, 128 px, batch 16) for ``--epochs`` epochs on the CPU:
the data set from the box file (``write_yolo_dataset``), then ``train_yolo``, timed
together. Two ways of giving ultralytics its images:

* ``small`` (what the pipeline does): each boxed photo decoded once, at the coarsest
  JPEG scale that still gives 128 px, and written with its long side 128 px;
* ``full`` (the way it was, for comparison): the photos linked at full size, which
  ultralytics' loader decodes and resizes in every epoch.

Why every training photo is boxed: ultralytics' loader keeps the last ``batch`` x 8 images
it loaded (at most 1,000; 128 here) in each worker's memory for its mosaics. The demo's own
box file (half the training photos, 141) nearly fits in that, which hides the full-size
decodes that the real scale, thousands of boxed photos, pays in every epoch. With every
training photo boxed (about 280) most loads still decode; fewer than at the real scale,
so the ``full`` times here are a lower bound on what the photos at full size cost.

Each training runs in a fresh process; the four (demo/survey x small/full) are interleaved
within each of ``--rounds`` rounds, so that a machine whose load drifts weighs on each
alike, and every ratio is taken within a round (median over rounds). The target: survey
size takes at most 1.5x the demo size's time with ``small``.
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
from importlib.metadata import version
from pathlib import Path

from common import REPO, RESULTS, environment, json_child, save_results

MODES = [("demo", "small"), ("survey", "small"), ("demo", "full"), ("survey", "full")]
TARGET = 1.5


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the data loader's workers):
    on a shared machine, less sensitive to the other jobs than the wall time."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _recipe_detector() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["ops"]["fluke_detector"]["config"]


def _child(args: argparse.Namespace) -> None:
    """One training in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, str(REPO))
    from whale_ml.detection.yolo import read_box_file, train_yolo, write_yolo_dataset
    from whale_ml.stage_configs import DetectorConfig

    data, work = Path(args.data), Path(args.work)
    settings = DetectorConfig(**{**_recipe_detector(), "epochs": args.epochs, "min_steps": 0, "device": "cpu"})
    t, cpu = time.perf_counter(), _cpu_s()
    imgsz = settings.imgsz if args.images == "small" else None
    boxes = read_box_file(data / settings.box_file)
    dataset = write_yolo_dataset(boxes, data / "train_images", work / "dataset", settings.val_share, settings.seed, imgsz=imgsz)
    dataset_s = time.perf_counter() - t
    _, scores = train_yolo(
        dataset, work, settings.model_yaml, settings.epochs, settings.imgsz, settings.batch, "cpu", settings.seed, work
    )
    seconds, cpu_s = time.perf_counter() - t, _cpu_s() - cpu
    out = {"dataset_s": dataset_s, "train_s": seconds - dataset_s, "seconds": seconds, "cpu_s": cpu_s}
    out["boxed_photos"] = dataset.n_train + dataset.n_val
    print(json.dumps({"size": args.size, "images": args.images, **out, "map50": scores["map50"]}))


def survey_copy(demo: Path, out: Path, factor: int, grain: float) -> dict[str, float]:
    """The demo set's boxed training photos upscaled ``factor`` times (bicubic, JPEG quality 90)
    with the box file scaled alike: the same photos at survey size, with Gaussian noise of ``grain`` grey levels (seeded: the same
    files on every run). Returns the photos' count, widths and bytes a pixel."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    boxes = pd.read_csv(demo / "fluke_boxes.csv")
    (out / "train_images").mkdir(parents=True)
    widths, density = [], []
    rng = np.random.default_rng(0)
    for name in sorted(set(boxes["image"])):
        with Image.open(demo / "train_images" / name) as im:
            big = im.convert("RGB").resize((im.width * factor, im.height * factor), Image.BICUBIC)
        if grain:
            pixels = np.asarray(big, dtype=np.float32) + rng.normal(0, grain, (big.height, big.width, 1)).astype(np.float32)
            big = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        big.save(out / "train_images" / name, quality=90)
        widths.append(big.width)
        density.append((out / "train_images" / name).stat().st_size / (big.width * big.height))
    scaled = boxes.copy()
    for col in ("x_min", "y_min", "x_max", "y_max"):
        scaled[col] = scaled[col] * factor
    scaled.to_csv(out / "fluke_boxes.csv", index=False)
    return {"photos": len(widths), "min_width": min(widths), "max_width": max(widths), "bytes_per_pixel": round(float(np.mean(density)), 3)}


def summarise(rounds: list[dict[str, dict]]) -> dict[str, float]:
    """Medians over rounds of each mode's time, and of the ratios taken within a round."""

    def median(fn) -> float:  # noqa: ANN001
        return statistics.median(fn(r) for r in rounds)

    out = {f"{size}_{images}_s": median(lambda r, k=f"{size}_{images}": r[k]["seconds"]) for size, images in MODES}
    out |= {f"{size}_{images}_dataset_s": median(lambda r, k=f"{size}_{images}": r[k]["dataset_s"]) for size, images in MODES}
    out |= {f"{size}_{images}_cpu_s": median(lambda r, k=f"{size}_{images}": r[k]["cpu_s"]) for size, images in MODES}
    for key in ("seconds", "cpu_s"):
        unit = "" if key == "seconds" else "_cpu"
        out[f"survey_over_demo_small{unit}"] = median(lambda r, k=key: r["survey_small"][k] / r["demo_small"][k])
        out[f"survey_over_demo_full{unit}"] = median(lambda r, k=key: r["survey_full"][k] / r["demo_full"][k])
        out[f"survey_full_over_small{unit}"] = median(lambda r, k=key: r["survey_full"][k] / r["survey_small"][k])
    out["target"] = TARGET
    out["met"] = out["survey_over_demo_small"] <= TARGET
    return out


def markdown(res: dict) -> str:
    s, photos = res.get("summary"), res["survey_photos"]
    if not s:
        return ""
    lines = [
        f"{res['environment']['date']}, {res['environment']['cpu_model']}, {res['environment']['cores']} cores; "
        f"{photos['photos']} boxed photos ({photos['min_width']}-{photos['max_width']} px wide at survey size), {res['epochs']} epochs, "
        f"medians of {len(res['rounds'])} interleaved rounds",
        "",
        "| training images | demo size: wall s (CPU s) | survey size: wall s (CPU s) | survey / demo: wall (CPU) |",
        "|---|---:|---:|---:|",
    ]
    for images, what in (("small", "decoded once at 128 px (the pipeline)"), ("full", "the photos at full size (before)")):
        lines.append(
            f"| {what} | {s[f'demo_{images}_s']:.1f} ({s[f'demo_{images}_cpu_s']:.1f}) | {s[f'survey_{images}_s']:.1f} "
            f"({s[f'survey_{images}_cpu_s']:.1f}) | {s[f'survey_over_demo_{images}']:.2f} ({s[f'survey_over_demo_{images}_cpu']:.2f}) |"
        )
    lines.append("")
    lines.append(
        f"Survey size, full over small: {s['survey_full_over_small']:.2f}x wall, {s['survey_full_over_small_cpu']:.2f}x CPU. "
        f"Target survey / demo <= {TARGET}: {'met' if s['met'] else 'NOT met'}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="the demo set (generated into a temp folder when omitted)")
    ap.add_argument("--box-share", type=float, default=1.0, help="share of the demo's training photos boxed (the demo preset: 0.5)")
    ap.add_argument("--upscale", type=int, default=8, help="survey photos: the demo photos this many times wider and taller")
    ap.add_argument("--grain", type=float, default=10.0, help="noise on the survey photos, in grey levels (0: none)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "detector_photo_size.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    started = time.perf_counter()
    # Ultralytics' version from its metadata: importing it here would write its settings under $HOME.
    res: dict = {"environment": environment("torch", "pillow", ultralytics=version("ultralytics")), "epochs": args.epochs}
    res["upscale"], res["grain"], res["box_share"] = args.upscale, args.grain, None if args.data else args.box_share
    res["recipe"] = {**_recipe_detector(), "epochs": args.epochs, "device": "cpu"}
    res["rounds"] = []
    with tempfile.TemporaryDirectory(prefix="detector_photo_size_") as tmp:
        sys.path.insert(0, str(REPO))
        demo = args.data
        if demo is None:
            from whale_ml.data.demo import PRESETS, generate_demo_data

            demo = generate_demo_data(Path(tmp) / "demo", PRESETS["demo"].model_copy(update={"box_share": args.box_share}))
        t = time.perf_counter()
        res["survey_photos"] = survey_copy(demo, Path(tmp) / "survey", args.upscale, args.grain)
        res["survey_photos"]["made_in_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({"survey_photos": res["survey_photos"]}), flush=True)
        env = {**os.environ, "YOLO_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for r in range(args.rounds):
            this = {}
            for size, images in MODES:
                data = demo if size == "demo" else Path(tmp) / "survey"
                cmd = [sys.executable, __file__, "--child", "--size", size, "--images", images, "--data", str(data)]
                cmd += ["--epochs", str(args.epochs), "--work", str(Path(tmp) / f"work_{size}_{images}_r{r}")]
                this[f"{size}_{images}"] = row = json_child(cmd, f"{size} {images}", env=env)
                print(json.dumps({"round": r, **row}), flush=True)
            res["rounds"].append(this)
            res["summary"] = summarise(res["rounds"])
            save_results(res, args.out, markdown, started)
    print(res["markdown"])


if __name__ == "__main__":
    main()
