"""Training one ArcFace fold model.

The recipe avoids the reference notebook's defects by construction:

* one optimiser over the backbone *and* the heads (embedding layer, GeM, the
  ArcFace class centres), with the heads at their own (higher) learning rate,
  so every parameter that the loss depends on is actually trained, once per step;
* the schedule is sized in optimiser steps and stepped once per optimiser
  step, gradient accumulation included (the last partial window too);
* evaluation images get a deterministic resize + normalise, never augmentation;
* bf16 autocast on GPUs that support it, fp16 only with a gradient scaler;
* validation is MAP@5 with new_individual, through the same retrieval code
  as the submission, on folds that hold out whole individuals.

Checkpoints are written atomically every epoch with the optimiser,
scheduler, scaler and RNG states, so an interrupted run resumes from the last
complete epoch.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from whale_ml.checkpoints import load_weights_only
from whale_ml.config import TrainConfig
from whale_ml.data.images import ImageDataset, autoaugment_transform, train_transform
from whale_ml.io import atomic_path, remove_stale_temps
from whale_ml.models.embedding import EmbeddingNet, create_embedding_model
from whale_ml.retrieval.embeddings import autocast_for, embed_paths
from whale_ml.retrieval.gallery import build_index, search_gallery
from whale_ml.retrieval.ranking import tune_threshold
from whale_ml.training.losses import create_loss, create_species_loss

EpochCallback = Callable[[int, dict[str, float]], None]
LogFn = Callable[[str], None]


def resolve_device(spec: str) -> torch.device:
    """'auto' is the first GPU when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} asked for, but torch sees no CUDA GPU")
    return device


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of a torchrun/DDP process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _TrainStep(torch.nn.Module):
    """Model and losses as one module: images and labels in, the training loss out.

    Wrapped whole in DistributedDataParallel, so that the gradients of the class
    centres are averaged across processes along with the backbone's.
    """

    def __init__(
        self,
        model: EmbeddingNet,
        loss_fn: torch.nn.Module,
        species_fn: torch.nn.Module | None,
        species_weight: float,
        amp_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.species_fn = model, loss_fn, species_fn
        self.species_weight, self.amp_dtype = species_weight, amp_dtype

    def forward(self, images: torch.Tensor, targets: torch.Tensor, species: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            embeddings = self.model(images)
        embeddings = embeddings.float()  # the margin arithmetic in fp32
        loss = self.loss_fn(embeddings, targets)
        if self.species_fn is not None and species is not None:
            loss = loss + self.species_weight * self.species_fn(embeddings, species)
        return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_optimizer(cfg: TrainConfig, model: EmbeddingNet, *loss_modules: torch.nn.Module) -> torch.optim.Optimizer:
    """One optimiser, two parameter groups: backbone, and heads + class centres (of every loss)."""
    heads = [*model.head_parameters(), *(p for loss in loss_modules for p in loss.parameters())]
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr_backbone, "name": "backbone"},
        {"params": heads, "lr": cfg.lr_head, "name": "head"},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up, then cosine down to ``floor``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, sized in optimiser steps (the notebook sized it in batches)."""
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and total_steps >= 3:
        # OneCycleLR divides by each phase's length in steps: keep both phases >= 1 step.
        low, high = min(0.5, 2 / total_steps), max(min(0.5, 2 / total_steps), 1 - 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=min(high, max(low, warmup_steps / total_steps)),
        )
    # (also one-cycle runs of under 3 steps, which have no room for a cycle)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))


@dataclass
class TrainResult:
    """What a finished training run produced."""

    checkpoint: Path
    best_epoch: int
    best_map5: float | None
    threshold: float | None
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(train: pd.DataFrame, val: pd.DataFrame) -> str:
    """Digest of a fold's photos and labels: a checkpoint is only resumed on the same data."""
    h = hashlib.sha1()
    for frame, cols in ((train, ["path", "label"]), (val, ["path", "truth"])):
        rows = sorted(map(tuple, frame[cols].astype(str).to_numpy().tolist())) if len(frame) else []
        h.update(repr(rows).encode())
    return h.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only``).

    Raises:
        CheckpointError: a tampered, foreign or truncated file, named, with the reason.
    """
    return load_weights_only(path, map_location)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[EmbeddingNet, TrainConfig]:
    """A trained embedding model and its recipe, from a ``best.pt`` checkpoint."""
    ckpt = load_checkpoint(path, map_location=device)
    cfg = TrainConfig(**ckpt["config"])
    model = create_embedding_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def evaluate_fold(
    model: EmbeddingNet,
    cfg: TrainConfig,
    gallery: pd.DataFrame,
    queries: pd.DataFrame,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[float, float]:
    """Validation MAP@5 with new_individual (at its tuned threshold), and that threshold.

    ``gallery`` needs ``path, individual_id``; ``queries`` needs ``path, truth``.
    """
    kw = {"image_size": cfg.image_size, "device": device, "batch_size": batch_size, "num_workers": cfg.num_workers}
    g = embed_paths(model, gallery["path"].tolist(), **kw)
    q = embed_paths(model, queries["path"].tolist(), **kw)
    sims, ids = search_gallery(build_index(g), gallery["individual_id"].to_numpy(), q)
    result = tune_threshold(sims, ids, queries["truth"].tolist(), gallery_ids=gallery["individual_id"].tolist())
    return result.map5, result.threshold


def train_fold(
    cfg: TrainConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    num_classes: int,
    out_dir: str | Path,
    on_epoch_end: EpochCallback | None = None,
    log: LogFn = print,
) -> TrainResult:
    """Train one fold model; resume from ``out_dir/last.pt`` when it exists.

    Args:
        cfg: the recipe.
        train: ``path, label, individual_id`` of the fold's training images.
        val: ``path, truth`` of its validation images (may be empty).
        num_classes: size of the ArcFace head (all individuals' labels).
        out_dir: where ``last.pt`` (resume) and ``best.pt`` (the model) go.
        on_epoch_end: called with the epoch (1-based) and its metrics.
        log: progress messages.

    Returns:
        The best checkpoint (by validation MAP@5, else the last epoch) and history.
    """
    rank, world = _rank_world()
    if rank != 0:  # under DDP, rank 0 alone logs, validates and writes checkpoints
        log, on_epoch_end = (lambda _m: None), None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out) if rank == 0 else []:  # half-written checkpoints of a killed run (never renamed)
        log(f"removed {stale.name}, left by an interrupted checkpoint write")
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # set per rank by the launcher
    seed_everything(cfg.seed)

    labels = train["label"].to_numpy()
    if cfg.species_head and "species" not in train.columns:
        raise ValueError("species_head needs a 'species' column in the training table")
    model = create_embedding_model(cfg).to(device)
    loss_fn = create_loss(cfg, num_classes, np.bincount(labels, minlength=num_classes)).to(device)
    species_codes, species_names = pd.factorize(train["species"], sort=True) if cfg.species_head else (None, [])
    species_fn = create_species_loss(cfg, len(species_names)).to(device) if cfg.species_head else None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg, model, loss_fn, *([species_fn] if species_fn is not None else []))

    augment = autoaugment_transform(cfg.image_size) if cfg.augment == "autoaugment" else train_transform(cfg.image_size)
    dataset = ImageDataset(train["path"].tolist(), augment, labels, species_codes)
    n_individuals = len(np.unique(labels))
    use_sampler = cfg.m_per_class > 1 and cfg.batch_size % cfg.m_per_class == 0 and n_individuals * cfg.m_per_class >= cfg.batch_size
    if cfg.m_per_class > 1 and not use_sampler:
        log(
            f"m-per-class sampler off: batch {cfg.batch_size}, m {cfg.m_per_class}, {n_individuals} individuals do not fit; shuffling instead"
        )
    if use_sampler and world > 1:
        log("m-per-class sampler off under DDP: each process takes its shard of a shuffled epoch")
        use_sampler = False
    sampler: torch.utils.data.Sampler | None = None
    if use_sampler:
        sampler = MPerClassSampler(labels, m=cfg.m_per_class, batch_size=cfg.batch_size, length_before_new_iter=len(labels))
    elif world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=len(dataset) > cfg.batch_size * world,  # BatchNorm needs >1 image per batch
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    batches = len(loader)
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch)
    amp_dtype, needs_scaler = autocast_for(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    # One module computes the loss, so that DDP all-reduces the gradients of the class
    # centres too, not only the backbone's.
    step: torch.nn.Module = _TrainStep(model, loss_fn, species_fn, cfg.species_weight, amp_dtype)
    if world > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"DDP: {world} processes, {batches} batches of {cfg.batch_size} each per epoch ({dist.get_backend()})")

    start_epoch, best_map5, best_epoch, best_threshold, stale = 1, None, 0, None, 0
    history: list[dict[str, float]] = []
    last_path, best_path = out / "last.pt", out / "best.pt"
    config_dump = cfg.model_dump()
    fingerprint = data_fingerprint(train, val)
    if last_path.exists():
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt.get("config") == config_dump and ckpt.get("num_classes") == num_classes and ckpt.get("data") == fingerprint:
            model.load_state_dict(ckpt["model"])
            loss_fn.load_state_dict(ckpt["loss"])
            if species_fn is not None:
                species_fn.load_state_dict(ckpt["species_loss"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            start_epoch = int(ckpt["epoch"]) + 1
            best_map5, best_epoch, best_threshold = ckpt["best_map5"], int(ckpt["best_epoch"]), ckpt["best_threshold"]
            stale = int(ckpt["stale"])
            history = list(ckpt["history"])
            if start_epoch > cfg.epochs or (cfg.patience and stale >= cfg.patience):  # a finished run
                log(f"{last_path}: already trained with this recipe on this data ({start_epoch - 1} epochs); reusing {best_path}")
            else:
                log(f"resuming from {last_path} after epoch {start_epoch - 1}")
        else:
            log(f"{last_path} was made with another recipe or other data; starting afresh")

    total_images = 0
    total_time = 0.0
    stopped_early = bool(cfg.patience and stale >= cfg.patience)
    for epoch in range(start_epoch, 0 if stopped_early else cfg.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # another shuffle each epoch, the same on every rank
        model.train()
        t0 = time.perf_counter()
        running, seen = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for i, (images, targets, *species) in enumerate(loader):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            window_start = (i // cfg.accumulate) * cfg.accumulate
            window = min(cfg.accumulate, batches - window_start)  # the last window may be short
            last_of_window = i - window_start + 1 == window
            species_targets = species[0].to(device, non_blocking=True) if species else None
            # Under DDP, all-reduce once per optimiser step, not once per accumulated batch.
            with step.no_sync() if world > 1 and not last_of_window else nullcontext():  # type: ignore[operator]
                loss = step(images, targets, species_targets)
                scaler.scale(loss / window).backward()
            if last_of_window:
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            running += float(loss.detach()) * len(images)
            seen += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        seen *= world  # every rank trained as many images
        total_images += seen
        total_time += elapsed
        metrics: dict[str, float] = {
            "train_loss": running / max(1, seen / world),
            "images_per_second": seen / max(elapsed, 1e-9),
            "lr_backbone": optimizer.param_groups[0]["lr"],
            "lr_head": optimizer.param_groups[1]["lr"],
            "gem_p": float(model.pool.p.detach()),
        }
        improved = True
        if len(val) and rank == 0:
            map5, threshold = evaluate_fold(model, cfg, train, val, device)
            metrics["val_map5"], metrics["val_threshold"] = map5, threshold
            improved = best_map5 is None or map5 > best_map5
            if improved:
                best_map5, best_threshold = map5, threshold
        if improved:
            best_epoch, stale = epoch, 0
        else:
            stale += 1
        if improved and rank == 0:
            save_checkpoint(
                best_path,
                {
                    "model": model.state_dict(),
                    "config": config_dump,
                    "num_classes": num_classes,
                    "epoch": epoch,
                    "val_map5": best_map5,
                    "threshold": best_threshold,
                },
            )
        history.append({"epoch": epoch, **metrics})
        if rank == 0:
            save_checkpoint(
                last_path,
                {
                    "model": model.state_dict(),
                    "loss": loss_fn.state_dict(),
                    **({"species_loss": species_fn.state_dict(), "species": list(species_names)} if species_fn is not None else {}),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "config": config_dump,
                    "num_classes": num_classes,
                    "data": fingerprint,
                    "epoch": epoch,
                    "best_map5": best_map5,
                    "best_epoch": best_epoch,
                    "best_threshold": best_threshold,
                    "stale": stale,
                    "history": history,
                },
            )
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log(f"epoch {epoch}/{cfg.epochs}: {shown}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        stop = bool(cfg.patience and stale >= cfg.patience)
        if world > 1:  # rank 0 alone validated: its decision holds for all (and keeps them in step)
            decision = [stop]
            dist.broadcast_object_list(decision, src=0)
            stop = bool(decision[0])
        if stop:
            log(f"early stop: no validation gain for {stale} epochs (best {best_map5:.4f} at epoch {best_epoch})")
            break

    return TrainResult(
        checkpoint=best_path,
        best_epoch=best_epoch,
        best_map5=best_map5,
        threshold=best_threshold,
        epochs_run=len(history),
        history=history,
        images_per_second=total_images / total_time if total_time else 0.0,
    )
