#!/usr/bin/env python
"""What the catalogue's guarantees cost, each against its baseline in the same run.

    python benchmarks/catalogue_writes.py --out benchmarks/results/catalogue_writes.json

* Publishing a gallery version (``write_version``: index, embeddings, table, staged,
  flushed, renamed, pointer moved) of ``--rows`` x ``--dim`` (default: the competition's
  51,033 training photos, a 512-d ensemble), with its files flushed to disk before the
  rename (the default) against ``WHALE_FSYNC=0`` (no flush: survives a kill, not a power cut).
* Taking and releasing the catalogue's writer lock (``catalogue_lock``), per call.
* Loading a fold model for enrolment: hashing ``best.pt`` while copying it into the model
  cache (``snapshot_checkpoint``, so the bytes loaded are the bytes hashed) against hashing
  it alone (``sha256_file``, then loading the file by path), for a ``--checkpoint-mib`` file.

Rounds are interleaved so that load drift weighs on both sides alike; the best of
``--rounds`` is kept.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import best_time, environment, write_json

from whale_ml.checkpoints import snapshot_checkpoint
from whale_ml.gallery import FoldModel, GalleryLineage, write_version
from whale_ml.gallery.catalogue import catalogue_lock
from whale_ml.home import HomeLayout
from whale_ml.io import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=51_033)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--checkpoint-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent, help="where the scratch home goes (its disk)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="catalogue-bench-", dir=args.dir) as scratch:
        layout = HomeLayout(Path(scratch) / "home")
        rng = np.random.default_rng(0)
        emb = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        table = pd.DataFrame(
            {"image": [f"{i:08x}.jpg" for i in range(args.rows)], "individual_id": [f"{i % 15_587:012x}" for i in range(args.rows)],
             "species": "humpback_whale", "crop_path": "", "source": "pipeline"}
        )
        lineage = GalleryLineage(
            models=[FoldModel(fold="fold0", checkpoint_sha256="0" * 64)], detector_sha256=None, detector_imgsz=640,
            min_confidence=0.25, expand=1.2, crop_size=512, resize="letterbox",
        )
        publish: dict[str, list[float]] = {"no flush (WHALE_FSYNC=0)": [], "flushed (default)": []}
        for _ in range(args.rounds):
            for mode, fsync in (("no flush (WHALE_FSYNC=0)", "0"), ("flushed (default)", "1")):
                os.environ["WHALE_FSYNC"] = fsync
                publish[mode].append(best_time(lambda: write_version(layout, table, emb, lineage, made_by="benchmark"))[0])
        os.environ.pop("WHALE_FSYNC", None)

        def lock_once() -> None:
            with catalogue_lock(layout, "benchmark"):
                pass

        lock_s = best_time(lambda: [lock_once() for _ in range(1000)], args.rounds)[0] / 1000

        checkpoint = Path(scratch) / "best.pt"
        checkpoint.write_bytes(os.urandom(args.checkpoint_mib << 20))
        cache = Path(scratch) / "model_cache"
        hash_only, snapshot = [], []
        for _ in range(args.rounds):
            hash_only.append(best_time(lambda: sha256_file(checkpoint))[0])
            snapshot.append(best_time(lambda: snapshot_checkpoint(checkpoint, cache))[0])

    base, flushed = min(publish["no flush (WHALE_FSYNC=0)"]), min(publish["flushed (default)"])
    result = {
        "environment": environment(),
        "rows": args.rows,
        "dim": args.dim,
        "publish_version_s": {"no_flush": base, "flushed": flushed, "ratio": flushed / base},
        "catalogue_lock_us": lock_s * 1e6,
        "checkpoint_mib": args.checkpoint_mib,
        "load_checkpoint_s": {"hash_only": min(hash_only), "hash_and_snapshot": min(snapshot), "ratio": min(snapshot) / min(hash_only)},
    }
    print(f"publish a {args.rows:,} x {args.dim} version: {base:.2f} s without flush, {flushed:.2f} s flushed ({flushed / base:.2f}x)")
    print(f"catalogue lock, take and release: {lock_s * 1e6:.0f} us")
    print(
        f"{args.checkpoint_mib} MiB checkpoint: hash {min(hash_only):.2f} s, hash while copying into the cache "
        f"{min(snapshot):.2f} s ({min(snapshot) / min(hash_only):.2f}x)"
    )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
