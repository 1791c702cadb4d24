#!/usr/bin/env python
"""What flushing writes to disk costs: ``whale_ml.io.atomic_path`` with and without fsync, in one run.

    python benchmarks/durable_writes.py --out benchmarks/results/durable_writes.json

Writes, through the project's own ``atomic_path`` (temp file, then rename), into a fresh
folder on the file system of ``--dir`` (default: a temp folder beside this repository,
i.e. where a data home usually is):

* ``--crops`` crop-sized JPEGs (PIL ``save`` of a ``--crop-px`` image at quality 95, as
  ``whale_ml.detection.crops.write_crop`` does), on one thread and on ``--threads`` (the
  photo pass writes crops from a pool);
* ``--big`` big files of ``--big-mib`` MiB each (a checkpoint, an index);
* with ``--photos DIR`` (a data set's ``train_images/`` and ``test_images/``, e.g. the demo
  set), the crops stage itself: ``run_photo_pass`` without a detector (full-frame boxes),
  64 px crops into a fresh folder, on every core: the whole per-photo cost the flushes
  add to.

Each in three ways, interleaved round by round so that load drift weighs on all alike:

* ``rename``: no flush (``WHALE_FSYNC=0``): survives a killed process, not a power loss;
  the baseline;
* ``durable``: the default: fsync the file before the rename, the folder after it;
* ``batched dir``: fsync every file before its rename, the folder once per batch of
  ``--batch`` files (what the crops stage does).

Ratios are against ``rename`` in the same run; the best of ``--rounds`` is kept.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import RESULTS, machine_summary, timestamp, usable_cores, write_json  # noqa: E402
from PIL import Image  # noqa: E402

from whale_ml.io import atomic_path, fsync_dir  # noqa: E402

MODES = ("rename", "durable", "batched_dir")


def _set_mode(mode: str) -> None:
    os.environ["WHALE_FSYNC"] = "0" if mode == "rename" else "1"


def _write_crops(folder: Path, images: list[Image.Image], mode: str, threads: int, batch: int) -> float:
    _set_mode(mode)
    folder.mkdir(parents=True)
    sync_dir = mode != "batched_dir"

    def one(i: int) -> None:
        with atomic_path(folder / f"crop_{i:06d}.jpg", sweep=False, sync_dir=sync_dir) as tmp:
            images[i % len(images)].save(tmp, quality=95)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(images), batch):
            list(pool.map(one, range(start, min(start + batch, len(images)))))
            if not sync_dir:
                fsync_dir(folder)
    return time.perf_counter() - t


def _write_big(folder: Path, data: bytes, count: int, mode: str) -> float:
    _set_mode(mode)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    for i in range(count):
        with atomic_path(folder / f"big_{i}.bin") as tmp:
            tmp.write_bytes(data)
    return time.perf_counter() - t


def _photo_pass(photos: list[Path], out: Path, mode: str, size: int) -> float:
    import pandas as pd

    from whale_ml.detection.photo_pass import BoxRule, CropRule, run_photo_pass

    _set_mode("rename" if mode == "rename" else "durable")
    table = pd.DataFrame(
        {"image": [p.name for p in photos], "path": [str(p) for p in photos], "split": [p.parent.name.split("_")[0] for p in photos]}
    )
    t = time.perf_counter()
    done = run_photo_pass(table, None, BoxRule(0.25, 1.0, 128), CropRule(out, size))
    seconds = time.perf_counter() - t
    assert done.crops is not None and done.crops["written"].all()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=REPO.parent, help="write under a temp folder here (its file system is measured)")
    ap.add_argument("--crops", type=int, default=2000)
    ap.add_argument("--crop-px", type=int, nargs="+", default=[64, 512], help="crop sides to measure (the demo's 64, the GPU recipe's 512)")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--batch", type=int, default=32, help="files per folder flush in batched_dir (the photo pass's batch)")
    ap.add_argument("--big", type=int, default=4)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photos", type=Path, help="a data set folder: also time the crops stage's photo pass on its photos")
    ap.add_argument("--pass-crop-px", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "durable_writes.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Photo-like crops (smooth gradients plus noise), so the JPEGs have a crop's size, not a flat image's.
    crop_sets = {}
    for px in args.crop_px:
        base = np.linspace(0, 255, px, dtype=np.float32)
        crop_sets[px] = [
            Image.fromarray(
                np.clip(base[None, :, None] * 0.5 + base[:, None, None] * 0.3 + rng.normal(0, 20, (px, px, 3)), 0, 255).astype(np.uint8)
            )
            for _ in range(16)
        ]
    sizes = {}
    for px, imgs in crop_sets.items():
        buf = io.BytesIO()
        imgs[0].save(buf, format="JPEG", quality=95)
        sizes[px] = buf.tell()
    big = rng.integers(0, 256, args.big_mib << 20, dtype=np.uint8).tobytes()
    times: dict[str, list[float]] = {}
    photos: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="durable_writes_", dir=args.dir) as tmp:
        root = Path(tmp)
        fs = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True, check=False).stdout.splitlines()[-1].split()
        for r in range(args.rounds):
            for px, imgs in crop_sets.items():
                images = [imgs[i % len(imgs)] for i in range(args.crops)]
                for threads in sorted({1, args.threads}):
                    for mode in MODES:
                        key = f"crops{px}_{threads}t_{mode}"
                        folder = root / f"{key}_r{r}"
                        times.setdefault(key, []).append(_write_crops(folder, images, mode, threads, args.batch))
                        shutil.rmtree(folder)
            if args.photos is not None:
                photos = sorted((args.photos / "train_images").glob("*.jpg")) + sorted((args.photos / "test_images").glob("*.jpg"))
                for mode in MODES[:2]:
                    key = f"pass{args.pass_crop_px}_{mode}"
                    folder = root / f"{key}_r{r}"
                    times.setdefault(key, []).append(_photo_pass(photos, folder, mode, args.pass_crop_px))
                    shutil.rmtree(folder)
            for mode in MODES[:2]:
                key = f"big_{mode}"
                folder = root / f"{key}_r{r}"
                times.setdefault(key, []).append(_write_big(folder, big, args.big, mode))
                shutil.rmtree(folder)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    best = {k: min(v) for k, v in times.items()}
    rows = []
    for key, s in best.items():
        group, mode = key.rsplit("_", 1) if not key.endswith("batched_dir") else (key[: -len("_batched_dir")], "batched_dir")
        base = best[f"{group}_rename"]
        n = args.big if group == "big" else (len(photos) if group.startswith("pass") else args.crops)
        rows.append({"what": group, "mode": mode, "files": n, "best_s": s, "ms_per_file": 1000 * s / n, "ratio_to_rename": s / base})
    result = {
        "date": timestamp(),
        "machine": machine_summary(),
        "file_system": {"device": fs[0], "type": fs[1]} if len(fs) > 1 else {},
        "crop_jpeg_bytes": sizes,
        "big_mib": args.big_mib,
        "threads": args.threads,
        "pass_photos": str(args.photos) if args.photos else None,
        "batch": args.batch,
        "times_s": times,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"{result['date']}, {result['machine']}, {result['file_system']}, crop JPEG bytes {sizes}")
    print("| files | mode | count | best s | ms / file | x rename |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['what']} | {row['mode']} | {row['files']} | {row['best_s']:.3f} | {row['ms_per_file']:.2f} | "
            f"{row['ratio_to_rename']:.2f} |"
        )


if __name__ == "__main__":
    main()
