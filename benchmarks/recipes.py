"""The default ArcFace recipe against the reference notebook's settings, on the demo data.

Trains one fold model per recipe on the same fold of a finished ``make demo`` run
(its detector crops and folds), for the same number of epochs on the same
backbone, image size and batch, then scores each:

* validation MAP@5 with new_individual (the fold's held-out photos, best epoch,
  threshold tuned on them), and
* test MAP@5: every training photo as the gallery, the test photos as queries,
  that model's validation threshold, against ``test_truth.csv``.

    WHALE_HOME=whale_home .venv/bin/python benchmarks/recipes.py [--fold 0] [--epochs 60]

Recipes: ``configs/demo.yaml`` (the default) and ``configs/notebook.yaml``. The
wall time of each training is reported, so "same time budget" can be checked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import REPO, RESULTS, machine_summary, recipe_train_config, write_json

from whale_ml.stage_configs import TrainConfig
from whale_ml.data.folds import fold_split
from whale_ml.data.metadata import NEW_INDIVIDUAL, read_truth
from whale_ml.retrieval import build_index, map_at_5, predict_top5, search_gallery
from whale_ml.retrieval.embeddings import embed_paths
from whale_ml.environment import default_data_dir, default_home
from whale_ml.home import HomeLayout
from whale_ml.training.trainer import load_model, train_fold

RECIPES = {
    "default (configs/demo.yaml)": REPO / "configs/demo.yaml",
    "notebook settings (configs/notebook.yaml)": REPO / "configs/notebook.yaml",
}


def test_map5(cfg: TrainConfig, checkpoint: Path, threshold: float, gallery: pd.DataFrame, queries: pd.DataFrame) -> float:
    model, _ = load_model(checkpoint)
    g = embed_paths(model, gallery["crop_path"].tolist(), cfg.image_size)
    q = embed_paths(model, queries["crop_path"].tolist(), cfg.image_size)
    sims, ids = search_gallery(build_index(g), gallery["individual_id"].to_numpy(), q)
    return map_at_5(predict_top5(sims, ids, threshold), queries["truth"].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override both recipes' epochs (default: the recipes' own)")
    p.add_argument("--out", default=str(RESULTS / "recipes_demo.json"))
    p.add_argument("--work", default=None, help="where the models go (default: $WHALE_HOME/recipe_bench)")
    args = p.parse_args(argv)

    layout, data = HomeLayout(default_home()), default_data_dir()
    truth = read_truth(data)
    folds_path, crops_path = layout.tables / "cv_folds.parquet", layout.tables / "crops.parquet"
    if truth is None or not folds_path.exists():
        print("needs a finished `make demo` run (cv_folds, crops) on a data set with test_truth.csv", file=sys.stderr)
        return 2
    folds, crops = pd.read_parquet(folds_path), pd.read_parquet(crops_path)
    train, val = fold_split(folds, args.fold)
    train, val = train.assign(path=train["crop_path"]), val.assign(path=val["crop_path"])
    num_classes = int(folds["label"].max()) + 1
    gallery = folds[folds["crop_path"] != ""]
    queries = crops[(crops["split"] == "test") & (crops["crop_path"] != "")].merge(truth, on="image")
    known = set(gallery["individual_id"])
    queries = queries.assign(truth=np.where(queries["individual_id"].isin(known), queries["individual_id"], NEW_INDIVIDUAL))
    work = Path(args.work) if args.work else layout.home / "recipe_bench"

    rows = []
    for name, path in RECIPES.items():
        cfg = recipe_train_config(path, **({"epochs": args.epochs} if args.epochs else {}))
        out = work / path.stem
        for stale in ("last.pt", "best.pt"):  # time a full training, not a reuse
            (out / stale).unlink(missing_ok=True)
        print(f"== {name}: {cfg.epochs} epochs", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = train_fold(cfg, train, val, num_classes, out, log=lambda m: print(m, file=sys.stderr, flush=True))
        train_s = time.perf_counter() - t0
        rows.append(
            {
                "recipe": name,
                "epochs": cfg.epochs,
                "train_s": train_s,
                "best_epoch": result.best_epoch,
                "val_map5": result.best_map5,
                "val_threshold": result.threshold,
                "test_map5": test_map5(cfg, result.checkpoint, float(result.threshold), gallery, queries),
                "history": result.history,
            }
        )
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows])
    md = table.to_markdown(index=False, floatfmt=".4f")
    print(md)
    env = {"machine": machine_summary(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(args.out, {"fold": args.fold, "environment": env, "rows": rows, "markdown": md})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
