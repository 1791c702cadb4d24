"""What tuning the fusion weights costs at the Kaggle shape, with class-centre scores.

Synthetic out-of-fold lists of the competition's size (51,000 validation photos, 10
candidates each, 15,600 individuals, random scores): the fusion's weights and exact
threshold tuned with two matchers (21 points), three (the 231-point simplex grid) and the
embedding with class centres alone (21 points). Only the time means anything here.

Usage::

    python benchmarks/fusion_grid_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whale_ml.retrieval.fusion import Calibration, tune_weights  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    n, k, individuals = 51_000, 10, 15_600
    ids = rng.integers(0, individuals, size=(n, k)).astype(str).astype(object)
    sims = -np.sort(-rng.random((n, k)), axis=1)
    truths = [ids[q, 0] if rng.random() < 0.6 else "new_individual" for q in range(n)]
    known = [str(i) for i in range(individuals)]
    inliers, centres = rng.integers(0, 40, size=(n, k)), rng.random((n, k))
    g, loc, c = Calibration(10, -5), Calibration(2, -2), Calibration(10, -5)
    for name, cals, kw in [
        ("embedding + local (21 points)", {"global": g, "local": loc}, {"inliers": inliers}),
        ("embedding + local + centres (231 points)", {"global": g, "local": loc, "centre": c}, {"inliers": inliers, "centre_sims": centres}),
        ("embedding + centres (21 points)", {"global": g, "centre": c}, {"centre_sims": centres}),
    ]:
        start = time.perf_counter()
        result = tune_weights(sims, ids, truths, known, cals, 21, **kw)
        seconds = time.perf_counter() - start
        print(f"{name}: {seconds:.1f} s, {1000 * seconds / len(result.table):.0f} ms a point", flush=True)


if __name__ == "__main__":
    main()
