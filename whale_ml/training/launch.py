"""Training one fold model in several processes: DistributedDataParallel under ``torchrun``.

:func:`train_fold_distributed` writes the fold's tables and recipe beside the
model, starts ``torchrun --standalone --nproc_per_node=N -m whale_ml.training.launch``,
streams rank 0's output to ``log``, and reads the result back from the
checkpoints. Each worker (this module's ``main``) joins the process group --
NCCL with one GPU per process, gloo on CPU -- and runs the ordinary
:func:`~whale_ml.training.trainer.train_fold`, which shards each epoch with a
``DistributedSampler`` and leaves validation, logging and checkpoints to rank 0.
A killed run resumes like a single-process one: from ``last.pt``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import distributed as dist

from whale_ml.stage_configs import TrainConfig
from whale_ml.io import atomic_path, write_text
from whale_ml.threads import pipeline_threads
from whale_ml.training.trainer import LogFn, TrainResult, load_checkpoint, train_fold


def _inputs(out_dir: Path) -> Path:
    return out_dir / "ddp_inputs"


def train_fold_distributed(
    cfg: TrainConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    num_classes: int,
    out_dir: str | Path,
    processes: int,
    log: LogFn = print,
) -> TrainResult:
    """:func:`train_fold` in ``processes`` DDP processes; same arguments, same result.

    Each process takes ``cfg.batch_size`` images per step, so the global batch is
    ``processes * batch_size``. Raises ``RuntimeError`` with the end of the
    workers' output when they fail.
    """
    if processes < 2:
        raise ValueError(f"train_fold_distributed needs at least 2 processes, got {processes}")
    if torch.cuda.is_available() and cfg.device != "cpu" and processes > torch.cuda.device_count():
        raise ValueError(f"{processes} processes but {torch.cuda.device_count()} GPUs: one process per GPU")
    out = Path(out_dir)
    inputs = _inputs(out)
    inputs.mkdir(parents=True, exist_ok=True)
    for name, table in (("train", train), ("val", val)):
        with atomic_path(inputs / f"{name}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    write_text(inputs / "config.json", cfg.model_dump_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "whale_ml.training.launch",
        "--inputs",
        str(inputs),
        "--num-classes",
        str(num_classes),
        "--out",
        str(out),
    ]
    log(f"starting {processes} training processes: {' '.join(cmd[2:])}")
    # The pipeline's threads shared out: each worker's train_fold takes WHALE_THREADS, and
    # OMP_NUM_THREADS keeps its OpenMP from starting one thread per core in every process.
    per_process = str(max(1, pipeline_threads() // processes))
    env = {**os.environ, "OMP_NUM_THREADS": per_process, "WHALE_THREADS": per_process}
    tail: deque[str] = deque(maxlen=15)
    errors: list[str] = []  # the workers' own exceptions: torchrun's summary buries them
    # Its own process group, so that stopping this run stops every worker with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            tail.append(line)
            if ("Error" in line or "Exception" in line) and not line.startswith(("E1", "E0", " ")) and line not in errors:
                errors.append(line)
            if line:
                log(line)
        code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    if code != 0:
        raise RuntimeError(
            f"distributed training failed (exit {code}): "
            + ("; ".join(errors[:5]) or "no exception printed")
            + "\nlast output:\n"
            + "\n".join(tail)
        )
    return result_from_checkpoints(out)


def result_from_checkpoints(out_dir: str | Path) -> TrainResult:
    """The :class:`TrainResult` of a finished run, read from its ``last.pt`` and ``best.pt``."""
    out = Path(out_dir)
    state = load_checkpoint(out / "last.pt")
    history = list(state["history"])
    rates = [h["images_per_second"] for h in history if "images_per_second" in h]
    return TrainResult(
        checkpoint=out / "best.pt",
        best_epoch=int(state["best_epoch"]),
        best_map5=state["best_map5"],
        threshold=state["best_threshold"],
        epochs_run=len(history),
        history=history,
        images_per_second=float(np.mean(rates)) if rates else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    """One DDP worker (started by torchrun with RANK, WORLD_SIZE, LOCAL_RANK set)."""
    p = argparse.ArgumentParser(prog="python -m whale_ml.training.launch", description=main.__doc__)
    p.add_argument("--inputs", required=True, help="folder with train.parquet, val.parquet and config.json")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    inputs = Path(args.inputs)
    cfg = TrainConfig.model_validate_json((inputs / "config.json").read_text())
    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train_fold(
            cfg,
            pd.read_parquet(inputs / "train.parquet"),
            pd.read_parquet(inputs / "val.parquet"),
            args.num_classes,
            args.out,
            log=lambda m: print(m, flush=True),
        )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
