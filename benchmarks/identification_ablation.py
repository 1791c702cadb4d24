"""Identification-stage ablation on a finished pipeline home.

Every variant reuses the run's fold models, embeddings, boxes and gallery; only the
identification step changes. For each: out-of-fold MAP@5 (the tuning target), the share
of validation photos answered "new" first, test MAP@5 of the submission it would write
(scored against ``test_truth.csv``: reported, never used to choose), and the time it adds.

Variants:

* ``embedding``: the gallery's cosine similarity alone (no fusion).
* ``rerank ...``: local-feature re-ranking fused with it (``whale_ml.retrieval.rerank``),
  the default and its settings one at a time.
* ``qe``/``dba``/``centroid``: query expansion, database-side augmentation and
  individual-centroid augmentation of the embeddings (graph re-ranking), out of fold only.
* ``class centres``: each candidate's cosine to its best ArcFace class sub-centre fused as
  a third calibrated score (``match_threshold: {config: {class_centres: true}}``),
  alone and with the default re-ranking; needs fold models that kept their centres.
* ``+ lead_weight``: the new_individual decision from the first candidate's lead over the second
  too (the lead rule, ``whale_ml.retrieval.lead``), on the embedding ranking and on the default
  re-ranking (the home's own ``local_features``); the weight grid ``LEAD_WEIGHTS``. Beside
  the pooled out-of-fold MAP@5 (tuned and scored on the same photos, so never below the
  plain rule's), a **cross-fold** figure: the weight and threshold tuned on one fold's
  validation photos, scored on each other fold's, averaged -- the honest out-of-fold test
  of whether the extra parameter helps. The same for the per-rank alternative rule
  (every candidate judged by its lead over the next, prefix minima) as a comparison.

Usage::

    python benchmarks/identification_ablation.py HOME [--quick | --only-centres | --lead-only] [--truth test_truth.csv] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from whale_ml.gallery.versions import load_version  # noqa: E402
from whale_ml.home import HomeLayout  # noqa: E402
from whale_ml.retrieval.faiss_index import build_index, l2_normalise, search_gallery  # noqa: E402
from whale_ml.retrieval.local_features import FeatureStore, extract_features, home_feature_store, save_features  # noqa: E402
from whale_ml.retrieval.lead import LEAD_WEIGHTS, tune_lead  # noqa: E402
from whale_ml.retrieval.ranking import (  # noqa: E402
    known_truths,
    tune_collapsed,
    collapse_by_individual,
    decision_scores,
    map_at_5,
    predict_top5,
    tune_threshold,
)
from whale_ml.retrieval.matcher import Matcher, match_queries  # noqa: E402
from whale_ml.retrieval.threshold import OutOfFoldThreshold, fold_searches, tune_out_of_fold  # noqa: E402
from whale_ml.stage_configs import LocalFeatureConfig, ThresholdConfig  # noqa: E402

PLAIN = ThresholdConfig(rerank=False, class_centres=False)  # the embedding similarity alone

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


def _test(layout: HomeLayout, matcher: Matcher, store: FeatureStore | None, truth: dict[str, str]) -> tuple[float, float, float]:
    version = load_version(layout)
    q, images = query_embeddings(layout, version)
    start = time.perf_counter()
    found = match_queries(version, q, matcher, None if store is None else [store.get(i) for i in images], store)
    seconds = time.perf_counter() - start
    preds = found.predictions
    return map_at_5(preds, [truth[i] for i in images]), float(np.mean([p[0] == "new_individual" for p in preds])), seconds


def _augmented(layout: HomeLayout, cv: pd.DataFrame, folds: list[str], how: str) -> tuple[float, float]:
    """Out-of-fold MAP@5 and new share with an embedding augmentation (graph re-ranking)."""
    sims, ids, truths = [], [], []
    for f in fold_searches(cv, {fold: layout.embeddings_dir(fold) for fold in folds}, PLAIN.k, 5):
        g, q, gid = f.gallery.embeddings, f.queries, f.gallery.table["individual_id"].to_numpy(dtype=object)
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


def _per_rank_scores(sims: np.ndarray, w: float) -> np.ndarray:
    """The alternative rule: every candidate j judged by s_j + w (s_j - s_{j+1}) (no lead for the
    last listed or where the next is missing), new_individual before the first whose running
    minimum is below the threshold (prefix minima keep the rows sorted, so tuning stays exact)."""
    nxt = np.concatenate([sims[:, 1:], np.full((len(sims), 1), -np.inf)], axis=1)
    both = np.isfinite(sims) & np.isfinite(nxt)
    d = np.where(both, sims + w * (np.where(both, sims, 0.0) - np.where(both, nxt, 0.0)), sims)
    return np.minimum.accumulate(d, axis=1)


def _rule_scores(sims: np.ndarray, rule: str, w: float) -> np.ndarray:
    """The decision scores of ``rule``: ``plain`` (w ignored: 0), ``first`` (the pipeline's) or ``per_rank``."""
    return _per_rank_scores(sims, w) if rule == "per_rank" else decision_scores(sims, w if rule == "first" else 0.0)


def _tune_rule(sims: np.ndarray, ids: np.ndarray, truths: np.ndarray, rule: str, weights: tuple[float, ...]) -> tuple[float, float, float]:
    """(weight, threshold, MAP@5) of the best weight of ``rule`` on collapsed lists, smallest weight among equals."""
    best = None
    for w in sorted(weights):
        r = tune_collapsed(_rule_scores(sims, rule, w), ids, truths)
        if best is None or r.map5 > best[2] + 1e-12:
            best = (w, r.threshold, r.map5)
    assert best is not None
    return best


def _score_rule(sims: np.ndarray, ids: np.ndarray, truths: np.ndarray, rule: str, w: float, t: float) -> float:
    return map_at_5(predict_top5(_rule_scores(sims, rule, w), ids, t), truths.tolist())


def _cross_fold(tuned: OutOfFoldThreshold, known: list[str], rule: str, weights: tuple[float, ...]) -> float:
    """Tuned on one fold's validation photos, scored on every other fold's: the mean over ordered pairs."""
    sims, ids, _ = collapse_by_individual(tuned.sims, tuned.ids)
    truths = known_truths(tuned.truths, len(sims), tuned.ids, known)
    bounds = np.cumsum([0] + [f["queries"] for f in tuned.per_fold])
    parts = [slice(bounds[i], bounds[i + 1]) for i in range(len(tuned.per_fold))]
    scores = []
    for i, a in enumerate(parts):
        w, t, _ = _tune_rule(sims[a], ids[a], truths[a], rule, weights)
        scores += [_score_rule(sims[b], ids[b], truths[b], rule, w, t) for j, b in enumerate(parts) if j != i]
    return float(np.mean(scores))


def _fastest(fn: object, repeat: int = 7) -> float:
    """The fastest of ``repeat`` calls, in seconds (this machine is shared: the minimum is the steady figure)."""
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return float(best)


def _split_half(
    tuned: OutOfFoldThreshold, known: list[str], rule: str, weights: tuple[float, ...], reps: int = 100, seed: int = 0
) -> np.ndarray:
    """MAP@5 on a random half of the validation individuals with the weight and threshold tuned on
    the other half, ``reps`` times (the same halves for every rule, by ``seed``): a steadier
    out-of-fold test than one fold against another. New photos are their own group each."""
    sims, ids, _ = collapse_by_individual(tuned.sims, tuned.ids)
    truths = known_truths(tuned.truths, len(sims), tuned.ids, known)
    groups = np.array([t if t != "new_individual" else f"new:{q}" for q, t in enumerate(truths)], dtype=object)
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        half = set(rng.permutation(names)[: len(names) // 2])
        a = np.array([g in half for g in groups])
        w, t, _ = _tune_rule(sims[a], ids[a], truths[a], rule, weights)
        out.append(_score_rule(sims[~a], ids[~a], truths[~a], rule, w, t))
    return np.array(out)


def _lead_rows(
    name: str, tuned: OutOfFoldThreshold, known: list[str], layout: HomeLayout, store: FeatureStore | None, truth: dict[str, str]
) -> list[dict]:
    """The lead rule on an already tuned ranking: the plain rule, the lead rule and the per-rank alternative."""
    start = time.perf_counter()
    lead = tune_lead(tuned.sims, tuned.ids, tuned.truths, known, LEAD_WEIGHTS)
    tune_s = time.perf_counter() - start
    p_map, p_new, _ = _test(layout, tuned.matcher, store, truth)
    t_map, t_new, _ = _test(layout, dataclasses.replace(tuned.matcher, threshold=lead.threshold.threshold, lead_weight=lead.weight), store, truth)
    # At test the lead rule adds one vectorised step to the decision: timed on the out-of-fold lists.
    rule_s = _fastest(lambda: predict_top5(tuned.sims, tuned.ids, lead.threshold.threshold, lead_weight=lead.weight))
    rule_s -= _fastest(lambda: predict_top5(tuned.sims, tuned.ids, lead.threshold.threshold))
    halves = {rule: _split_half(tuned, known, rule, weights) for rule, weights in [("plain", (0.0,)), ("first", LEAD_WEIGHTS),
                                                                                    ("per_rank", LEAD_WEIGHTS)]}

    def gain(rule: str) -> dict[str, float]:
        diff = halves[rule] - halves["plain"]
        return {"split_half_map5": float(halves[rule].mean()), "split_half_gain": float(diff.mean()),
                "split_half_gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff))), "split_half_wins": float((diff > 0).mean())}

    rows = [
        {"variant": name, "oof_map5": lead.plain.map5, "oof_new_share": lead.plain.new_share, "test_map5": p_map,
         "test_new_share": p_new, "added_s": 0.0, "weight": 0.0, "cross_fold_map5": _cross_fold(tuned, known, "first", (0.0,)),
         "split_half_map5": float(halves["plain"].mean())},
        {"variant": f"{name} + lead_weight (first candidate's lead)", "oof_map5": lead.threshold.map5,
         "oof_new_share": lead.threshold.new_share, "test_map5": t_map, "test_new_share": t_new, "added_s": tune_s,
         "rule_ms_added": 1e3 * rule_s, "weight": lead.weight, "cross_fold_map5": _cross_fold(tuned, known, "first", LEAD_WEIGHTS),
         **gain("first"), "lead_table": lead.table.to_dict("records")},
    ]
    sims, ids, _ = collapse_by_individual(tuned.sims, tuned.ids)
    w, _, m = _tune_rule(sims, ids, known_truths(tuned.truths, len(sims), tuned.ids, known), "per_rank", LEAD_WEIGHTS)
    rows.append({"variant": f"{name} + lead_weight, per-rank alternative (not offered)", "oof_map5": m, "weight": w,
                 "cross_fold_map5": _cross_fold(tuned, known, "per_rank", LEAD_WEIGHTS), **gain("per_rank")})
    for r in rows:
        print({k: v for k, v in r.items() if k != "lead_table"}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home", type=Path)
    ap.add_argument("--quick", action="store_true", help="only the default re-ranking and ORB")
    ap.add_argument("--only-centres", action="store_true", help="only the embedding, class centres, the default re-ranking and both")
    ap.add_argument("--lead-only", action="store_true", help="only the lead rule: embedding and default re-ranking")
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
    plain = tune_out_of_fold(cv, layout.embeddings_dir, folds, PLAIN)
    oof_s = time.perf_counter() - start
    # The margin rule on the embedding ranking and on the default re-ranking (the home's own local features).
    known = cv["individual_id"].unique().tolist()
    if not args.only_centres:
        rows += _lead_rows("embedding only", plain, known, layout, None, truth)
        store = home_feature_store(layout)
        assert store.config is not None, "the home's local_features asset has no settings"
        fused = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(class_centres=False), store)
        rows += _lead_rows("re-ranking (the home's features)", fused, known, layout, store, truth)
    if args.lead_only:
        _report(rows, args.out)
        return
    t_map, t_new, t_s = _test(layout, plain.matcher, None, truth)
    rows.append({"variant": "embedding only", "oof_map5": plain.map5, "oof_new_share": plain.result.new_share,
                 "test_map5": t_map, "test_new_share": t_new, "added_s": 0.0, "weight": None, "ms_per_query": None})
    print(rows[-1], flush=True)
    has_centres = all(ClassCentres.load(layout.embeddings_dir(f)) is not None for f in folds)
    if has_centres:
        start = time.perf_counter()
        tuned = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(rerank=False))
        tune_s = time.perf_counter() - start
        t_map, t_new, test_s = _test(layout, tuned.matcher, None, truth)
        rows.append({"variant": "class centres , no re-ranking", "oof_map5": tuned.map5, "oof_new_share": tuned.result.new_share,
                     "test_map5": t_map, "test_new_share": t_new, "added_s": tune_s - oof_s + (test_s - t_s), "weight": None,
                     "centre_weight": tuned.fusion.fusion.centre_weight if tuned.fusion else 0.0, "ms_per_query": None})
        print(rows[-1], flush=True)
    else:
        print("no class centres beside the fold embeddings (none in the fold models' best.pt): class centres left out", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, over) in enumerate(RERANK_VARIANTS):
            if (args.quick and n not in QUICK) or (args.only_centres and n != 0):
                continue
            over = dict(over)
            k, per = over.pop("candidates", 10), over.pop("per", 4)
            cfg = LocalFeatureConfig(**over)
            store, feat_s = _features(home, cfg, Path(tmp) / str(n))
            start = time.perf_counter()
            tuned = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(candidates=k, photos_per_candidate=per, class_centres=False), store)
            tune_s = time.perf_counter() - start - oof_s
            t_map, t_new, test_s = _test(layout, tuned.matcher, store, truth)
            assert tuned.fusion is not None and tuned.rerank_cost is not None
            rows.append({"variant": name, "oof_map5": tuned.result.map5, "oof_new_share": tuned.result.new_share, "test_map5": t_map,
                         "test_new_share": t_new, "added_s": feat_s + tune_s + (test_s - t_s), "weight": tuned.fusion.fusion.local_weight,
                         "ms_per_query": tuned.rerank_cost.ms_per_query, "features_s": feat_s})
            print(rows[-1], flush=True)
            if n == 0 and has_centres:  # the default re-ranking plus class centres: the grid on the simplex
                start = time.perf_counter()
                both = tune_out_of_fold(cv, layout.embeddings_dir, folds, ThresholdConfig(candidates=k, photos_per_candidate=per), store)
                both_s = time.perf_counter() - start - oof_s
                t_map, t_new, test_s = _test(layout, both.matcher, store, truth)
                assert both.fusion is not None and both.rerank_cost is not None
                rows.append({"variant": f"{name} + class centres", "oof_map5": both.result.map5,
                             "oof_new_share": both.result.new_share, "test_map5": t_map, "test_new_share": t_new,
                             "added_s": feat_s + both_s + (test_s - t_s), "weight": both.fusion.fusion.local_weight,
                             "centre_weight": both.fusion.fusion.centre_weight, "ms_per_query": both.rerank_cost.ms_per_query,
                             "features_s": feat_s, "tune_s": both_s, "tune_s_without_centres": tune_s})
                print(rows[-1], flush=True)
    for how in () if args.only_centres else ("qe", "dba", "centroid"):
        m, new = _augmented(layout, cv, folds, how)
        rows.append({"variant": f"{how} (graph re-ranking, embedding only)", "oof_map5": m, "oof_new_share": new, "test_map5": None,
                     "test_new_share": None, "added_s": None, "weight": None, "ms_per_query": None})
        print(rows[-1], flush=True)
    _report(rows, args.out)


def _report(rows: list[dict], out: Path | None) -> None:
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "lead_table"} for r in rows])
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
