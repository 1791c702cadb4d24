"""Identification-stage ablation on a finished pipeline home (issue 15).

Every variant reuses the run's fold models, embeddings, boxes and gallery; only the
identification step changes. For each: out-of-fold MAP@5 (the tuning target), the share
of validation photos answered "new" first, test MAP@5 of the submission it would write
(scored against ``test_truth.csv``: reported, never used to choose), and the time it adds.

Variants:

* ``embedding``: the gallery's cosine similarity alone (the pipeline before issue 15).
* ``rerank ...``: local-feature re-ranking fused with it (``whale_ml.retrieval.rerank``),
  the default and its settings one at a time.
* ``qe``/``dba``/``centroid``: query expansion, database-side augmentation and
  individual-centroid augmentation of the embeddings (option 4), out of fold only.
* ``class centres``: each candidate's cosine to its best ArcFace class sub-centre fused as
  a third calibrated score (option 1, ``match_threshold: {config: {class_centres: true}}``),
  alone and with the default re-ranking; needs fold models that kept their centres.

Usage::

    python benchmarks/identification_ablation.py HOME [--quick | --only-centres] [--truth test_truth.csv] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whale_ml.gallery.build import query_embeddings  # noqa: E402
from whale_ml.retrieval.centres import ClassCentres  # noqa: E402
from whale_ml.gallery.search import match_queries  # noqa: E402
from whale_ml.gallery.versions import load_version  # noqa: E402
from whale_ml.home import HomeLayout  # noqa: E402
from whale_ml.retrieval.faiss_index import build_index, l2_normalise, search_gallery  # noqa: E402
from whale_ml.retrieval.local_features import FeatureStore, extract_features, save_features  # noqa: E402
from whale_ml.retrieval.ranking import map_at_5, tune_threshold  # noqa: E402
from whale_ml.retrieval.rerank import LocalRerank  # noqa: E402
from whale_ml.retrieval.threshold import fold_searches, tune_out_of_fold  # noqa: E402
from whale_ml.stage_configs import LocalFeatureConfig  # noqa: E402

RERANK_VARIANTS: list[tuple[str, dict]] = [
    ("rerank (default: SIFT, 256 px, 400 keypoints, 10 candidates x 4 photos)", {}),
    ("rerank ORB", {"method": "orb"}),
    ("rerank SIFT contrast 0.04 (OpenCV default)", {"contrast_threshold": 0.04}),
    ("rerank 192 px", {"size": 192}),
    ("rerank 384 px", {"size": 384}),
    ("rerank 5 candidates", {"candidates": 5}),
    ("rerank 20 candidates", {"candidates": 20}),
    ("rerank 2 photos per candidate", {"per": 2}),
    ("rerank 8 photos per candidate", {"per": 8}),
]
QUICK = {0, 1}


def _features(home: Path, cfg: LocalFeatureConfig, root: Path) -> tuple[FeatureStore, float]:
    boxes = pd.read_parquet(home / "tables/bboxes.parquet")
    meta = pd.concat([pd.read_parquet(home / f"tables/{s}_metadata.parquet") for s in ("train", "test")])
    path = dict(zip(meta["image"], meta["path"], strict=True))
    start = time.perf_counter()
    for split in ("train", "test"):
        rows = boxes[boxes["split"] == split]
        feats, _ = extract_features([path[i] for i in rows["image"]], rows[["x_min", "y_min", "x_max", "y_max"]].to_numpy().tolist(), cfg)
        save_features(root / split, rows["image"].tolist(), feats, cfg)
    return FeatureStore([root / "train", root / "test"]), time.perf_counter() - start


def _test(layout: HomeLayout, value: dict, store: FeatureStore | None, truth: dict[str, str]) -> tuple[float, float, float]:
    version = load_version(layout)
    q, images = query_embeddings(layout, version)
    start = time.perf_counter()
    found = match_queries(version, q, value, None if store is None else [store.get(i) for i in images], store)
    seconds = time.perf_counter() - start
    preds = found.predictions
    return map_at_5(preds, [truth[i] for i in images]), float(np.mean([p[0] == "new_individual" for p in preds])), seconds


def _augmented(layout: HomeLayout, cv: pd.DataFrame, folds: list[str], how: str) -> tuple[float, float]:
    """Out-of-fold MAP@5 and new share with an embedding augmentation (option 4)."""
    sims, ids, truths = [], [], []
    for f in fold_searches(cv, layout.embeddings_dir, folds):
        g, q, gid = f.gallery, f.queries, f.train["individual_id"].to_numpy(dtype=object)
        if how == "qe":  # alpha-query expansion with the best gallery neighbour (alpha 3)
            s = q @ g.T
            top = np.argmax(s, axis=1)
            q = l2_normalise(q + np.clip(s[np.arange(len(q)), top], 0, None)[:, None] ** 3 * g[top])
        elif how == "dba":  # each gallery photo averaged with its best other gallery photo (alpha 3)
            s = g @ g.T
            np.fill_diagonal(s, -np.inf)
            top = np.argmax(s, axis=1)
            g = l2_normalise(g + np.clip(s[np.arange(len(g)), top], 0, None)[:, None] ** 3 * g[top])
        elif how == "centroid":  # each gallery photo plus its individual's mean embedding
            g = l2_normalise(g + pd.DataFrame(g).groupby(gid).transform("mean").to_numpy())
        s, i = search_gallery(build_index(g), gid, q)
        sims.append(s)
        ids.append(i)
        truths += f.val["truth"].tolist()
    r = tune_threshold(np.concatenate(sims), np.concatenate(ids), truths, gallery_ids=cv["individual_id"].unique().tolist())
    return r.map5, r.new_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home", type=Path)
    ap.add_argument("--quick", action="store_true", help="only the default re-ranking and ORB")
    ap.add_argument("--only-centres", action="store_true", help="only the embedding, class centres, the default re-ranking and both")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--truth", type=Path, help="test_truth.csv (default: HOME/demo_data/test_truth.csv, where make demo puts it)")
    args = ap.parse_args()
    home, layout = args.home, HomeLayout(args.home)
    cv = pd.read_parquet(home / "tables/cv_folds.parquet")
    folds = sorted(p.name for p in (home / "embeddings").iterdir())
    truth_df = pd.read_csv(args.truth or home / "demo_data" / "test_truth.csv")
    truth = dict(zip(truth_df["image"], truth_df["individual_id"], strict=True))
    rows = []

    start = time.perf_counter()
    plain = tune_out_of_fold(cv, layout.embeddings_dir, folds)
    oof_s = time.perf_counter() - start
    t_map, t_new, t_s = _test(layout, plain.value(), None, truth)
    rows.append({"variant": "embedding only (before issue 15)", "oof_map5": plain.map5, "oof_new_share": plain.result.new_share,
                 "test_map5": t_map, "test_new_share": t_new, "added_s": 0.0, "weight": None, "ms_per_query": None})
    print(rows[-1], flush=True)
    has_centres = all(ClassCentres.load(layout.embeddings_dir(f)) is not None for f in folds)
    if has_centres:
        start = time.perf_counter()
        tuned = tune_out_of_fold(cv, layout.embeddings_dir, folds, class_centres=True)
        tune_s = time.perf_counter() - start
        t_map, t_new, test_s = _test(layout, tuned.value(), None, truth)
        rows.append({"variant": "class centres (option 1), no re-ranking", "oof_map5": tuned.map5, "oof_new_share": tuned.result.new_share,
                     "test_map5": t_map, "test_new_share": t_new, "added_s": tune_s - oof_s + (test_s - t_s), "weight": None,
                     "centre_weight": tuned.fusion.fusion.centre_weight if tuned.fusion else 0.0, "ms_per_query": None})
        print(rows[-1], flush=True)
    else:
        print("no class centres beside the fold embeddings (fold models trained before they were kept): option 1 left out", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, over) in enumerate(RERANK_VARIANTS):
            if (args.quick and n not in QUICK) or (args.only_centres and n != 0):
                continue
            over = dict(over)
            k, per = over.pop("candidates", 10), over.pop("per", 4)
            cfg = LocalFeatureConfig(**over)
            store, feat_s = _features(home, cfg, Path(tmp) / str(n))
            start = time.perf_counter()
            tuned = tune_out_of_fold(cv, layout.embeddings_dir, folds, rerank=LocalRerank(cfg, k, per), features=store)
            tune_s = time.perf_counter() - start - oof_s
            t_map, t_new, test_s = _test(layout, tuned.value(), store, truth)
            assert tuned.fusion is not None and tuned.rerank_cost is not None
            rows.append({"variant": name, "oof_map5": tuned.result.map5, "oof_new_share": tuned.result.new_share, "test_map5": t_map,
                         "test_new_share": t_new, "added_s": feat_s + tune_s + (test_s - t_s), "weight": tuned.fusion.fusion.weight,
                         "ms_per_query": tuned.rerank_cost.ms_per_query, "features_s": feat_s})
            print(rows[-1], flush=True)
            if n == 0 and has_centres:  # the default re-ranking plus class centres: the grid on the simplex
                start = time.perf_counter()
                both = tune_out_of_fold(
                    cv, layout.embeddings_dir, folds, rerank=LocalRerank(cfg, k, per), features=store, class_centres=True
                )
                both_s = time.perf_counter() - start - oof_s
                t_map, t_new, test_s = _test(layout, both.value(), store, truth)
                assert both.fusion is not None and both.rerank_cost is not None
                rows.append({"variant": f"{name} + class centres (option 1)", "oof_map5": both.result.map5,
                             "oof_new_share": both.result.new_share, "test_map5": t_map, "test_new_share": t_new,
                             "added_s": feat_s + both_s + (test_s - t_s), "weight": both.fusion.fusion.weight,
                             "centre_weight": both.fusion.fusion.centre_weight, "ms_per_query": both.rerank_cost.ms_per_query,
                             "features_s": feat_s, "tune_s": both_s, "tune_s_without_centres": tune_s})
                print(rows[-1], flush=True)
    for how in () if args.only_centres else ("qe", "dba", "centroid"):
        m, new = _augmented(layout, cv, folds, how)
        rows.append({"variant": f"{how} (option 4, embedding only)", "oof_map5": m, "oof_new_share": new, "test_map5": None,
                     "test_new_share": None, "added_s": None, "weight": None, "ms_per_query": None})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
