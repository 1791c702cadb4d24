"""A home with class centres made from a finished run's ``last.pt``.

Fold models trained before ``best.pt`` kept the ArcFace class centres still hold them in
``last.pt`` (the loss state, for resuming), next to the model weights of the same, last
epoch. This script takes that consistent pair from every fold of ``SOURCE`` home and
writes a new ``HOME``: the last epoch's model as ``best.pt`` with its centres, the fold
embeddings (train and test crops) and class centres it makes, and a gallery version. The
tables, crops, boxes and the demo data stay in ``SOURCE`` and are read there. Then
``benchmarks/identification_ablation.py HOME --only-centres`` compares the embedding alone,
class centres, re-ranking and both on the same models.

Usage::

    python benchmarks/centres_last_epoch.py SOURCE HOME
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whale_ml.data.folds import fold_split  # noqa: E402
from whale_ml.gallery.build import build_gallery  # noqa: E402
from whale_ml.gallery.lineage import record_embeddings  # noqa: E402
from whale_ml.home import HomeLayout  # noqa: E402
from whale_ml.io import sha256_file  # noqa: E402
from whale_ml.models.embedding import create_embedding_model  # noqa: E402
from whale_ml.retrieval.centres import CHECKPOINT_KEY, ClassCentres, replace_centres  # noqa: E402
from whale_ml.retrieval.embeddings import embed_paths  # noqa: E402
from whale_ml.retrieval.store import save_embeddings  # noqa: E402
from whale_ml.stage_configs import GalleryConfig, TrainConfig  # noqa: E402
from whale_ml.training.checkpoint_saver import load_checkpoint, save_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("home", type=Path)
    args = ap.parse_args()
    src, dst = HomeLayout(args.source), HomeLayout(args.home)
    dst.home.mkdir(parents=True, exist_ok=True)
    for sub in ("tables", "demo_data"):
        if not (dst.home / sub).exists():
            (dst.home / sub).symlink_to((src.home / sub).resolve())
    for folder, record in ((src.detector_dir, "boxes.json"), (src.crops_dir, "crops.json")):
        target = dst.home / folder.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / record, target / record)
    cv = pd.read_parquet(src.tables / "cv_folds.parquet")
    crops = pd.read_parquet(src.tables / "crops.parquet")
    folds = sorted(p.name for p in (src.home / "models").iterdir() if (p / "last.pt").exists())
    for i, fold in enumerate(folds):
        if (dst.embeddings_dir(fold) / "test.npy").exists() and ClassCentres.load(dst.embeddings_dir(fold)) is not None:
            print(f"{fold}: done before, kept", flush=True)  # a run cut short goes on where it stopped
            continue
        start = time.perf_counter()
        last = load_checkpoint(src.model_dir(fold) / "last.pt")
        cfg = TrainConfig(**last["config"])
        train, _ = fold_split(cv, i)
        firsts = train.drop_duplicates("label")
        loss_w = last["loss"]["W"].float().numpy()
        centres = ClassCentres.from_weights(loss_w, cfg.sub_centers, dict(zip(firsts["label"].astype(int), firsts["individual_id"], strict=True)))
        checkpoint = dst.model_dir(fold) / "best.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, {"model": last["model"], "config": last["config"], "num_classes": last["num_classes"],
                                     "epoch": last["epoch"], CHECKPOINT_KEY: centres.to_checkpoint()})
        model = create_embedding_model(cfg, pretrained=False)
        model.load_state_dict(last["model"])
        out = dst.embeddings_dir(fold)
        for split in ("train", "test"):
            rows = crops[(crops["split"] == split) & (crops["crop_path"] != "")]
            save_embeddings(out, split, embed_paths(model.eval(), rows["crop_path"].tolist(), cfg.image_size, "cpu"), rows["image"].tolist())
        replace_centres(out, centres)
        record_embeddings(dst, fold, sha256_file(checkpoint), False, out)
        print(f"{fold}: epoch {last['epoch']}, {len(centres.ids)} centres, embedded in {time.perf_counter() - start:.0f} s", flush=True)
    train_meta = pd.read_parquet(src.tables / "train_metadata.parquet")
    version, _ = build_gallery(dst, folds, train_meta, crops, GalleryConfig(), lambda _lineage: [])
    print(f"gallery {version.name}: {len(version.table)} photos, centres of {[len(c.ids) if c else 0 for c in version.centres]}")


if __name__ == "__main__":
    main()
