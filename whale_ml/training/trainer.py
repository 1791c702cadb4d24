"""Training one ArcFace fold model.

The recipe avoids the reference notebook's defects by construction (docs/training.md,
"The reference notebook" and the table of tests after it):

* one optimiser over the backbone *and* the heads (embedding layer, GeM, the
  ArcFace class centres), with the heads at their own (higher) learning rate,
  so every parameter that the loss depends on is actually trained, once per step;
* the schedule is sized in optimiser steps and stepped once per optimiser
  step, gradient accumulation included (the last partial window too);
* evaluation images get a deterministic resize + normalise, never augmentation;
* bf16 autocast on GPUs that support it, fp16 only with a gradient scaler;
* validation is MAP@5 with new_individual, through the same retrieval code
  as the submission, on folds that hold out whole individuals.

The loop is split as timm's ``train.py`` splits its own: :func:`build_training`
makes the parts, :func:`train_one_epoch` trains one pass over the data,
:func:`validate` scores the model (every ``val_every`` epochs, on the fold or a
fixed sample of it: :mod:`whale_ml.training.validation`), a
:class:`~whale_ml.training.checkpoint_saver.CheckpointSaver` writes ``best.pt``
and ``last.pt`` (atomically, every epoch, with the optimiser, scheduler, scaler
and RNG states, so an interrupted run resumes from the last complete epoch as
if it had never stopped), and :func:`train_fold` runs them in order.
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

from whale_ml.stage_configs import TrainConfig
from whale_ml.data.images import ImageDataset, autoaugment_transform, train_transform
from whale_ml.io import remove_stale_temps
from whale_ml.models.embedding import EmbeddingNet, create_embedding_model
from whale_ml.progress import ProgressFn
from whale_ml.retrieval.centres import ClassCentres
from whale_ml.retrieval.embeddings import autocast_for, native_cpu_bf16_here, uses_channels_last
from whale_ml.threads import using_threads
from whale_ml.training.checkpoint_saver import CheckpointSaver, load_checkpoint
from whale_ml.training.checkpoint_saver import save_checkpoint as save_checkpoint  # callers import it from here
from whale_ml.training.losses import class_centres, create_loss, create_species_loss
from whale_ml.training.validation import ValidationSet, skip_validation, validation_due, validation_set
from whale_ml.training.validation import validate as validate  # callers import it from here

EpochCallback = Callable[[int, dict[str, float]], None]
LogFn = Callable[[str], None]
# Given an epoch, the progress callback of that epoch's validation (a fresh count each time).
ValProgress = Callable[[int], ProgressFn]


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
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.species_fn = model, loss_fn, species_fn
        self.species_weight, self.amp_dtype, self.channels_last = species_weight, amp_dtype, channels_last

    def forward(self, images: torch.Tensor, targets: torch.Tensor, species: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last:  # the layout the model's weights are in (build_training)
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            embeddings = self.model(images)
        embeddings = embeddings.float()  # the margin arithmetic in fp32
        loss = self.loss_fn(embeddings, targets)
        if self.species_fn is not None and species is not None:
            loss = loss + self.species_weight * self.species_fn(embeddings, species)
        return loss


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (the CUDA ones with torch's)."""
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


def data_fingerprint(train: pd.DataFrame, val: pd.DataFrame) -> str:
    """Digest of a fold's photos and labels: a checkpoint is only resumed on the same data.

    A photo counts by its file name, not its folder: a crop's name carries a digest of its
    photo, box, size and mode (whale_ml/detection/crops.py), so a moved or copied home keeps
    its fold models, as it keeps its tables' data versions (whale_assets/versions.py)."""
    h = hashlib.sha1()
    for frame, cols in ((train, ["path", "label"]), (val, ["path", "truth"])):
        named = frame[cols].astype(str).assign(path=lambda f: f["path"].map(lambda p: Path(p).name)) if len(frame) else frame
        rows = sorted(map(tuple, named[cols].to_numpy().tolist())) if len(frame) else []
        h.update(repr(rows).encode())
    return h.hexdigest()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[EmbeddingNet, TrainConfig]:
    """A trained embedding model and its recipe, from a ``best.pt`` checkpoint."""
    ckpt = load_checkpoint(path, map_location=device)
    cfg = TrainConfig(**ckpt["config"])
    model = create_embedding_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def load_class_centres(path: str | Path) -> ClassCentres | None:
    """The ArcFace class centres a ``best.pt`` keeps (None: made before they were kept)."""
    return ClassCentres.from_checkpoint(load_checkpoint(path, map_location="cpu"))


class _SamplerOrder:
    """The state an MPerClassSampler carries from epoch to epoch, for ``last.pt``.

    It shuffles its own list of labels in place each epoch (with numpy's global RNG), so
    the next epoch's batches depend on that order as well as on the RNG: a resumed run
    needs both to draw the batches the uninterrupted run would have drawn.
    """

    def __init__(self, sampler: MPerClassSampler) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"labels": torch.tensor([int(label) for label in self.sampler.labels], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        by_value = {int(label): label for label in self.sampler.labels}  # the sampler's own key objects
        self.sampler.labels = [by_value[int(v)] for v in state["labels"].tolist()]


@dataclass
class TrainParts:
    """What one run trains with: built once, then restored from ``last.pt`` on resume.

    ``step`` is the :class:`_TrainStep` over ``model`` and the losses, wrapped in
    DistributedDataParallel under torchrun.
    """

    model: EmbeddingNet
    loss_fn: torch.nn.Module
    species_fn: torch.nn.Module | None
    species_names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: torch.nn.Module
    loader: DataLoader

    def checkpointed(self) -> dict[str, Any]:
        """The stateful parts by their key in ``last.pt`` (the order they are saved and restored in)."""
        species = {"species_loss": self.species_fn} if self.species_fn is not None else {}
        sampler = {"sampler": _SamplerOrder(self.loader.sampler)} if isinstance(self.loader.sampler, MPerClassSampler) else {}
        return {
            "model": self.model,
            "loss": self.loss_fn,
            **species,
            **sampler,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }


def _train_sampler(
    cfg: TrainConfig, dataset: ImageDataset, labels: np.ndarray, rank: int, world: int, log: LogFn
) -> torch.utils.data.Sampler | None:
    """m-per-class batches when they fit, a DDP shard of a shuffled epoch under torchrun, else None (shuffle)."""
    n_individuals = len(np.unique(labels))
    use_sampler = cfg.m_per_class > 1 and cfg.batch_size % cfg.m_per_class == 0 and n_individuals * cfg.m_per_class >= cfg.batch_size
    if cfg.m_per_class > 1 and not use_sampler:
        fit = f"batch {cfg.batch_size}, m {cfg.m_per_class}, {n_individuals} individuals do not fit"
        log(f"m-per-class sampler off: {fit}; shuffling instead")
    if use_sampler and world > 1:
        log("m-per-class sampler off under DDP: each process takes its shard of a shuffled epoch")
        use_sampler = False
    if use_sampler:
        return MPerClassSampler(labels, m=cfg.m_per_class, batch_size=cfg.batch_size, length_before_new_iter=len(labels))
    if world > 1:
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    return None


def build_train_loader(
    cfg: TrainConfig,
    train: pd.DataFrame,
    species_codes: np.ndarray | None,
    device: torch.device,
    log: LogFn = print,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """The augmented training batches of one process: ``(images, labels[, species])``.

    Args:
        cfg: the recipe (augmentation, batch size, sampler, workers).
        train: ``path, label`` of the training images.
        species_codes: each image's species code, for the species head; None without one.
        device: where the batches go (pinned memory on CUDA).
        log: why a sampler was turned off.
        rank: this process's rank under DDP.
        world: the number of DDP processes (1 without DDP).
    """
    labels = train["label"].to_numpy()
    augment = autoaugment_transform(cfg.image_size) if cfg.augment == "autoaugment" else train_transform(cfg.image_size)
    dataset = ImageDataset(train["path"].tolist(), augment, labels, species_codes)
    sampler = _train_sampler(cfg, dataset, labels, rank, world, log)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=len(dataset) > cfg.batch_size * world,  # BatchNorm needs >1 image per batch
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # Workers start afresh each epoch, seeded from the main process's RNG (which last.pt
        # saves): persistent workers would carry their RNG streams across epochs, out of reach
        # of a checkpoint, and a resumed run would augment differently from an uninterrupted one.
        persistent_workers=False,
    )


def build_training(
    cfg: TrainConfig,
    train: pd.DataFrame,
    num_classes: int,
    device: torch.device,
    log: LogFn = print,
    rank: int = 0,
    world: int = 1,
) -> TrainParts:
    """Model, losses, optimiser, loader, schedule and scaler of a fresh run, in the order that fixes their initial weights.

    Args:
        cfg: the recipe.
        train: ``path, label`` (and ``species`` with the species head) of the training images.
        num_classes: size of the ArcFace head (all individuals' labels).
        device: where the run trains.
        log: progress messages.
        rank: this process's rank under DDP.
        world: the number of DDP processes (1 without DDP).

    Raises:
        ValueError: the species head without a ``species`` column.
    """
    labels = train["label"].to_numpy()
    if cfg.species_head and "species" not in train.columns:
        raise ValueError("species_head needs a 'species' column in the training table")
    model = create_embedding_model(cfg).to(device)
    loss_fn = create_loss(cfg, num_classes, np.bincount(labels, minlength=num_classes)).to(device)
    species_codes, species_names = pd.factorize(train["species"], sort=True) if cfg.species_head else (None, [])
    species_fn = create_species_loss(cfg, len(species_names)).to(device) if cfg.species_head else None
    amp_dtype, needs_scaler = autocast_for(device, cfg.precision)
    if device.type == "cpu" and amp_dtype is not None and not native_cpu_bf16_here():
        log(f"precision {cfg.precision}: this CPU has no native bf16 (AMX or AVX512-BF16): emulated, slower than fp32")
    channels_last = uses_channels_last(device, cfg.memory_format, amp_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg, model, loss_fn, *([species_fn] if species_fn is not None else []))
    loader = build_train_loader(cfg, train, species_codes, device, log, rank, world)
    scheduler = create_scheduler(cfg, optimizer, math.ceil(len(loader) / cfg.accumulate))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    # One module computes the loss, so that DDP all-reduces the gradients of the class
    # centres too, not only the backbone's.
    step: torch.nn.Module = _TrainStep(model, loss_fn, species_fn, cfg.species_weight, amp_dtype, channels_last)
    if world > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"DDP: {world} processes, {len(loader)} batches of {cfg.batch_size} each per epoch ({dist.get_backend()})")
    return TrainParts(model, loss_fn, species_fn, list(species_names), optimizer, scheduler, scaler, step, loader)


@dataclass
class EpochStats:
    """One epoch of training: mean loss per image, images trained by all processes, wall time."""

    train_loss: float
    images: int
    seconds: float


def _optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, grad_clip: float
) -> None:
    """Clip (on unscaled gradients), step, clear the gradients, and step the schedule with the optimiser."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def train_one_epoch(
    epoch: int,
    step: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    accumulate: int = 1,
    grad_clip: float = 0.0,
    world: int = 1,
) -> EpochStats:
    """One pass over ``loader``: an optimiser (and scheduler) step every ``accumulate`` batches.

    The last window of an epoch may be shorter; it steps too, with its losses averaged
    over its own length. Under DDP, gradients are all-reduced once per optimiser step.

    Args:
        epoch: 1-based; reshuffles a DistributedSampler (the same shuffle on every rank).
        step: images, labels (and species) in, the loss out; DDP-wrapped under torchrun.
        loader: the training batches.
        optimizer: steps every window.
        scheduler: steps with the optimiser.
        scaler: the fp16 gradient scaler (a no-op when disabled).
        device: where the batches go.
        accumulate: batches per optimiser step.
        grad_clip: max gradient norm; 0 disables clipping.
        world: the number of DDP processes (1 without DDP).
    """
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # another shuffle each epoch, the same on every rank
    step.train()
    batches = len(loader)
    t0 = time.perf_counter()
    running, seen = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets, *species) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        window_start = (i // accumulate) * accumulate
        window = min(accumulate, batches - window_start)  # the last window may be short
        last_of_window = i - window_start + 1 == window
        species_targets = species[0].to(device, non_blocking=True) if species else None
        # Under DDP, all-reduce once per optimiser step, not once per accumulated batch.
        with step.no_sync() if world > 1 and not last_of_window else nullcontext():  # type: ignore[operator]
            loss = step(images, targets, species_targets)
            scaler.scale(loss / window).backward()
        if last_of_window:
            _optimizer_step(optimizer, scheduler, scaler, grad_clip)
        running += float(loss.detach()) * len(images)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    seen *= world  # every rank trained as many images
    return EpochStats(train_loss=running / max(1, seen / world), images=seen, seconds=elapsed)


def _epoch_metrics(stats: EpochStats, parts: TrainParts) -> dict[str, float]:
    return {
        "train_loss": stats.train_loss,
        "images_per_second": stats.images / max(stats.seconds, 1e-9),
        "lr_backbone": parts.optimizer.param_groups[0]["lr"],
        "lr_head": parts.optimizer.param_groups[1]["lr"],
        "gem_p": float(parts.model.pool.p.detach()),
        "threads": float(torch.get_num_threads()),  # what this epoch ran with (whale_ml/threads.py)
    }


def _stop_everywhere(stop: bool, world: int) -> bool:
    """Rank 0 alone validated: its decision holds for every process (and keeps them in step)."""
    if world > 1:
        decision = [stop]
        dist.broadcast_object_list(decision, src=0)
        stop = bool(decision[0])
    return stop


def _prepare_run(cfg: TrainConfig, out_dir: str | Path, rank: int, world: int, log: LogFn) -> tuple[Path, torch.device]:
    """The run's folder (cleared of half-written checkpoints) and its device."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out) if rank == 0 else []:  # half-written checkpoints of a killed run (never renamed)
        log(f"removed {stale.name}, left by an interrupted checkpoint write")
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # set per rank by the launcher
    return out, device


def _measured(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics an epoch actually measured: without the NaN of a skipped validation."""
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _validation_metrics(
    epoch: int, cfg: TrainConfig, model: EmbeddingNet, vset: ValidationSet, device: torch.device, val_progress: ValProgress | None
) -> dict[str, float]:
    """This epoch's validation metrics, or NaN for them when ``val_every`` skips it."""
    if not validation_due(epoch, cfg):
        return skip_validation()
    progress = val_progress(epoch) if val_progress is not None else None
    return validate(model, cfg, vset.gallery, vset.queries, device, progress=progress)


def train_fold(
    cfg: TrainConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    num_classes: int,
    out_dir: str | Path,
    on_epoch_end: EpochCallback | None = None,
    log: LogFn = print,
    val_progress: ValProgress | None = None,
) -> TrainResult:
    """Train one fold model; resume from ``out_dir/last.pt`` when it exists.

    Under DDP (a process group set up by torchrun), rank 0 alone logs, validates and
    writes checkpoints. The run uses ``$WHALE_THREADS`` torch threads, default every core
    (:func:`whale_ml.threads.pipeline_threads`), whatever an earlier stage in this process
    left behind; each epoch's ``threads`` in the history says what it ran with.
    Validation runs every ``cfg.val_every`` epochs and after the last, on the fold or on
    ``cfg.val_sample`` of it (:mod:`whale_ml.training.validation`); an epoch without it has
    NaN validation metrics in the history and cannot become ``best.pt``.

    Args:
        cfg: the recipe.
        train: ``path, label, individual_id`` of the fold's training images.
        val: ``path, truth`` of its validation images (may be empty).
        num_classes: size of the ArcFace head (all individuals' labels).
        out_dir: where ``last.pt`` (resume) and ``best.pt`` (the model) go.
        on_epoch_end: called with the epoch (1-based) and the metrics it measured (no
            validation metrics on an epoch without validation).
        log: progress messages.
        val_progress: given an epoch, the ``progress(done, total)`` callback of its
            validation (photos embedded, gallery and queries together).

    Returns:
        The best checkpoint (by validation MAP@5, else the last epoch) and history.
    """
    with using_threads():
        return _fit(cfg, train, val, num_classes, out_dir, on_epoch_end, log, val_progress)


def _start_from(model: torch.nn.Module, path: str | Path, log: LogFn) -> None:
    """Load a fold model's weights (``best.pt``'s ``model``) into ``model``: the same backbone,
    pooling and embedding head, which must match exactly (a clear error names the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights: no checkpoint at {path}")
    state = load_checkpoint(path, map_location="cpu").get("model")
    if state is None:
        raise ValueError(f"init_weights: {path} holds no 'model' weights (is it a fold model's best.pt?)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"init_weights: {path} does not fit this recipe's model (backbone, embedding size): {exc}") from exc
    log(f"started from the weights of {path}")


def _centres_of(parts: TrainParts, train: pd.DataFrame) -> Callable[[], ClassCentres] | None:
    """What ``best.pt`` keeps of the class centres: those of the fold's training individuals."""
    if "individual_id" not in train or train.empty:
        return None
    firsts = train.drop_duplicates("label")
    individual_of_label = dict(zip(firsts["label"].astype(int), firsts["individual_id"].astype(str), strict=True))
    return lambda: class_centres(parts.loss_fn, individual_of_label)


def _fit(
    cfg: TrainConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    num_classes: int,
    out_dir: str | Path,
    on_epoch_end: EpochCallback | None,
    log: LogFn,
    val_progress: ValProgress | None,
) -> TrainResult:
    rank, world = _rank_world()
    if rank != 0:
        log, on_epoch_end = (lambda _m: None), None
    out, device = _prepare_run(cfg, out_dir, rank, world, log)
    seed_everything(cfg.seed)
    parts = build_training(cfg, train, num_classes, device, log, rank, world)
    if cfg.init_weights:
        _start_from(parts.model, cfg.init_weights, log)  # before resume: a last.pt, when there is one, overrides it
    species = {"species": parts.species_names} if parts.species_fn is not None else None
    fingerprint, centres = data_fingerprint(train, val), _centres_of(parts, train)
    saver = CheckpointSaver(out, cfg, num_classes, fingerprint, parts.checkpointed(), species, write=rank == 0, centres=centres)
    progress = saver.resume(cfg.epochs, cfg.patience, device, log)
    validates = len(val) > 0 and rank == 0
    vset = validation_set(train, val, cfg.val_sample, cfg.seed)
    epochs = range(progress.epoch + 1, 0 if progress.stopped(cfg.patience) else cfg.epochs + 1)
    if len(val) and len(epochs):
        log(f"validation every {cfg.val_every} epoch(s) and after the last, on {vset.describe()}")
    images, seconds = 0, 0.0
    for epoch in epochs:
        stats = train_one_epoch(
            epoch, parts.step, parts.loader, parts.optimizer, parts.scheduler, parts.scaler, device, cfg.accumulate, cfg.grad_clip, world
        )
        images, seconds = images + stats.images, seconds + stats.seconds
        metrics = _epoch_metrics(stats, parts)
        if validates:
            metrics.update(_validation_metrics(epoch, cfg, parts.model, vset, device, val_progress))
        improved = progress.observe(epoch, metrics.get("val_map5"), metrics.get("val_threshold"))
        progress.epoch = epoch
        progress.history.append({"epoch": epoch, **metrics})
        saver.save(progress, improved)
        log(f"epoch {epoch}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in _measured(metrics).items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, _measured(metrics))
        if _stop_everywhere(progress.stopped(cfg.patience), world):
            best = f"best {progress.best_map5:.4f} at epoch {progress.best_epoch}"
            log(f"early stop: no validation gain in {progress.stale} validations ({best})")
            break
    return TrainResult(
        checkpoint=saver.best_path,
        best_epoch=progress.best_epoch,
        best_map5=progress.best_map5,
        threshold=progress.best_threshold,
        epochs_run=len(progress.history),
        history=progress.history,
        images_per_second=images / seconds if seconds else _history_rate(progress.history),
    )


def _history_rate(history: list[dict[str, float]]) -> float:
    """The training rate of the epochs in ``history`` (their median): what a reused or resumed
    model reports when this process trained no epoch of it, rather than 0."""
    rates = [float(row["images_per_second"]) for row in history if row.get("images_per_second") == row.get("images_per_second")]
    rates = [r for r in rates if r > 0]
    return float(sorted(rates)[len(rates) // 2]) if rates else 0.0
