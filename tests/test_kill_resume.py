"""Killing a training process (SIGKILL, no chance to clean up) and training again resumes from
the last complete epoch, with the epoch count and metrics carried on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from whale_ml.training.trainer import load_checkpoint, train_fold

pytestmark = pytest.mark.kill

EPOCHS = 6


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_mid_epoch_then_resume(fold, tmp_path: Path, tiny_config) -> None:
    tr, val, n_classes = fold
    tr.to_parquet(tmp_path / "train.parquet")
    val.to_parquet(tmp_path / "val.parquet")
    out = tmp_path / "model"
    cfg = tiny_config(epochs=EPOCHS)
    child = textwrap.dedent(
        f"""
        import pandas as pd, sys
        from whale_ml.stage_configs import TrainConfig
        from whale_ml.training.trainer import train_fold
        cfg = TrainConfig.model_validate_json({cfg.model_dump_json()!r})
        train_fold(cfg, pd.read_parquet({str(tmp_path / "train.parquet")!r}), pd.read_parquet({str(tmp_path / "val.parquet")!r}),
                   {n_classes}, {str(out)!r}, log=lambda m: print(m, flush=True))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith(f"epoch 2/{EPOCHS}"):
                os.killpg(proc.pid, signal.SIGKILL)  # now: in the middle of epoch 3
                break
            assert time.monotonic() < deadline, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    before = load_checkpoint(out / "last.pt")
    done = int(before["epoch"])
    assert 2 <= done < EPOCHS
    # Only whole checkpoints carry real names (a write cut short is a hidden temp file)...
    assert sorted(p.name for p in out.glob("[!.]*.pt")) == ["best.pt", "last.pt"]
    (out / ".last.abc123.tmp.pt").write_bytes(b"half a checkpoint")  # ...as a kill during a save leaves

    messages: list[str] = []
    epochs: list[int] = []
    result = train_fold(cfg, tr, val, n_classes, out, on_epoch_end=lambda e, _m: epochs.append(e), log=messages.append)
    assert any(f"resuming from {out / 'last.pt'} after epoch {done}" in m for m in messages)
    assert not list(out.glob(".*.tmp.pt")), "the next run clears what a killed write left"
    assert epochs == list(range(done + 1, EPOCHS + 1))
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    # The epochs before the kill keep the metrics they were logged with.
    pd.testing.assert_frame_equal(pd.DataFrame(result.history[:done]), pd.DataFrame(before["history"]))
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == EPOCHS and state["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] * EPOCHS // done
