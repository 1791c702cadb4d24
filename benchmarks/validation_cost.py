"""What validation costs during training, against a training epoch (docs/training.md, "What is measured when").

On the demo data set (or --data), with a recipe's ``arcface_model`` settings (default
configs/demo.yaml), for fold 0 of 2: full-frame crops at the recipe's size (JPEG, as the
crops stage writes them), then, with the pipeline's own ``build_training``,
``train_one_epoch``, ``validation_set`` and ``validate``, per epoch: one training epoch,
one validation on the whole fold and one on a fixed sample (``--sample``). Prints one
JSON object (also written to --out) with the times, the per-photo rates, and the cost
projected to a real-scale fold (``--gallery`` training photos, ``--queries`` validation
photos) from the measured rates. Each time is the fastest of the epochs (best of N: the
least disturbed by other work on a shared machine).

    .venv/bin/python benchmarks/validation_cost.py --out benchmarks/results/validation_cost_demo.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, loadavg, machine_summary, print_json, recipe_train_config, timestamp
from PIL import Image

from whale_ml.data.demo import PRESETS, generate_demo_data
from whale_ml.data.folds import fold_split, make_folds
from whale_ml.data.metadata import read_train_metadata
from whale_ml.threads import pipeline_threads, using_threads
from whale_ml.training.trainer import build_training, seed_everything, train_one_epoch
from whale_ml.training.validation import validate, validation_set


def full_frame_crops(paths: list[str], out: Path, size: int) -> list[str]:
    """Each photo squeezed to ``size`` x ``size`` and saved as the crops stage saves its crops (JPEG q95)."""
    out.mkdir(parents=True, exist_ok=True)
    crops = []
    for i, path in enumerate(paths):
        crop = out / f"{i:06d}.jpg"
        Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(crop, quality=95)
        crops.append(str(crop))
    return crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--data", default=None, help="a Kaggle-layout data set (default: the demo set, generated)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs timed (each followed by both validations)")
    parser.add_argument("--sample", type=int, default=40, help="validation photos in the sampled validation")
    parser.add_argument("--gallery", type=int, default=40_000, help="a real fold's training photos, for the projection")
    parser.add_argument("--queries", type=int, default=10_000, help="a real fold's validation photos, for the projection")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="whale-valcost-"))
    data = Path(args.data) if args.data else generate_demo_data(work / "data", PRESETS["demo"])
    cfg = recipe_train_config(args.recipe, epochs=args.epochs, val_sample=args.sample)
    train = read_train_metadata(data)
    train["path"] = full_frame_crops(train["path"].tolist(), work / "crops", cfg.image_size)
    tr, val = fold_split(make_folds(train, 2, 0.16, 0), 0)
    num_classes = int(train["label"].max()) + 1
    sample = validation_set(tr, val, cfg.val_sample, cfg.seed)
    device = torch.device("cpu")
    rows = []
    with using_threads():
        seed_everything(cfg.seed)
        parts = build_training(cfg, tr, num_classes, device, log=lambda _m: None)
        for epoch in range(1, args.epochs + 1):
            stats = train_one_epoch(
                epoch, parts.step, parts.loader, parts.optimizer, parts.scheduler, parts.scaler, device, cfg.accumulate, cfg.grad_clip
            )
            t0 = time.perf_counter()
            full = validate(parts.model, cfg, tr, val, device)
            t1 = time.perf_counter()
            sampled = validate(parts.model, cfg, sample.gallery, sample.queries, device)
            t2 = time.perf_counter()
            rows.append(
                {"epoch": epoch, "epoch_s": stats.seconds, "train_images": stats.images, "val_s": t1 - t0, "val_sample_s": t2 - t1,
                 "val_map5": full["val_map5"], "val_sample_map5": sampled["val_map5"]}
            )
            print(json.dumps(rows[-1]), flush=True)

    epoch_s, val_s = min(r["epoch_s"] for r in rows), min(r["val_s"] for r in rows)
    train_rate, embed_rate = rows[0]["train_images"] / epoch_s, (len(tr) + len(val)) / val_s
    real_epoch, real_val = args.gallery / train_rate, (args.gallery + args.queries) / embed_rate
    result = {
        "date": timestamp(),
        "machine": f"{machine_summary()}, {pipeline_threads()} torch threads",
        "torch": torch.__version__,
        "recipe": {k: getattr(cfg, k) for k in ("backbone", "image_size", "batch_size")},
        "fold0": {"train_photos": len(tr), "val_photos": len(val), "sample_gallery": len(sample.gallery), "sample_queries": len(sample.queries)},
        "epochs": rows,
        "epoch_s": round(epoch_s, 2),
        "validation_s": round(val_s, 2),
        "sample_validation_s": round(min(r["val_sample_s"] for r in rows), 2),
        "load_average": loadavg(),
        "validation_over_epoch": round(val_s / epoch_s, 2),
        "train_images_per_s": round(train_rate, 1),
        "validation_images_per_s": round(embed_rate, 1),
        "projection": {
            "fold": {"gallery": args.gallery, "queries": args.queries},
            "epoch_s": round(real_epoch),
            "validation_s": round(real_val),
            "validation_over_epoch": round(real_val / real_epoch, 2),
        },
    }
    print_json(result, args.out)


if __name__ == "__main__":
    main()
