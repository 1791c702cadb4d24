#!/usr/bin/env python
"""The image stages at survey size: the one pass that boxes and crops every photo, against
one plain serial PIL decode of every photo at full size, measured in the same run.

    python benchmarks/kaggle_images.py --data DIR --out benchmarks/results/kaggle_images.json

``DIR`` is a Kaggle-shaped set with its photos (``whale demo-data DIR --preset kaggle --scale 0.01``:
1,500-4,000 px wide). Each measurement runs in a fresh process, so its peak resident memory
(``VmHWM``) is its own:

* ``baseline``: ``Image.open(p)``, ``load()``, ``convert("RGB")`` of every photo, one after
  another on one core (``sched_setaffinity``): what the stages cost when every photo is decoded
  once at full size, serially. (The code before the pass decoded every photo twice at full size,
  once for the boxes and once for the crops, both serially.)
* ``pass``: ``whale_ml.detection.yolo.box_and_crop``, the pipeline's own call, with a YOLO
  detector trained here as the demo recipe trains it (yolov8n at 128 px, ``--detector-epochs``),
  crops written to a fresh folder: on 1 core (1 worker, 1 torch thread) and on every core, at
  the demo's crop size (64) and at the GPU recipe's (512).

Projections to the full competition (78,989 photos) are the measured per-photo time times the
photo count, divided by the cores for the 16-core machine (ideal scaling: a projection, not a
measurement). The photos here are drawn by the project's generator, so their JPEG entropy is not
a survey photo's; the ratio to the baseline, measured on the same files, is what carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, REPO, RESULTS, json_child, machine_summary, timestamp, write_json

FULL_PHOTOS = 51_033 + 27_956

CHILD = r"""
import json, os, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
os.sched_setaffinity(0, set(args["cpus"]))
os.environ["WHALE_THREADS"] = str(len(args["cpus"]))
sys.path[:0] = [args["repo"], args["benchmarks"]]
import pandas as pd
from common import status_kib
photos = [Path(p) for p in args["photos"]]
if args["what"] == "baseline":
    from PIL import Image
    t = time.perf_counter()
    for p in photos:
        with Image.open(p) as im:
            im.load()
            im.convert("RGB")
    out = {"seconds": time.perf_counter() - t}
else:
    from whale_ml.detection.photo_pass import BoxRule, CropRule
    from whale_ml.detection.yolo import box_and_crop
    table = pd.DataFrame({"image": [p.name for p in photos], "path": [str(p) for p in photos],
                          "split": [p.parent.name.split("_")[0] for p in photos]})
    t = time.perf_counter()
    done = box_and_crop(table, args["weights"], BoxRule(args["min_confidence"], 1.2, 128), CropRule(Path(args["out"]), args["size"]),
                        batch=32, device="cpu", home=Path(args["out"]) / "home", workers=len(args["cpus"]),
                        threads=len(args["cpus"]))
    s = done.stats
    out = {"seconds": time.perf_counter() - t, "decodes": s.decodes, "redecodes": s.redecodes,
           "decode_scales": {str(k): v for k, v in sorted(s.by_reduction.items())},
           "full_frame_share": float((done.boxes["source"] != "detector").mean())}
out["peak_rss_mib"] = status_kib("VmHWM") / 1024
print(json.dumps(out))
"""


def _child(what: str, photos: list[Path], cpus: list[int], **extra: object) -> dict:
    args = {"what": what, "photos": [str(p) for p in photos], "cpus": cpus, "repo": str(REPO), "benchmarks": str(HERE), **extra}
    return json_child([sys.executable, "-c", CHILD, json.dumps(args)], what)


def _detector(data: Path, work: Path, epochs: int) -> tuple[Path, float]:
    sys.path.insert(0, str(REPO))
    from whale_ml.detection.yolo import read_box_file, train_yolo, write_yolo_dataset

    t = time.perf_counter()
    dataset = write_yolo_dataset(read_box_file(data / "fluke_boxes.csv"), data / "train_images", work / "ds", 0.2, 0)
    weights, _ = train_yolo(dataset, work / "yolo", "yolov8n.yaml", epochs=epochs, imgsz=128, batch=16, device="cpu", home=work)
    return weights, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a Kaggle-shaped set with photos")
    ap.add_argument("--photos", type=int, default=0, help="use the first N photos (0: all)")
    ap.add_argument("--detector-epochs", type=int, default=30)
    ap.add_argument("--weights", type=Path, help="a trained ultralytics detector to use instead of training one here")
    ap.add_argument(
        "--min-confidence",
        type=float,
        default=0.25,
        help="the pipeline's default 0.25; 0 uses every detector box however unsure, so that boxes of all sizes "
        "exercise the scale plan and the second decodes even when the detector trained here is weak",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "kaggle_images.json")
    args = ap.parse_args()
    photos = sorted((args.data / "train_images").glob("*.jpg")) + sorted((args.data / "test_images").glob("*.jpg"))
    photos = photos[: args.photos] if args.photos else photos
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="kaggle_images_") as tmp:
        work = Path(tmp)
        weights, detector_s = (args.weights, 0.0) if args.weights else _detector(args.data, work, args.detector_epochs)
        rows = {"baseline_1core": _child("baseline", photos, cores[:1])}
        for size in (64, 512):
            for name, cpus in ((f"pass_{size}_1core", cores[:1]), (f"pass_{size}_{len(cores)}cores", cores)):
                rows[name] = _child(
                    "pass", photos, cpus, weights=str(weights), size=size, out=str(work / name), min_confidence=args.min_confidence
                )
    base = rows["baseline_1core"]["seconds"]
    for name, row in rows.items():
        per_photo = row["seconds"] / len(photos)
        row.update(
            {
                "photos_per_second": len(photos) / row["seconds"],
                "ratio_to_baseline": row["seconds"] / base,
                "projected_full_h_this_machine": per_photo * FULL_PHOTOS / 3600,
                "projected_full_h_16_cores": per_photo * FULL_PHOTOS / 3600 * (len(cores) if "cores" in name else 1) / 16,
            }
        )
    from PIL import Image

    widths = [Image.open(p).size[0] for p in photos]
    result = {
        "date": timestamp(),
        "machine": machine_summary(),
        "photos": len(photos),
        "photo_width_px": [min(widths), int(sum(widths) / len(widths)), max(widths)],
        "detector_training_s": detector_s,
        "detector_epochs": 0 if args.weights else args.detector_epochs,
        "detector_weights": str(args.weights or "trained here"),
        "min_confidence": args.min_confidence,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"{len(photos)} photos, {result['photo_width_px']} px wide, {result['machine']}, {result['date']}")
    print("| run | s | photos/s | x baseline | decodes | redecodes | scales | peak RSS MiB | full set, h (this machine) | full set, h (16 cores) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['photos_per_second']:.2f} | {r['ratio_to_baseline']:.2f} | {r.get('decodes', len(photos))} | "
            f"{r.get('redecodes', 0)} | {r.get('decode_scales', {'1': len(photos)})} | {r['peak_rss_mib']:.0f} | "
            f"{r['projected_full_h_this_machine']:.2f} | {r['projected_full_h_16_cores']:.2f} |"
        )


if __name__ == "__main__":
    main()
