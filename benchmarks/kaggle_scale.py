#!/usr/bin/env python
"""The pipeline at the real competition's scale: every stage's time and memory.

    python benchmarks/kaggle_scale.py --stages counts --out benchmarks/results/kaggle_scale_counts.json   # ~5 min on 2 cores
    python benchmarks/kaggle_scale.py --stages images --scale 0.002    # full-size photos: the decode baseline and the image stages
    python benchmarks/kaggle_scale.py --quick                          # every stage at tiny counts and photo sizes: a smoke test

Two parts, each stage in a fresh process (so its memory is its own):

*Stages whose cost depends on counts, not pixels*, at the real counts (``--counts-scale 1``:
51,033 training photos of 15,587 individuals, 27,956 test photos): the tables of
``whale_ml.data.kaggle_shape`` written without photos (``generate_kaggle_shape(images=False)``),
each listed photo a sparse placeholder file of a random JPEG-like size (150 kB-1.5 MB, first
bytes its name, so no two are alike) for the stages that stat or hash them. Each is the
project's own function:

* ``metadata``: ``read_train_metadata`` and ``read_test_metadata`` (files checked),
  ``find_train_overlap`` (sizes, then hashes of same-sized files) and
  ``training_data_fingerprint`` (what the rebuild sensor computes each tick);
  baseline: ``pandas.read_csv`` of the same CSV.
* ``folds``: ``make_folds`` + ``fold_summary`` (``--folds`` folds).
* ``arcface``: one training step (``build_training`` as ``train_fold`` builds it, then
  ``train_one_epoch`` over in-memory uint8 batches, inside ``using_threads()``) with the
  15,587-class ArcFace head, and with the 2-centre sub-center head; baseline: the same step
  with a 100-class head, so the head's share of a step is the difference. The three run in
  ``--rounds`` interleaved rounds (the fastest of each is kept). The head's memory (centres,
  their gradient and AdamW's two moments) is counted from its tensors.
* ``gallery``: ``build_index`` over the training photos' synthetic embeddings (``--dim``),
  ``write_version`` (index, embeddings and table to disk), then ``load_version`` +
  ``match_queries`` for every test photo (the search the submission and ``whale identify``
  share); baseline for the search: the float32 matrix product ``queries @ gallery.T`` in
  4,096-row blocks, the floor of any exact search.
* ``threshold``: ``tune_out_of_fold`` on the folds of ``make_folds`` and embeddings saved
  by ``save_embeddings`` (each fold's validation photos searched against its training
  photos, then the exact tuning); baseline: the same floor, each fold's validation @ training.
* ``submission``: ``prior_predictions``, ``make_submission``, ``write_submission``,
  ``submission_problems`` and ``score_submission`` of 27,956 rows; baseline: ``to_csv`` +
  ``read_csv`` of the same frame.

Synthetic embeddings: each individual a random unit centre, each photo its centre plus
Gaussian noise of ``--noise`` times its norm (2: the query's own individual first ~85-90%
of the time, as in benchmarks/scale.py), normalised.

*Image stages* on full-size photos: a Kaggle-shaped set at ``--scale`` S written with its
photos (as ``whale demo-data OUT --preset kaggle --scale S`` writes it: 1,500-4,000 px
wide). The baseline is one plain serial PIL decode of every photo at full size
(``Image.open(p)``, ``load()``, ``convert("RGB")``), and the same decode on every core
(a process pool). The image stages themselves are run through :func:`run_image_stage`, a
hook for the one-pass detection and cropping: until it is filled in, they are reported as
not implemented. Projections to the full competition's 78,989 photos are the measured
per-photo cost times the photo count divided by the cores (2 here, 16 on a GPU machine):
ideal scaling, stated as a projection, not measured.

Per stage: wall seconds (best of ``--repeats``), rows (or photos) per second, the peak
resident memory of the stage's process while it ran (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; inputs already in memory count, as they would in a real run) and
its increase over the resident set just before, and, for process pools, the peak of the
whole process tree's resident memory sampled every 0.1 s. Writes JSON (``--out``) after
each stage and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:  # loaded by path (the tests), not run as a script: common is beside it
    sys.path.append(str(HERE))

from common import (  # noqa: E402
    RESULTS,
    environment,
    library_versions,
    reset_peak_rss,
    save_results,
    status_kib,
    tree_rss_kib,
    usable_cores,
)

# The parent process stays small (standard library only): it only starts the stages.
FULL_PHOTOS = 51_033 + 27_956  # KAGGLE_TRAIN_PHOTOS + KAGGLE_TEST_PHOTOS (whale_ml/data/kaggle_shape.py)
GPU_MACHINE_CORES = 16
COUNT_STAGES = ("metadata", "folds", "arcface", "gallery", "threshold", "submission")
IMAGE_PART = ("decode", "image")
ALL_STAGES = COUNT_STAGES + IMAGE_PART
GROUPS = {"counts": COUNT_STAGES, "images": IMAGE_PART, "all": ALL_STAGES}
PIPELINE_K = 50  # GalleryConfig.k / ThresholdConfig.k
BLOCK = 4096


# =========================================================================== image stages: the lead's hook

# The image stages, in the order they run; each is timed on 1 worker and on every core.
IMAGE_STAGES: tuple[str, ...] = ("boxes_and_crops",)


def run_image_stage(name: str, photos: list[Path], workers: int) -> dict[str, Any] | None:
    """Run image stage ``name`` over ``photos`` (full-size JPEGs) with ``workers`` processes.

    The hook the harness times, in a fresh process per call: fill it in with the
    pipeline's own call (e.g. the one pass that detects and crops every photo, writing its
    crops under a temp folder). Return anything worth recording (counts, decodes per
    photo), or None. Until then it raises NotImplementedError and the table says so.
    """
    raise NotImplementedError(f"image stage {name!r}: the one-pass detection and cropping is not wired in yet")


# =========================================================================== the stages' processes


class _Memory:
    """Peak resident memory of this process between two points.

    ``VmHWM`` is reset to the current resident set through ``/proc/self/clear_refs``
    (Linux >= 4.0); where that is refused the peak also counts what came before, and the
    record says so. ``ru_maxrss`` is not used: it survives ``exec`` and would start at the
    parent's peak.
    """

    def __init__(self) -> None:
        self.process_peak_kib = 0

    def start(self) -> int:
        self.process_peak_kib = max(self.process_peak_kib, status_kib("VmHWM"))
        self.reset = reset_peak_rss()
        return status_kib("VmRSS")

    def stop(self, before_kib: int) -> dict[str, Any]:
        peak = status_kib("VmHWM")
        self.process_peak_kib = max(self.process_peak_kib, peak)
        return {"peak_rss_mib": round(peak / 1024, 1), "increase_mib": round((peak - before_kib) / 1024, 1), "peak_reset": self.reset}


MEMORY = _Memory()


def timed(
    name: str, fn: Callable[[], Any], rows: int | Callable[[Any], int], repeats: int = 1, **extra: Any
) -> tuple[Any, dict[str, Any]]:
    """``fn()`` run ``repeats`` times: its last result and a record (best wall time, rows/s, memory).

    ``rows`` may be a function of the result (rows a reader returned).
    """
    before = MEMORY.start()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    best = min(runs)
    rows = rows(out) if callable(rows) else rows
    record = {"name": name, "rows": rows, "seconds": round(best, 6), "rows_per_s": round(rows / best, 1) if best else None,
              "seconds_runs": [round(r, 6) for r in runs], **MEMORY.stop(before), **extra}  # fmt: skip
    print(f"  {name}: {best:.3f} s, {record['rows_per_s']} rows/s, peak {record['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
    return out, record


def _floor_matmul(queries: Any, gallery: Any) -> float:
    """Seconds of ``queries @ gallery.T`` in 4,096-row blocks into a reused buffer: what any exact search must do."""
    import numpy as np

    buf = np.empty((BLOCK, len(gallery)), dtype=np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(queries), BLOCK):
        q = queries[s : s + BLOCK]
        np.matmul(q, gallery.T, out=buf[: len(q)])
    return time.perf_counter() - t0


def _synthetic_embeddings(ids: Any, all_ids: Any, d: int, noise: float, seed: int, photo_seed: int = 0) -> Any:
    """One unit row per photo of individual ``ids[i]``: its individual's random unit centre plus
    Gaussian noise of ``noise`` times the centre's norm, normalised. Centres come from ``seed``
    and ``all_ids`` alone, so the gallery's and the queries' calls share them; the noise comes
    from ``photo_seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(all_ids), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    code = {v: i for i, v in enumerate(all_ids)}
    rows = np.fromiter((code[v] for v in ids), dtype=np.int64, count=len(ids))
    rng = np.random.default_rng([seed, photo_seed])
    out = centres[rows] + rng.standard_normal((len(rows), d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def child_versions(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    versions = library_versions("numpy", "pandas", "torch", "faiss", "pillow", "timm")
    return {"versions": versions, "torch_threads_default": torch.get_num_threads(), "blas": _blas_libraries()}


def _blas_libraries() -> list[dict[str, Any]]:
    """Each BLAS loaded (numpy's, faiss's, torch's) with the CPU kernel it chose: an OpenBLAS too old
    to know the CPU falls back to a slow generic one (``OPENBLAS_CORETYPE`` overrides it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "architecture", "num_threads", "filepath")
    return [{k: info.get(k) for k in keys} for info in threadpool_info() if info.get("user_api") == "blas"]


def child_tables(p: dict[str, Any]) -> dict[str, Any]:
    """The full-count tables without photos, and one sparse placeholder per listed photo."""
    import numpy as np
    import pandas as pd

    from whale_ml.data.kaggle_shape import KaggleShapeConfig, generate_kaggle_shape

    data = Path(p["data"])
    t0 = time.perf_counter()
    generate_kaggle_shape(data, KaggleShapeConfig(scale=p["counts_scale"], seed=p["seed"]), images=False)
    tables_s = time.perf_counter() - t0
    rng = np.random.default_rng(p["seed"])
    t0 = time.perf_counter()
    for split, csv in (("train", "train.csv"), ("test", "sample_submission.csv")):
        folder = data / f"{split}_images"
        folder.mkdir()
        names = pd.read_csv(data / csv, dtype=str)["image"].tolist()
        for name, size in zip(names, rng.integers(150_000, 1_500_000, size=len(names)).tolist(), strict=True):
            with open(folder / name, "wb") as f:
                f.write(name.encode())
                f.truncate(size)  # sparse: no disk blocks, reads as zeros
    return {"tables_s": round(tables_s, 3), "placeholders_s": round(time.perf_counter() - t0, 3)}


def child_metadata(p: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from whale_ml.data.metadata import find_train_overlap, read_test_metadata, read_train_metadata, read_truth, training_data_fingerprint

    data, reps, notes = Path(p["data"]), p["repeats"], []
    _, base_train = timed("read_csv train.csv", lambda: pd.read_csv(data / "train.csv", dtype=str), 0, reps)
    _, base_test = timed("read_csv sample_submission.csv", lambda: pd.read_csv(data / "sample_submission.csv", dtype=str), 0, reps)
    train, r_train = timed("read_train_metadata", lambda: read_train_metadata(data, check_files=True, warn=notes.append), len, reps)
    test, r_test = timed("read_test_metadata", lambda: read_test_metadata(data, check_files=True, warn=notes.append), len, reps)
    _, r_truth = timed("read_truth", lambda: read_truth(data, warn=notes.append), len, reps)
    sizes = {os.stat(path).st_size for path in train["path"]}
    collisions = sum(os.stat(path).st_size in sizes for path in test["path"])
    overlap, r_overlap = timed("find_train_overlap", lambda: find_train_overlap(train, test), len(test), reps,
                               test_photos_with_a_same_size_train_photo=collisions)  # fmt: skip
    _, r_fp = timed("training_data_fingerprint", lambda: training_data_fingerprint(data), len(train), reps)
    for record, base in ((r_train, base_train), (r_test, base_test)):
        record.update(baseline="pandas.read_csv", baseline_s=base["seconds"])
    return {"parts": [r_train, r_test, r_truth, r_overlap, r_fp], "overlap_rows": len(overlap), "warnings": notes}


def child_folds(p: dict[str, Any]) -> dict[str, Any]:
    from whale_ml.data.folds import fold_summary, make_folds
    from whale_ml.data.metadata import read_train_metadata

    train = read_train_metadata(p["data"], check_files=False, warn=lambda _m: None)
    folds, r_make = timed("make_folds", lambda: make_folds(train, p["folds"], 0.16, p["seed"]), len(train), p["repeats"])
    summary, r_sum = timed("fold_summary", lambda: fold_summary(folds), len(train), p["repeats"])
    return {"parts": [r_make, r_sum], "summary": summary.to_dict(orient="records"),
            "held_out_individuals": int(folds.loc[folds["held_out"], "individual_id"].nunique()),
            "never_validated": int((folds["fold"] < 0).sum())}  # fmt: skip


def child_arcface(p: dict[str, Any]) -> dict[str, Any]:
    """``build_training`` + ``train_one_epoch`` over in-memory batches, as ``train_fold`` runs them on CPU."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from whale_ml.data.metadata import read_train_metadata
    from whale_ml.stage_configs import TrainConfig
    from whale_ml.threads import using_threads
    from whale_ml.training.trainer import build_training, seed_everything, train_one_epoch

    train = read_train_metadata(p["data"], check_files=False, warn=lambda _m: None)
    classes = int(train["label"].nunique())
    if p["classes"]:  # the baseline head: the same photos folded onto fewer classes
        classes = min(p["classes"], classes)
        train = train.assign(label=train["label"] % classes)
    cfg = TrainConfig(backbone=p["backbone"], image_size=p["image_size"], batch_size=p["batch"], sub_centers=p["sub_centers"],
                      device="cpu", precision="fp32", epochs=1)  # fmt: skip
    b, size, cpu = p["batch"], p["image_size"], torch.device("cpu")
    rng = np.random.default_rng(p["seed"])
    n = (p["warmup"] + p["steps"]) * b
    images = torch.from_numpy(rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8))
    labels = torch.from_numpy(train["label"].to_numpy()[rng.integers(0, len(train), size=n)])
    split = p["warmup"] * b
    warm = DataLoader(TensorDataset(images[:split], labels[:split]), batch_size=b)
    steps = DataLoader(TensorDataset(images[split:], labels[split:]), batch_size=b)
    seed_everything(p["seed"])
    with using_threads() as threads:
        before = MEMORY.start()
        t0 = time.perf_counter()
        parts = build_training(cfg, train, classes, cpu, log=lambda _m: None)
        build_s = time.perf_counter() - t0
        train_one_epoch(1, parts.step, warm, parts.optimizer, parts.scheduler, parts.scaler, cpu)  # AdamW's moments appear here
        stats = train_one_epoch(1, parts.step, steps, parts.optimizer, parts.scheduler, parts.scaler, cpu)
        memory = MEMORY.stop(before)
    head = list(parts.loss_fn.parameters())
    head_bytes = sum(t.numel() * t.element_size() for t in head)
    moments = [v for t in head for v in parts.optimizer.state[t].values() if torch.is_tensor(v) and v.ndim]  # AdamW's exp_avg(_sq)
    state_bytes = sum(v.numel() * v.element_size() for v in moments)
    step_s = stats.seconds / p["steps"]
    label = f"ArcFace step, {classes:,} classes" + (f", {p['sub_centers']} sub-centres" if p["sub_centers"] > 1 else "")
    record = {"name": label, "rows": stats.images, "seconds": round(stats.seconds, 4), "rows_per_s": round(stats.images / stats.seconds, 1),
              "step_s": round(step_s, 4), "build_s": round(build_s, 3), "steps": p["steps"], **memory,
              "head_weights_mib": round(head_bytes / 2**20, 1),
              "head_total_mib": round((2 * head_bytes + state_bytes) / 2**20, 1),  # weights, gradient, AdamW moments
              "full_epoch_projection_s": round(step_s * len(train) / b, 1)}  # fmt: skip
    print(f"  {label}: {step_s:.3f} s/step, head {record['head_total_mib']} MiB", file=sys.stderr, flush=True)
    return {"parts": [record], "classes": classes, "torch_threads": threads, "backbone": p["backbone"], "batch": b, "image_size": size}


def child_gallery(p: dict[str, Any]) -> dict[str, Any]:
    from whale_ml.data.metadata import read_train_metadata, read_truth
    from whale_ml.gallery.lineage import FoldModel, GalleryLineage
    from whale_ml.retrieval.matcher import Matcher, match_queries
    from whale_ml.gallery.versions import load_version, write_version
    from whale_ml.home import HomeLayout
    from whale_ml.retrieval.faiss_index import build_index, l2_normalise
    from whale_ml.retrieval.ranking import collapse_by_individual, map_at_5

    train = read_train_metadata(p["data"], check_files=False, warn=lambda _m: None)
    truth = read_truth(p["data"], warn=lambda _m: None).merge(_animal_ids(p["data"]), on="image")
    all_ids = sorted(set(train["individual_id"]) | set(truth["animal_id"]))
    gallery = _synthetic_embeddings(train["individual_id"].tolist(), all_ids, p["dim"], p["noise"], p["seed"])
    queries = _synthetic_embeddings(truth["animal_id"].tolist(), all_ids, p["dim"], p["noise"], p["seed"], photo_seed=1)
    floor = min(_floor_matmul(queries, gallery) for _ in range(p["repeats"]))
    table = train[["image", "individual_id", "species"]].assign(crop_path="crops/" + train["image"], source="pipeline")
    lineage = GalleryLineage(models=[FoldModel(fold="fold0", checkpoint_sha256="0" * 64)], detector_sha256=None, detector_imgsz=128,
                             min_confidence=0.25, expand=1.2, crop_size=64, resize="stretch", k=PIPELINE_K)  # fmt: skip
    home = Path(p["work"]) / "gallery_home"
    shutil.rmtree(home, ignore_errors=True)
    layout = HomeLayout(home)
    try:
        index, r_build = timed("build_index", lambda: build_index(gallery), len(gallery), p["repeats"])
        version, r_write = timed(
            "write_version", lambda: write_version(layout, table, gallery, lineage, "benchmark", index=index), len(gallery)
        )
        threshold = Matcher(0.2)

        def search() -> Any:
            return match_queries(load_version(layout, version.name), queries, threshold)

        matches, r_search = timed("load_version + match_queries", search, len(queries), p["repeats"],
                                  baseline="queries @ gallery.T", baseline_s=round(floor, 4))  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    # What faiss alone costs, and how many queries the first k neighbours leave with fewer than five
    # individuals (a long tail's many-photo individuals fill them): those are searched again, deeper.
    (sims, rows), r_raw = timed("index.search k=50 (faiss alone)", lambda: index.search(l2_normalise(queries), PIPELINE_K), len(queries),
                                p["repeats"], baseline="queries @ gallery.T", baseline_s=round(floor, 4))  # fmt: skip
    _, _, found = collapse_by_individual(sims, train["individual_id"].to_numpy(dtype=object)[rows])
    map5 = map_at_5(matches.predictions, truth["individual_id"].tolist())
    return {"parts": [r_build, r_write, r_search, r_raw], "gallery": list(gallery.shape), "queries": list(queries.shape),
            "deeper_search_share": round(float((found < 5).mean()), 4),
            "map5_at_threshold_0.2": round(map5, 4), "omp_threads": _faiss_threads()}  # fmt: skip


def _animal_ids(data: str) -> Any:
    import pandas as pd

    return pd.read_csv(Path(data) / "test_truth.csv", dtype=str, keep_default_na=False)[["image", "animal_id"]]


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def child_threshold(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from whale_ml.data.folds import fold_names, fold_split, make_folds
    from whale_ml.data.metadata import read_train_metadata
    from whale_ml.retrieval.ranking import tune_threshold
    from whale_ml.retrieval.store import save_embeddings
    from whale_ml.retrieval.threshold import tune_out_of_fold
    from whale_ml.stage_configs import ThresholdConfig

    PLAIN = ThresholdConfig(k=PIPELINE_K, rerank=False, class_centres=False)  # the embedding search alone: what this part times

    train = read_train_metadata(p["data"], check_files=False, warn=lambda _m: None)
    folds = make_folds(train, p["folds"], 0.16, p["seed"])
    ids = train["individual_id"].tolist()
    emb = _synthetic_embeddings(ids, sorted(set(ids)), p["dim"], p["noise"], p["seed"])
    folder = Path(p["work"]) / "threshold_embeddings"
    save_embeddings(folder, "train", emb, train["image"].tolist())  # one model's embeddings serve every fold
    row_of = {img: r for r, img in enumerate(train["image"])}
    floor = 0.0
    for k in range(p["folds"]):
        fold_train, fold_val = fold_split(folds, k)
        floor += _floor_matmul(emb[[row_of[x] for x in fold_val["image"]]], emb[[row_of[x] for x in fold_train["image"]]])
    del emb
    try:
        tuned, r_oof = timed("tune_out_of_fold", lambda: tune_out_of_fold(folds, lambda _f: folder, fold_names(p["folds"]), PLAIN),
                             lambda t: t.queries, p["repeats"], baseline="each fold's validation @ training.T",
                             baseline_s=round(floor, 4))  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    known = folds["individual_id"].unique().tolist()
    result, r_tune = timed(
        "tune_threshold (pooled, no search)",
        lambda: tune_threshold(tuned.sims, tuned.ids, tuned.truths, gallery_ids=known),
        tuned.queries,
        p["repeats"],
    )
    return {"parts": [r_oof, r_tune], "threshold": result.threshold, "oof_map5": round(result.map5, 4),
            "new_share_of_queries": round(float(np.mean([t == "new_individual" for t in tuned.truths])), 4),
            "omp_threads": _faiss_threads()}  # fmt: skip


def child_submission(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from whale_ml.data.metadata import NEW_INDIVIDUAL, read_test_metadata, read_train_metadata, read_truth
    from whale_ml.submission import make_submission, prior_predictions, score_submission, submission_problems, write_submission

    train = read_train_metadata(p["data"], check_files=False, warn=lambda _m: None)
    test = read_test_metadata(p["data"], check_files=False, warn=lambda _m: None)
    truth = read_truth(p["data"], warn=lambda _m: None)
    rng = np.random.default_rng(p["seed"])
    ids = train["individual_id"].unique()
    picks = ids[rng.integers(0, len(ids), size=(len(test), 8))]
    cut = rng.integers(0, 5, size=len(test))
    predictions = []
    for row, c in zip(picks.tolist(), cut.tolist(), strict=True):
        found = list(dict.fromkeys(row))[:4]
        predictions.append((found[:c] + [NEW_INDIVIDUAL] + found[c:])[:5])
    path, floor_path = Path(p["work"]) / "submission.csv", Path(p["work"]) / "floor.csv"
    images = test["image"].tolist()

    def submit() -> tuple[list[str], list[str], float]:
        prior = prior_predictions(train["individual_id"].tolist())  # the answer for unreadable photos
        write_submission(make_submission(images, predictions), path)
        return prior, submission_problems(path, images, 5), score_submission(path, truth)

    def floor() -> None:
        pd.DataFrame({"image": images, "predictions": [" ".join(x) for x in predictions]}).to_csv(floor_path, index=False)
        pd.read_csv(floor_path, dtype=str)

    _, r_floor = timed("to_csv + read_csv", floor, len(images), p["repeats"])
    (_, problems, score), r_sub = timed("submission: write, check, score", submit, len(images), p["repeats"],
                                     baseline="to_csv + read_csv", baseline_s=r_floor["seconds"])  # fmt: skip
    path.unlink(missing_ok=True)
    floor_path.unlink(missing_ok=True)
    return {"parts": [r_sub], "problems": problems, "map5_random_predictions": round(score, 4)}


def child_photos(p: dict[str, Any]) -> dict[str, Any]:
    """A Kaggle-shaped set with its photos: what ``whale demo-data OUT --preset kaggle --scale S`` writes."""
    from whale_ml.data.kaggle_shape import KaggleShapeConfig, generate_kaggle_shape

    cfg = KaggleShapeConfig(scale=p["scale"], min_width=p["min_width"], max_width=p["max_width"], seed=p["seed"])
    t0 = time.perf_counter()
    generate_kaggle_shape(Path(p["photos"]), cfg, workers=p["cores"])
    return {"generate_s": round(time.perf_counter() - t0, 2)}


def _photo_paths(data: str) -> list[Path]:
    return sorted([*(Path(data) / "train_images").iterdir(), *(Path(data) / "test_images").iterdir()])


def _decode_full(path: Path) -> int:
    """The baseline's unit of work: one photo decoded at full size, as RGB. Returns its pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB").width * im.height


def child_decode(p: dict[str, Any]) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    paths = _photo_paths(p["photos"])
    pixels, serial = timed("PIL full decode, serial", lambda: sum(map(_decode_full, paths)), len(paths), p["repeats"], workers=1)

    def pooled() -> int:
        with ProcessPoolExecutor(max_workers=p["cores"]) as pool:
            return sum(pool.map(_decode_full, paths, chunksize=max(1, len(paths) // (8 * p["cores"]))))

    _, parallel = timed(f"PIL full decode, {p['cores']} processes", pooled, len(paths), p["repeats"], workers=p["cores"])
    disk = sum(path.stat().st_size for path in paths)
    return {"parts": [serial, parallel], "photos": len(paths), "mean_megapixels": round(pixels / len(paths) / 1e6, 3),
            "mean_file_mib": round(disk / len(paths) / 2**20, 3)}  # fmt: skip


def child_image(p: dict[str, Any]) -> dict[str, Any]:
    paths = _photo_paths(p["photos"])
    try:
        out, record = timed(f"{p['name']}, {p['workers']} worker(s)", lambda: run_image_stage(p["name"], paths, p["workers"]),
                            len(paths), 1, workers=p["workers"])  # fmt: skip
    except NotImplementedError as exc:
        return {"parts": [{"name": f"{p['name']}, {p['workers']} worker(s)", "status": "not implemented", "why": str(exc),
                           "rows": len(paths), "workers": p["workers"]}]}  # fmt: skip
    return {"parts": [record], "returned": out}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "versions": child_versions, "tables": child_tables, "metadata": child_metadata, "folds": child_folds, "arcface": child_arcface,
    "gallery": child_gallery, "threshold": child_threshold, "submission": child_submission, "photos": child_photos,
    "decode": child_decode, "image": child_image,
}  # fmt: skip


def _child_main(stage: str, params: str) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    out = CHILDREN[stage](json.loads(params))
    out["process_wall_s"] = round(time.perf_counter() - t0, 3)
    out["process_peak_rss_mib"] = round(max(MEMORY.process_peak_kib, status_kib("VmHWM")) / 1024, 1)
    print("RESULT " + json.dumps(out, default=str), flush=True)
    return 0


# =========================================================================== the parent


def run_stage(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in a fresh interpreter; its result, with the process tree's sampled peak memory."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, json.dumps(params)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    done, peak = threading.Event(), [0]

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_kib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed with exit status {proc.returncode}")
    result = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("RESULT "))[len("RESULT ") :])
    result["tree_peak_rss_mib_sampled"] = round(peak[0] / 1024, 1)
    result["wall_with_startup_s"] = round(time.perf_counter() - t0, 2)
    return result


def arcface_rounds(params: dict[str, Any], baseline_classes: int, rounds: int) -> dict[str, Any]:
    """The baseline head, the full head and the sub-center head, each in its own process, in
    ``rounds`` interleaved rounds (other load hits the three alike); the fastest round of each is kept."""
    variants = [{"classes": baseline_classes, "sub_centers": 1}, {"classes": 0, "sub_centers": 1}, {"classes": 0, "sub_centers": 2}]
    runs: list[list[dict[str, Any]]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, variant in enumerate(variants):
            runs[i].append(run_stage("arcface", {**params, **variant}))
    best = [min(r, key=lambda run: run["parts"][0]["step_s"]) for r in runs]
    best[0]["parts"][0]["baseline_head"] = True
    for r, b in zip(runs, best, strict=True):
        b["parts"][0]["step_s_rounds"] = [run["parts"][0]["step_s"] for run in r]
    return {"parts": [b["parts"][0] for b in best], "runs": runs}


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(res: dict[str, Any]) -> str:
    cfg, stages = res["config"], res["stages"]
    lines: list[str] = []
    count_rows = [(s, r) for s in COUNT_STAGES if s in stages for r in stages[s]["parts"]]
    if count_rows:
        base = next((r for r in stages.get("arcface", {}).get("parts", []) if r.get("baseline_head")), None)
        lines += [
            f"Stages whose cost depends on counts ({cfg['counts']['train']:,} training photos of {cfg['counts']['individuals']:,} "
            f"individuals, {cfg['counts']['test']:,} test photos; {cfg['folds']} folds; {cfg['dim']}-d embeddings), "
            f"each in a fresh process on {res['environment']['cores']} cores:",
            "",
            "| stage | what | rows | seconds | rows/s | peak RSS (MiB) | + during (MiB) | baseline | baseline s | x baseline |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for stage, r in count_rows:
            b_name, b_s = r.get("baseline"), r.get("baseline_s")
            if stage == "arcface" and base is not None and r is not base:
                b_name, b_s = base["name"], base["step_s"]
            secs = r.get("step_s", r["seconds"]) if stage == "arcface" else r["seconds"]
            what = r["name"] + (" (s per step)" if stage == "arcface" else "")
            ratio = f"{secs / b_s:.2f}x" if b_s else "—"
            lines.append(
                f"| {stage} | {what} | {r['rows']:,} | {_fmt(secs, 3)} | {_fmt(r['rows_per_s'], 1)} | {_fmt(r['peak_rss_mib'], 0)} "
                f"| {_fmt(r['increase_mib'], 0)} | {b_name or '—'} | {_fmt(b_s, 3)} | {ratio} |"
            )
    if "decode" in stages or "image" in stages:
        lines += ["", *_image_table(res)]
    return "\n".join(lines)


def _image_table(res: dict[str, Any]) -> list[str]:
    stages, cores = res["stages"], res["environment"]["cores"]
    decode = stages.get("decode")
    lines = [
        f"Image stages on {res['config']['photos']['count']} full-size photos (Kaggle shape at --scale {res['config']['scale']}, "
        f"{res['config']['photos']['min_width']}-{res['config']['photos']['max_width']} px"
        + (f", mean {decode['mean_megapixels']} MP" if decode else "") + "); projections to "
        f"{FULL_PHOTOS:,} photos = per-photo seconds x photos / cores (ideal scaling, not measured):",
        "",
        f"| stage | workers | photos | seconds | photos/s | s per photo-core | peak RSS (MiB, tree) | x serial decode | "
        f"projected: this machine ({cores} cores) | projected: {GPU_MACHINE_CORES} cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    serial = decode["parts"][0] if decode else None
    rows = [("decode", r, decode) for r in decode["parts"]] if decode else []
    rows += [("image", r, run) for run in stages.get("image", []) for r in run["parts"]]
    for stage, r, run in rows:
        if r.get("status") == "not implemented":
            lines.append(f"| {r['name']} | {r['workers']} | {r['rows']} | not implemented (hook `run_image_stage`) | | | | | | |")
            continue
        per_core = r["seconds"] * r["workers"] / r["rows"]  # seconds of one core per photo
        here = FULL_PHOTOS * r["seconds"] / r["rows"] if r["workers"] >= cores else FULL_PHOTOS * per_core / cores
        gpu = FULL_PHOTOS * per_core / GPU_MACHINE_CORES
        # A pool's workers are processes of their own: their sum, sampled, is the stage's footprint.
        peak = max(r["peak_rss_mib"], run.get("tree_peak_rss_mib_sampled", 0)) if r["workers"] > 1 else r["peak_rss_mib"]
        vs = f"{r['seconds'] / serial['seconds']:.2f}x" if serial else "—"
        lines.append(
            f"| {r['name']} | {r['workers']} | {r['rows']} | {r['seconds']:.2f} | {r['rows_per_s']:.2f} | {per_core:.3f} "
            f"| {peak:,.0f} | {vs} | {here / 60:,.1f} min | {gpu / 60:,.1f} min |"
        )
    return lines


def _stages(names: list[str]) -> list[str]:
    chosen = {s for name in names for s in GROUPS.get(name, (name,))}
    unknown = chosen - set(ALL_STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join([*GROUPS, *ALL_STAGES])}")
    return [s for s in ALL_STAGES if s in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["all"], help=f"any of {', '.join([*GROUPS, *ALL_STAGES])} (default: all)")
    p.add_argument("--counts-scale", type=float, default=1.0, help="F of the count stages' tables (1: the real counts)")
    p.add_argument("--scale", type=float, default=0.002, help="S of the full-size photo set for the image stages (0.002: 158 photos)")
    p.add_argument("--photo-px", type=int, nargs=2, default=[1500, 4000], metavar=("MIN", "MAX"), help="photo widths of the image set")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--dim", type=int, default=512, help="embedding size of the gallery and threshold stages")
    p.add_argument("--noise", type=float, default=2.0, help="synthetic photo noise relative to its individual's centre")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed ArcFace steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--baseline-classes", type=int, default=100, help="classes of the ArcFace baseline head")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three ArcFace processes (the fastest is kept)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each count stage (the best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="keep the generated tables and photos here and reuse them (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/kaggle_scale.json, kaggle_scale_quick.json with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny counts, tiny photos, timm's test_resnet, 2 steps: a smoke test")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "PARAMS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.counts_scale, args.scale, args.photo_px = 0.01, 0.0005, [96, 192]
        args.backbone, args.steps, args.warmup, args.batch, args.rounds = "test_resnet", 2, 1, 16, 1
    args.out = args.out or RESULTS / ("kaggle_scale_quick.json" if args.quick else "kaggle_scale.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child_main(*args.child)
    stages = _stages(args.stages)
    cores = usable_cores()
    work = args.work or Path(tempfile.mkdtemp(prefix="kaggle_scale."))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"counts_F{args.counts_scale:g}_seed{args.seed}"
    photos = work / f"photos_S{args.scale:g}_{args.photo_px[0]}-{args.photo_px[1]}px_seed{args.seed}"
    common = {"data": str(data / "data"), "work": str(work), "seed": args.seed, "repeats": args.repeats, "folds": args.folds,
              "dim": args.dim, "noise": args.noise, "photos": str(photos / "data"), "cores": cores}  # fmt: skip
    # No library versions here: the parent imports none, a stage's process reports them. The
    # stages run with OMP_WAIT_POLICY=PASSIVE unless it is set.
    env = environment(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    res: dict[str, Any] = {"environment": env, "config": {**vars(args), "stages": stages, "argv": sys.argv}, "stages": {}}
    res["config"].update(work=str(work), out=str(args.out), child=None)
    t_start = time.perf_counter()
    try:
        res["environment"].update(run_stage("versions", common))
        if set(stages) & set(COUNT_STAGES):
            if not (data / "data" / "test_images").is_dir():
                shutil.rmtree(data, ignore_errors=True)
                res["prepare_tables"] = run_stage("tables", {**common, "counts_scale": args.counts_scale})
            res["config"]["counts"] = _counts(data / "data")
        if set(stages) & set(IMAGE_PART):
            if not (photos / "data").is_dir():
                res["prepare_photos"] = run_stage("photos", {**common, "scale": args.scale, "min_width": args.photo_px[0],
                                                             "max_width": args.photo_px[1]})  # fmt: skip
            n_photos = sum(1 for split in ("train", "test") for _ in (photos / "data" / f"{split}_images").iterdir())
            res["config"]["photos"] = {"count": n_photos, "min_width": args.photo_px[0], "max_width": args.photo_px[1]}
        for stage in stages:
            print(f"{stage} ...", file=sys.stderr, flush=True)
            if stage == "arcface":
                arc = {**common, "backbone": args.backbone, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
                       "warmup": args.warmup}  # fmt: skip
                res["stages"]["arcface"] = arcface_rounds(arc, args.baseline_classes, args.rounds)
            elif stage == "image":
                res["stages"]["image"] = [run_stage("image", {**common, "name": name, "workers": w})
                                          for name in IMAGE_STAGES for w in sorted({1, cores})]  # fmt: skip
            else:
                res["stages"][stage] = run_stage(stage, common)
            save_results(res, args.out, markdown, t_start)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    save_results(res, args.out, markdown)
    print(res["markdown"])
    print(f"\nwrote {args.out} ({res['total_s']:.0f} s)", file=sys.stderr)
    return 0


def _counts(data: Path) -> dict[str, int]:
    """Rows of train.csv, its individuals and the test rows, read with the standard library (the parent stays small)."""
    import csv

    with open(data / "train.csv", newline="") as f:
        ids = [r["individual_id"] for r in csv.DictReader(f)]
    with open(data / "sample_submission.csv", newline="") as f:
        test = sum(1 for _ in csv.DictReader(f))
    return {"train": len(ids), "individuals": len(set(ids)), "test": test}


if __name__ == "__main__":
    sys.exit(main())
