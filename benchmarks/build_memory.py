"""Peak memory of building a gallery index: ``build_index`` (normalises and adds in blocks)
against the whole-copy baseline (normalise the full gallery, then add it), each in a fresh
process on the same synthetic gallery, reported as a ratio measured in the same run.

    python benchmarks/build_memory.py --n 1000000 --kinds flat ivf --out benchmarks/results/build_memory.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import json_child, machine_summary, timestamp, write_json

CHILD = r"""
import json, resource, sys, time
import numpy as np
n, d, kind, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import faiss
faiss.omp_set_num_threads(2)
from whale_ml.retrieval.faiss_index import build_index, l2_normalise
rng = np.random.default_rng(0)
emb = np.empty((n, d), np.float32)
for s in range(0, n, 100_000):  # unnormalised, as a model's raw outputs would be
    emb[s:s + 100_000] = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if how == "blocks":
    index = build_index(emb, kind, nlist=1024)
else:  # the baseline: one normalised copy of the whole gallery
    whole = l2_normalise(emb)
    index = build_index(whole, kind, nlist=1024)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kind": kind, "how": how, "n": n, "d": d, "seconds": seconds,
                  "gallery_mib": emb.nbytes / 2**20, "peak_increase_mib": (peak - before) / 1024, "ntotal": index.ntotal}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for kind in args.kinds:
        for how in ("whole_copy", "blocks"):
            rows.append(json_child([sys.executable, "-c", CHILD, str(args.n), str(args.d), kind, how], f"{kind} {how}"))
            print(rows[-1], flush=True)
    for kind in args.kinds:
        base, new = (next(r for r in rows if r["kind"] == kind and r["how"] == h) for h in ("whole_copy", "blocks"))
        print(
            f"{kind}: peak increase {new['peak_increase_mib']:.0f} MiB vs {base['peak_increase_mib']:.0f} MiB "
            f"({new['peak_increase_mib'] / base['peak_increase_mib']:.2f}x); build {new['seconds']:.1f} s vs {base['seconds']:.1f} s"
        )
    if args.out:
        write_json(args.out, {"date": timestamp(), "machine": machine_summary(), "rows": rows})


if __name__ == "__main__":
    main()
