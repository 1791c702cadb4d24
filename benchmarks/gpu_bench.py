"""GPU throughput of the real training and embedding code (run by benchmarks/gpu.sh).

Generates photos with the demo generator, writes full-frame crops at the
recipe's size through the pipeline's crop code, then measures, on one GPU:

* training images/s of ``train_fold`` (the pipeline's trainer: data loading from
  crop files, augmentation, bf16 autocast, channels_last, sub-center ArcFace), and
  the same model's step on tensors already on the GPU (the input-pipeline ratio);
* embedding images/s of ``embed_paths`` (the pipeline's embedder), and the
  model-only inference rate;
* peak GPU memory of each.

Prints one JSON object (also written to --out). Reference (REFERENCE.md): the
notebook trained tf_efficientnet_b4_ns at 384 px at ~79 images/s and embedded at
~270 images/s on one RTX A6000.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_model, print_json, timestamp

from whale_ml.stage_configs import TrainConfig
from whale_ml.data.demo import DemoDataConfig, generate_demo_data
from whale_ml.data.metadata import read_train_metadata
from whale_ml.detection.crops import write_crops
from whale_ml.detection.yolo import detect_boxes
from whale_ml.models.embedding import create_embedding_model
from whale_ml.retrieval.embeddings import autocast_for, embed_paths
from whale_ml.training.trainer import create_loss, create_optimizer, resolve_device, train_fold


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only_train_rate(cfg: TrainConfig, num_classes: int, device: torch.device, steps: int) -> float:
    """Images/s of the training step on tensors already on the device (no input pipeline)."""
    model = create_embedding_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(cfg, num_classes).to(device)
    opt = create_optimizer(cfg, model, loss_fn)
    amp_dtype, _ = autocast_for(device)
    x = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (cfg.batch_size,), device=device)
    times = []
    for i in range(steps + 5):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            emb = model(x)
        loss = loss_fn(emb.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times)


@torch.inference_mode()
def model_only_embed_rate(model: torch.nn.Module, size: int, batch: int, device: torch.device, steps: int) -> float:
    amp_dtype, _ = autocast_for(device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    times = []
    for i in range(steps + 3):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_b4.ns_jft_in1k")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--photos", type=int, default=600, help="distinct generated photos (repeated to --train-images)")
    parser.add_argument("--train-images", type=int, default=3200, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args()

    device = resolve_device("auto")
    work = Path(args.work or tempfile.mkdtemp(prefix="whale-gpu-"))
    result: dict[str, object] = {
        "date": timestamp(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "image_size": args.size,
        "batch": args.batch,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
    }

    t0 = time.perf_counter()
    n_ind = max(20, args.photos // 6)
    data = generate_demo_data(
        work / "data",
        DemoDataConfig(n_individuals=n_ind, n_new_individuals=0, min_images=4, max_images=8, test_share=0.0, min_width=400, max_width=640),
    )
    train = read_train_metadata(data)
    boxes = detect_boxes(train, None, 0.25, 1.0, 64)
    crops = write_crops(boxes, dict(zip(train["image"], train["path"], strict=True)), work / "crops", args.size)
    train = train.merge(crops[["image", "crop_path"]], on="image")
    result["data_prep_s"] = round(time.perf_counter() - t0, 1)
    reps = max(1, args.train_images // len(train))
    big = train.loc[train.index.repeat(reps)].reset_index(drop=True).assign(path=lambda d: d["crop_path"])
    num_classes = int(train["label"].max()) + 1

    cfg = TrainConfig(
        backbone=args.backbone,
        pretrained=False,
        image_size=args.size,
        embedding_size=512,
        sub_centers=2,
        epochs=args.epochs,
        batch_size=args.batch,
        m_per_class=1,
        lr_backbone=2e-4,
        lr_head=2e-3,
        num_workers=args.workers,
        device=str(device),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train_fold(cfg, big, big.iloc[:0], num_classes, work / "model", log=print)
    rates = [h["images_per_second"] for h in res.history]
    result["train_steps"] = args.epochs * (len(big) // args.batch)
    result["train_images_per_s_by_epoch"] = [round(r, 1) for r in rates]
    result["train_images_per_s"] = round(statistics.median(rates[1:] if len(rates) > 1 else rates), 1)  # epoch 1 holds cudnn warm-up
    result["train_wall_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        result["train_peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()

    result["train_model_only_images_per_s"] = round(model_only_train_rate(cfg, num_classes, device, steps=30), 1)
    result["train_input_pipeline_ratio"] = round(result["train_images_per_s"] / result["train_model_only_images_per_s"], 3)

    from whale_ml.training.trainer import load_model

    model, _ = load_model(res.checkpoint, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    paths = big["crop_path"].tolist()
    # Both input paths in the same run: PIL decoding in the workers (the baseline) and
    # batched JPEG decoding on the device (nvJPEG on a GPU).
    for decode in ("cpu", "device"):
        kw = {"num_workers": args.workers, "decode": decode}
        embed_paths(model, paths[: args.embed_batch * 2], args.size, device, args.embed_batch, **kw)  # warm-up
        t0 = time.perf_counter()
        emb = embed_paths(model, paths, args.size, device, args.embed_batch, **kw)
        _sync(device)
        result["embed_images"] = len(emb)
        result[f"embed_images_per_s_decode_{decode}"] = round(len(emb) / (time.perf_counter() - t0), 1)
    result["embed_images_per_s"] = max(result["embed_images_per_s_decode_cpu"], result["embed_images_per_s_decode_device"])
    result["embed_model_only_images_per_s"] = round(model_only_embed_rate(model, args.size, args.embed_batch, device, steps=20), 1)
    if device.type == "cuda":
        result["embed_peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["vs_notebook_train_x"] = round(result["train_images_per_s"] / 79.0, 2)
    result["vs_notebook_embed_x"] = round(result["embed_images_per_s"] / 270.0, 2)

    print_json(result, args.out)


if __name__ == "__main__":
    main()
