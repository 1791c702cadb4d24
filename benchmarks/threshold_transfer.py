"""Does the out-of-fold threshold transfer to the final gallery? Measured on a finished run.

The threshold is tuned on out-of-fold predictions: fold f's validation photos
against fold f's training photos, with fold f's model. The submission is made
differently: every training photo is in the gallery, and every fold model
takes part. This script scores the test set (it needs ``test_truth.csv``, as
in the demo set) under each way of combining the models and of carrying the
threshold over, next to the best threshold for the test set itself (an
oracle: what a perfect transfer would reach).

    WHALE_HOME=whale_home .venv/bin/python benchmarks/threshold_transfer.py [--out FILE]

Combinations compared:

* ``concat``: the gallery asset's ensemble -- each model's normalised
  embeddings concatenated and scaled, so a similarity is the mean of the
  models' cosines *for the same pair of photos*, then the best photo per
  individual.
* ``fusion``: each model ranks individuals by its own best photo, and an
  individual's score is the mean over models of those per-model bests
  (the statistic each fold model's threshold was tuned on).
* ``single:foldN``: one fold model alone with the whole gallery.

Thresholds carried over:

* ``oof``: the pooled out-of-fold optimum, as it is.
* ``rate``: the test threshold that says ``new_individual`` first for the same
  share of test photos as the out-of-fold optimum did for validation photos
  (transductive; assumes the test set has as many new individuals as the
  folds hold out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from whale_ml.data.metadata import NEW_INDIVIDUAL, read_train_metadata, read_truth
from whale_ml.retrieval import build_index, map_at_5, predict_top5, search_gallery, tune_threshold
from whale_ml.retrieval.store import ensemble, load_embeddings
from whale_ml.retrieval.threshold import tune_out_of_fold
from whale_ml.stage_configs import ThresholdConfig
from whale_ml.environment import default_data_dir, default_home
from whale_ml.home import HomeLayout

DEPTH = 50  # individuals kept per model before fusing


def oof_threshold(layout: HomeLayout, folds: pd.DataFrame, names: list[str]) -> tuple[float, float, float]:
    """The pipeline's out-of-fold threshold on the embedding similarity alone."""
    tuned = tune_out_of_fold(folds, layout.embeddings_dir, names, ThresholdConfig(rerank=False, class_centres=False))
    return tuned.result.threshold, tuned.result.map5, tuned.result.new_share


def fused(per_model: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over models of each individual's best similarity; a model that did not list an
    individual among its DEPTH best contributes its DEPTH-th similarity (an upper bound)."""
    n = len(per_model[0][0])
    out_s, out_i = np.full((n, 5), -np.inf), np.full((n, 5), "", dtype=object)
    for q in range(n):
        scores: dict[str, list[float]] = {}
        floors = []
        for m, (s, ids) in enumerate(per_model):
            finite = np.isfinite(s[q])
            floors.append(float(s[q][finite][-1]))
            for ident, val in zip(ids[q][finite], s[q][finite], strict=True):
                scores.setdefault(ident, [np.nan] * len(per_model))[m] = float(val)
        ranked = sorted(
            ((float(np.mean([floors[m] if np.isnan(v) else v for m, v in enumerate(vals)])), ident) for ident, vals in scores.items()),
            reverse=True,
        )[:5]
        for j, (val, ident) in enumerate(ranked):
            out_s[q, j], out_i[q, j] = val, ident
    return out_s, out_i


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON results file (default: print only)")
    args = p.parse_args(argv)

    layout, data = HomeLayout(default_home()), default_data_dir()
    truth = read_truth(data)
    if truth is None:
        print(f"{data} has no test_truth.csv: nothing to score", file=sys.stderr)
        return 2
    folds = pd.read_parquet(layout.tables / "cv_folds.parquet")
    names = sorted(p.name for p in layout.embeddings_dir("fold0").parent.iterdir() if p.name.startswith("fold"))
    train = read_train_metadata(data, check_files=False).set_index("image")
    threshold, oof_map5, oof_new_share = oof_threshold(layout, folds, names)

    per_model, train_parts, test_parts = [], [], []
    for name in names:
        g, g_images = load_embeddings(layout.embeddings_dir(name), "train")
        q, q_images = load_embeddings(layout.embeddings_dir(name), "test")
        gallery_ids = train.loc[g_images, "individual_id"].to_numpy(dtype=object)
        per_model.append(search_gallery(build_index(g), gallery_ids, q, k=DEPTH * 4, top=DEPTH))
        train_parts.append(g)
        test_parts.append(q)
    known = set(gallery_ids)
    truths = [t if t in known else NEW_INDIVIDUAL for t in truth.set_index("image").loc[q_images, "individual_id"]]

    variants = {
        "concat": search_gallery(build_index(ensemble(train_parts)), gallery_ids, ensemble(test_parts)),
        "fusion": fused(per_model),
        **{f"single:{n}": (s[:, :5], i[:, :5]) for n, (s, i) in zip(names, per_model, strict=True)},
    }
    rows = []
    for name, (s, ids) in variants.items():
        rate_t = float(np.quantile(s[:, 0], oof_new_share))  # this share of top-1 similarities falls below it
        oracle = tune_threshold(s, ids, truths, gallery_ids=list(known))
        for how, t in (("oof", threshold), ("rate", rate_t)):
            preds = predict_top5(s, ids, t)
            rows.append(
                {
                    "combination": name,
                    "threshold from": how,
                    "threshold": t,
                    "test MAP@5": map_at_5(preds, truths),
                    "oracle MAP@5": oracle.map5,
                    "oracle threshold": oracle.threshold,
                    "oracle new first": oracle.new_share,
                    "new first": float(np.mean([p[0] == NEW_INDIVIDUAL for p in preds])),
                }
            )
    table = pd.DataFrame(rows)
    truth_new = float(np.mean([t == NEW_INDIVIDUAL for t in truths]))
    print(f"out-of-fold: threshold {threshold:.4f}, MAP@5 {oof_map5:.4f}, new first {oof_new_share:.3f}; test: new {truth_new:.3f}")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"oof": {"threshold": threshold, "map5": oof_map5, "new_share": oof_new_share}, "test_new_share": truth_new, "rows": rows},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
