"""A catalogue writer or reader run as its own process by tests/test_catalogue.py.

    python tests/catalogue_worker.py ACTION HOME [ARGS...] [--pause-at STEP]

Actions: ``publish`` (a new version extending the current one by one row), ``enroll CSV
IMAGES`` (the library call ``whale enroll`` makes), ``build`` (the gallery stage's
``build_gallery`` over the home's fold embeddings), ``prune KEEP``, ``read NAME SECONDS``
(load version NAME again and again, printing one line per outcome). With ``--pause-at
STEP`` the writer stops at that publishing step: it creates ``HOME/../paused.STEP`` and
waits until ``HOME/../go`` exists (or is killed there), so a test can act at an exact
moment of a real process's work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _pauser(home: Path, pause_at: str | None):  # noqa: ANN202
    def on_step(step: str) -> None:
        if step != pause_at:
            return
        (home.parent / f"paused.{step}").touch()
        while not (home.parent / "go").exists():
            time.sleep(0.02)

    return on_step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action")
    parser.add_argument("home", type=Path)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--pause-at")
    a = parser.parse_args(argv)

    from whale_ml.gallery import LineageError, load_version, prune_versions, write_version
    from whale_ml.gallery.catalogue import catalogue_lock
    from whale_ml.home import HomeLayout

    layout = HomeLayout(a.home)
    on_step = _pauser(a.home, a.pause_at)
    if a.action == "publish":
        with catalogue_lock(layout, "test publish"):
            current = load_version(layout)
            row = pd.DataFrame([{"image": f"p{time.time_ns()}.jpg", "individual_id": "published", "species": "orca", "crop_path": "", "source": "pipeline"}])
            extra = np.eye(1, current.embeddings.shape[1], dtype=np.float32)
            version = write_version(
                layout,
                pd.concat([current.table, row], ignore_index=True),
                np.concatenate([current.embeddings, extra]),
                current.lineage,
                made_by="test publish",
                centres=current.centres,
                on_step=on_step,
            )
        print(json.dumps({"version": version.name}))
    elif a.action == "enroll":
        from whale_ml.identify import enroll

        summary = enroll(a.args[0], a.args[1], layout, lambda release, lineage: gallery_models_of(release, lineage), on_step=on_step)
        print(json.dumps({k: summary[k] for k in ("version", "parent")}))
    elif a.action == "build":
        from whale_ml.gallery import build_gallery
        from whale_ml.stage_configs import GalleryConfig

        meta = pd.read_csv(a.home / "train_metadata.csv", dtype=str, keep_default_na=False)
        crops = pd.read_csv(a.home / "crops.csv", dtype=str, keep_default_na=False)
        version, _ = build_gallery(layout, ["fold0"], meta, crops, GalleryConfig(), lambda release, lineage: gallery_models_of(release, lineage), on_step=on_step)
        print(json.dumps({"version": version.name}))
    elif a.action == "prune":
        print(json.dumps({"pruned": prune_versions(layout, int(a.args[0]))}))
    elif a.action == "read":
        name, until = a.args[0], time.monotonic() + float(a.args[1])
        (a.home.parent / "reading").touch()
        while time.monotonic() < until and not (a.home.parent / "stop").exists():
            try:
                version = load_version(layout, name)
                whole = len(version.table) == len(version.embeddings) == version.index.ntotal and all(c is not None for c in version.centres)
                print("whole" if whole else "partial", flush=True)
            except LineageError as exc:
                print("gone" if "not found" in str(exc) else f"error {exc}", flush=True)
            except Exception as exc:  # noqa: BLE001 - the test counts every other failure
                print(f"error {type(exc).__name__}: {exc}", flush=True)
    else:
        parser.error(f"unknown action {a.action}")
    return 0


def gallery_models_of(layout, lineage):  # noqa: ANN001, ANN201
    from whale_ml.gallery.models import gallery_models

    return gallery_models(lineage, layout.model_dir, None, layout.home / "model_cache")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
