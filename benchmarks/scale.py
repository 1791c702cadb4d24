#!/usr/bin/env python
"""Galleries past a million photos: approximate faiss indexes against exact search.

    python benchmarks/scale.py                       # 1,000,000 x 512 (14-21 min on 2 cores, ~9 GB RAM at peak)
    python benchmarks/scale.py --n 100000 --out /tmp/scale_100k.json   # a tenth: to extrapolate first (a few minutes)
    python benchmarks/scale.py --n 100000 --data uniform --out /tmp/u.json  # the degenerate case: no structure

A synthetic gallery shaped like a real one: ``--individuals`` identities (200,000
at 1M photos), each an L2-normalised centre near one of 30 "species" directions,
with a heavy tail of photos per individual (every individual at least once, mean
n / individuals), each photo its centre plus Gaussian noise of twice its norm
(``--noise``): cosine ~0.45 to its centre, ~0.2 between two photos of one
individual, ~0.05 between individuals of one species, ~0 otherwise, so that
exact search finds the query's own individual first ~90% of the time, not always. Queries are new noisy photos of gallery individuals, as
re-sightings are. ``--data uniform`` draws every vector uniformly on the sphere
instead: nothing is near anything, the worst case for every approximate index.

The baseline is exact search (``build_index(kind="flat")``, a faiss
``IndexFlatIP``) measured in the same run. Every candidate is built by the
project's ``whale_ml.retrieval.build_index(kind=...)``; for each it reports build
time (train + add), query time per 1,000 queries (``search_gallery`` at the
pipeline's k=50, which collapses neighbours to five individuals, and the raw
``index.search`` at k=5), the serialised index size and the resident-memory
increase while building (peak) and after (held), and recall@5 against flat, per
photo and per individual (``index_recall``'s definitions), each as a ratio of
flat's number. IVF kinds are also searched at several ``nprobe`` and HNSW at
several ``efSearch`` on the same built index.

faiss uses ``--threads`` OpenMP threads (default 2). Writes JSON (``--out``,
default ``benchmarks/results/scale_1m.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

# Before faiss loads OpenMP: idle threads sleep instead of spinning. On a machine shared with
# other jobs, spinning threads starve each other (IVF-PQ training ran 3-5x slower here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss
import numpy as np
from common import RESULTS, best_time, environment, mib, reset_peak_rss, save_results, status_kib

from whale_ml.retrieval import build_index, index_recall, map_at_5, search_gallery
from whale_ml.retrieval.ranking import TOP

PIPELINE_K = 50  # GalleryConfig.k: neighbours fetched per query before collapsing to five individuals
SPECIES = 30
BLOCK = 65536


# --------------------------------------------------------------------------- data


def _normalise_rows(x: np.ndarray) -> None:
    for s in range(0, len(x), BLOCK):  # in place, in blocks: no full-size temporaries
        blk = x[s : s + BLOCK]
        blk /= np.sqrt(np.einsum("ij,ij->i", blk, blk))[:, None]


def _photos_of(centres: np.ndarray, codes: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    d = centres.shape[1]
    out = np.empty((len(codes), d), dtype=np.float32)
    for s in range(0, len(codes), BLOCK):
        c = codes[s : s + BLOCK]
        out[s : s + len(c)] = centres[c] + rng.standard_normal((len(c), d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
    _normalise_rows(out)
    return out


def make_data(
    n: int, d: int, n_ind: int, n_q: int, structure: str, seed: int, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, d), gallery individual ids (n,), queries (n_q, d), query individual ids (n_q,)):
    float32 unit rows."""
    rng = np.random.default_rng(seed)
    if structure == "uniform":
        gallery = rng.standard_normal((n, d), dtype=np.float32)
        queries = rng.standard_normal((n_q, d), dtype=np.float32)
        _normalise_rows(gallery)
        _normalise_rows(queries)
        codes = rng.integers(0, n_ind, size=n)
        q_codes = rng.integers(0, n_ind, size=n_q)
    else:
        species = rng.standard_normal((SPECIES, d), dtype=np.float32)
        _normalise_rows(species)
        centres = rng.standard_normal((n_ind, d), dtype=np.float32) / np.float32(np.sqrt(d))
        centres += np.float32(0.5) * species[rng.integers(0, SPECIES, size=n_ind)]
        _normalise_rows(centres)
        # Every individual at least once, then a heavy tail (p ~ (rank + 20)^-1.2) as in Kaggle's train set.
        w = (np.arange(n_ind) + 20.0) ** -1.2
        codes = rng.permutation(np.concatenate([np.arange(n_ind), rng.choice(n_ind, n - n_ind, p=w / w.sum())]))
        gallery = _photos_of(centres, codes, noise, rng)
        q_codes = codes[rng.integers(0, n, size=n_q)]
        queries = _photos_of(centres, q_codes, noise, rng)  # re-sightings
        del centres

    def name(c: np.ndarray) -> np.ndarray:
        return np.array([f"ind{x:07d}" for x in c.tolist()], dtype=object)

    return gallery, name(codes), queries, name(q_codes)


# --------------------------------------------------------------------------- measurements


class Exact:
    """Exact neighbours of the queries, computed once: the reference for every recall."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, queries: np.ndarray, truths: np.ndarray) -> None:
        k = min(TOP, index.ntotal)
        _, self.rows = index.search(queries, k)
        _, self.individuals = search_gallery(index, ids, queries, k=PIPELINE_K)
        self.k = k
        self.truths = truths.tolist()
        self.map5 = map_at_5(self.individuals.tolist(), self.truths)

    def recall(self, index: faiss.Index, ids: np.ndarray, queries: np.ndarray) -> dict[str, float]:
        """``index_recall``'s two numbers, against the cached exact results."""
        _, got = index.search(queries, self.k)
        image = np.mean([len(set(a) & set(b[b >= 0])) / self.k for a, b in zip(self.rows, got, strict=True)])
        _, got_ids = search_gallery(index, ids, queries, k=PIPELINE_K)
        per_query = [len(set(a) & set(b) - {""}) / max(1, len(set(a) - {""})) for a, b in zip(self.individuals, got_ids, strict=True)]
        return {
            "image_recall_at_5": float(image),
            "individual_recall_at_5": float(np.mean(per_query)),
            # What the score sees: MAP@5 of the query's own individual (every query is a re-sighting).
            "map5": map_at_5(got_ids.tolist(), self.truths),
        }


def query_times(index: faiss.Index, ids: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """Seconds per 1,000 queries: the pipeline's search and the raw faiss call (best of 2 when quick)."""
    per_k = 1000.0 / len(queries)
    pipeline_s, _ = best_time(lambda: search_gallery(index, ids, queries, k=PIPELINE_K))
    if pipeline_s < 20:
        pipeline_s = min(pipeline_s, best_time(lambda: search_gallery(index, ids, queries, k=PIPELINE_K))[0])
    raw_s, _ = best_time(lambda: index.search(queries, TOP), 2 if pipeline_s < 20 else 1)
    return {"search_gallery_k50_per_1k_s": pipeline_s * per_k, "index_search_k5_per_1k_s": raw_s * per_k}


def build_measured(gallery: np.ndarray, kind: str, params: dict) -> tuple[faiss.Index, dict]:
    """Build with ``build_index``; wall time, and resident memory: peak increase and held increase."""
    gc.collect()
    rss0 = status_kib("VmRSS")
    reset = reset_peak_rss()
    t = time.perf_counter()
    index = build_index(gallery, kind, **params)
    build_s = time.perf_counter() - t
    gc.collect()
    peak = status_kib("VmHWM") if reset else None
    held = status_kib("VmRSS") - rss0
    blob = faiss.serialize_index(index)
    size = int(blob.nbytes)
    del blob
    return index, {
        "build_s": build_s,
        "serialised_bytes": size,
        "rss_held_increase_bytes": held * 1024,
        "rss_peak_increase_bytes": (peak - rss0) * 1024 if peak is not None else None,
    }


def sweep(index: faiss.Index, kind: str, values: list[int], exact: Exact, ids, queries) -> list[dict]:
    """Query-time knobs on one built index: IVF's nprobe, HNSW's efSearch."""
    rows = []
    for v in values:
        if kind in ("ivf", "ivfpq"):
            index.nprobe = min(v, index.nlist)
            knob = {"nprobe": index.nprobe}
        else:
            index.hnsw.efSearch = v
            knob = {"ef_search": v}
        rows.append({**knob, **query_times(index, ids, queries), **exact.recall(index, ids, queries)})
        print(f"    {kind} {knob}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    flat = res["indexes"]["flat"]
    n = res["config"]["n"]
    lines = [
        (
            f"| index ({n:,} x {res['config']['dim']}) | build | query / 1k (k=50, `search_gallery`) | query / 1k (k=5, raw) "
            "| serialised | RSS peak / held while building | recall@5 photos | recall@5 individuals | MAP@5 (flat's) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(x: float, base: float) -> str:
        return f"{x / base:.2f}x" if base else "n/a"

    for name, r in res["indexes"].items():
        for s in r["settings"]:
            knob = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("nprobe", "ef_search"))
            label = f"`{name}`" + (f" ({r['label']}{', ' + knob if knob else ''})" if r.get("label") or knob else "")
            fs = flat["settings"][0]
            lines.append(
                f"| {label} | {r['build_s']:.1f} s ({ratio(r['build_s'], flat['build_s'])}) "
                f"| {s['search_gallery_k50_per_1k_s']:.2f} s ({ratio(s['search_gallery_k50_per_1k_s'], fs['search_gallery_k50_per_1k_s'])}) "
                f"| {s['index_search_k5_per_1k_s']:.3f} s ({ratio(s['index_search_k5_per_1k_s'], fs['index_search_k5_per_1k_s'])}) "
                f"| {mib(r['serialised_bytes'])} ({ratio(r['serialised_bytes'], flat['serialised_bytes'])}) "
                f"| {mib(r['rss_peak_increase_bytes'])} / {mib(r['rss_held_increase_bytes'])} "
                f"| {s['image_recall_at_5']:.4f} | {s['individual_recall_at_5']:.4f} | {s['map5']:.4f} ({fs['map5']:.4f}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="gallery photos")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--individuals", type=int, default=None, help="default n / 5")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--noise", type=float, default=2.0, help="photo noise norm relative to the centre's (2: cosine ~0.45 to it)")
    p.add_argument("--data", choices=["structured", "uniform"], default="structured")
    p.add_argument("--kinds", default="ivf,ivfpq,hnsw", help="candidates, in order (flat is always measured first)")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default: build_index's 4*sqrt(n))")
    p.add_argument("--nprobe", default="16,32,64", help="IVF nprobe values; the first is the one built with")
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--hnsw-m", type=int, default=16, help="HNSW links per node (efConstruction = max(40, 2M))")
    p.add_argument("--ef-search", default="64,128", help="HNSW efSearch values; the first is the one built with")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=20261128)
    p.add_argument("--out", type=Path, default=RESULTS / "scale_1m.json")
    args = p.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    n_ind = args.individuals or max(1, args.n // 5)
    nprobes = [int(x) for x in args.nprobe.split(",")]
    efs = [int(x) for x in args.ef_search.split(",")]
    res: dict = {
        "environment": environment("numpy", "faiss", faiss_threads=args.threads),
        "config": {
            "n": args.n,
            "dim": args.dim,
            "individuals": n_ind,
            "queries": args.queries,
            "data": args.data,
            "noise": args.noise,
            "pipeline_k": PIPELINE_K,
            "seed": args.seed,
            "argv": sys.argv,
        },
        "indexes": {},
    }
    t0 = time.perf_counter()
    print(f"data: {args.n:,} x {args.dim} ({args.data}) ...", file=sys.stderr, flush=True)
    gen_s, (gallery, ids, queries, query_ids) = best_time(
        lambda: make_data(args.n, args.dim, n_ind, args.queries, args.data, args.seed, args.noise)
    )
    res["data"] = {
        "generate_s": gen_s,
        "gallery_bytes": int(gallery.nbytes),
        "photos_per_individual_max": int(np.unique(ids, return_counts=True)[1].max()),
        "individuals_in_gallery": len(set(ids.tolist())),
    }

    print("flat (exact baseline) ...", file=sys.stderr, flush=True)
    flat, m = build_measured(gallery, "flat", {})
    exact = Exact(flat, ids, queries, query_ids)
    # How much structure the data have: exact search finds the query's own individual first this often.
    res["data"]["exact_top1_is_own_individual"] = float(np.mean(exact.individuals[:, 0] == query_ids))
    res["data"]["exact_top5_has_own_individual"] = float(np.mean([q in set(r) for q, r in zip(query_ids, exact.individuals, strict=True)]))
    # Flat is the reference: its recall is 1 by definition (not searched a third time; at 1M that is minutes).
    flat_setting = {**query_times(flat, ids, queries), "image_recall_at_5": 1.0, "individual_recall_at_5": 1.0, "map5": exact.map5}
    res["indexes"]["flat"] = {**m, "params": {}, "settings": [flat_setting]}
    save_results(res, args.out, markdown, t0)
    print(f"    flat: {res['indexes']['flat']}", file=sys.stderr, flush=True)

    for i, kind in enumerate(k for k in args.kinds.split(",") if k):
        params: dict = {}
        label = ""
        if kind in ("ivf", "ivfpq"):
            params = {"nlist": args.nlist, "nprobe": nprobes[0]}
            if kind == "ivfpq":
                params.update(pq_m=args.pq_m, pq_nbits=8)
                label = f"m={args.pq_m}, 8 bits"
        elif kind == "hnsw":
            params = {"hnsw_m": args.hnsw_m, "ef_search": efs[0]}
            label = f"M={args.hnsw_m}, efConstruction={max(40, 2 * args.hnsw_m)}"
        print(f"{kind} {params} ...", file=sys.stderr, flush=True)
        index, m = build_measured(gallery, kind, params)
        if kind in ("ivf", "ivfpq"):
            label = (f"nlist={index.nlist}, " + label).rstrip(", ")
        print(f"    built: {m}", file=sys.stderr, flush=True)
        settings = sweep(index, kind, nprobes if kind != "hnsw" else efs, exact, ids, queries)
        entry = {**m, "label": label, "params": params, "settings": settings}
        if i == 0:
            # The project's own recall function at the built setting, reusing flat: the cached numbers
            # above must agree with it (same definitions). Once: each call searches flat twice more.
            if kind == "hnsw":
                index.hnsw.efSearch = params["ef_search"]
            else:
                index.nprobe = min(params["nprobe"], index.nlist)
            own = index_recall(index, gallery, ids, queries, max_queries=len(queries), exact=flat)
            entry["index_recall"] = own
            entry["index_recall_agrees"] = (
                abs(own["image_recall_at_k"] - settings[0]["image_recall_at_5"]) < 1e-9
                and abs(own["individual_recall_at_k"] - settings[0]["individual_recall_at_5"]) < 1e-9
            )
        res["indexes"][kind] = entry
        del index
        gc.collect()
        save_results(res, args.out, markdown, t0)  # after each index: a run stopped later keeps what it measured

    save_results(res, args.out, markdown, t0)
    print(res["markdown"])
    print(f"\nResults: {args.out}  ({res['total_s']:.0f} s)")
    return 0 if all(r.get("index_recall_agrees", True) for r in res["indexes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
