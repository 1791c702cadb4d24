"""The pseudo-label round on `make demo`'s recipe: one `whale run` with ``rounds: 2``, so
that both rounds come from the same run, data, detector and crops.

Reports, per round, out-of-fold MAP@5 (what the pipeline tunes on) and test MAP@5
(scored against ``test_truth.csv``: reported, never used to choose), each stage's time,
the pseudo-labelled photos, their calibrated confidence, and how many of them are right
by the test truth (read here only, after the run: the pipeline never reads it).

Each fold's pseudo-labels are chosen by that fold's model among its own training photos
(docs/retrieval.md), so the second round's out-of-fold MAP@5 is an honest figure; the script
also reports, per fold, how many labels are right by the test truth.

Usage (a fresh home; the demo data set is generated in it when WHALE_DATA_DIR is unset)::

    WHALE_HOME=/tmp/pl DAGSTER_HOME=/tmp/pl/dagster_home python benchmarks/pseudo_label_round.py \
        [--min-precision 0.95] [--reuse-first-round] [--warm-start-epochs N] [--no-class-centres] [--out benchmarks/results/pseudo_label_round_demo.json]

``--reuse-first-round``: the home's first round is already materialised (e.g. by ``whale run``
with the same recipe); run round 2's three stages only, and read the first round's figures
from the home's latest materialisations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import machine_summary, print_json, timestamp  # noqa: E402

from whale_assets.instance import prepare_dagster_home  # noqa: E402
from whale_assets.run import DEFAULT_RECIPE, load_recipe, run_pipeline  # noqa: E402
from whale_assets.rounds import Round  # noqa: E402
from whale_assets.stages import round_stages  # noqa: E402
from whale_ml.data.metadata import read_truth  # noqa: E402
from whale_ml.environment import default_data_dir, default_home  # noqa: E402
from whale_ml.home import HomeLayout  # noqa: E402


def first_round_headline() -> dict[str, float | None]:
    """The first round's out-of-fold and test MAP@5 and threshold, from the home's latest materialisations."""
    import dagster as dg

    instance = dg.DagsterInstance.get()

    def meta(key: str, name: str) -> float | None:
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        found = None if event is None or event.asset_materialization is None else event.asset_materialization.metadata.get(name)
        return None if found is None else found.value

    return {"oof_map5": meta("match_threshold", "oof_map5"), "threshold": meta("match_threshold", "threshold"), "map5": meta("submission_score", "map5")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-precision", type=float, default=0.95)
    parser.add_argument("--reuse-first-round", action="store_true", help="run only the round's stages on a materialised home")
    parser.add_argument("--warm-start-epochs", type=int, default=None, help="round 2 starts from round 1's fold models for N epochs")
    parser.add_argument("--no-class-centres", action="store_true", help="match_threshold (both rounds) without class-centre scores")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    home = default_home()
    prepare_dagster_home(home)
    recipe = load_recipe(DEFAULT_RECIPE)
    recipe["rounds"] = 2
    recipe["ops"]["pseudo_labels"] = {"config": {"min_precision": args.min_precision, "min_photos": 10}}
    if args.warm_start_epochs is not None:
        recipe["ops"]["arcface_model"]["config"]["warm_start_epochs"] = args.warm_start_epochs  # round 2 inherits it; round 1 ignores it
    if args.no_class_centres:
        recipe["ops"]["match_threshold"]["config"]["class_centres"] = False  # e.g. to compare with a first round made before they were on
    started = time.time()
    second = Round(2, 2)
    only = [s.name for s in round_stages(second)] if args.reuse_first_round else None
    summary = run_pipeline(recipe, log=lambda msg: print(msg, flush=True), stages=only)
    if args.reuse_first_round:
        summary["rounds"]["round1"] = first_round_headline()
    layout = HomeLayout(home)
    pseudo = pd.read_parquet(layout.tables / "round2" / "pseudo_labels.parquet")
    truth = read_truth(default_data_dir())
    right, per_fold = None, []
    if truth is not None and len(pseudo):
        truth_of = dict(zip(truth["image"], truth["individual_id"], strict=True))
        pseudo["right"] = pseudo["individual_id"] == pseudo["image"].map(truth_of)
        right = float(pseudo["right"].mean())
        per_fold = [{"fold": int(f), "labels": len(g), "right": float(g["right"].mean())} for f, g in pseudo.groupby("fold")]
    timings = summary["timings"]
    round2_s = sum(v for k, v in timings.items() if k.startswith("round2_"))
    rounds = summary["rounds"]
    result = {
        "date": timestamp(started),
        "machine": machine_summary(),
        "min_precision": args.min_precision,
        "warm_start_epochs": args.warm_start_epochs,
        "class_centres": not args.no_class_centres,
        "round1": {k: rounds.get("round1", {}).get(k) for k in ("oof_map5", "map5", "threshold")},
        "round2": {k: rounds.get("round2", {}).get(k) for k in ("oof_map5", "map5", "threshold")},
        "first_round_reused": args.reuse_first_round,
        "pseudo_labels": {
            **rounds.get("round2", {}).get("pseudo_labels", {}),
            "test_photos_labelled": int(pseudo["image"].nunique()),
            "right_by_test_truth": right,
            "per_fold": per_fold,
        },
        "first_round_s": timings["total_s"] - round2_s,
        "round2_s": round2_s,
        "timings": timings,
    }
    print_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
