"""Thread settings (whale_ml/threads.py): a stage runs with the count the pipeline asks for,
and no library (ultralytics above all) leaves the process with fewer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from whale_ml.data.folds import fold_split, make_folds
from whale_ml.data.metadata import read_train_metadata
from whale_ml.environment import BadEnvironmentVariable, read_environment
from whale_ml.threads import (
    ThreadSettings,
    available_cores,
    pipeline_threads,
    preserved_threads,
    set_thread_env_defaults,
    using_threads,
)


@pytest.fixture(autouse=True)
def _thread_settings_unchanged():
    """Every test leaves the process's thread settings as it found them (and does not rely on another's)."""
    before = ThreadSettings.current()
    yield
    before.apply()


def test_preserved_threads_restores_torch_and_opencv_even_after_an_error() -> None:
    before = ThreadSettings.current()
    other_torch = 1 if before.torch_threads != 1 else 3
    other_cv2 = 1 if before.cv2_threads != 1 else 2
    with pytest.raises(RuntimeError, match="inside"), preserved_threads() as found:
        assert found == before
        torch.set_num_threads(other_torch)
        cv2.setNumThreads(other_cv2)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (other_torch, other_cv2)
        raise RuntimeError("inside")
    assert ThreadSettings.current() == before


def test_using_threads_sets_the_count_inside_and_puts_back_what_it_found() -> None:
    torch.set_num_threads(1)
    with using_threads(3) as n:
        assert n == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1


def test_the_count_is_whale_threads_else_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHALE_THREADS", raising=False)
    assert pipeline_threads() == available_cores() == len(os.sched_getaffinity(0))
    assert read_environment({}).threads is None
    monkeypatch.setenv("WHALE_THREADS", "3")
    assert pipeline_threads() == 3 and pipeline_threads(5) == 5
    assert read_environment({"WHALE_THREADS": "3"}).threads == 3
    monkeypatch.setenv("WHALE_THREADS", "0")
    with pytest.raises(BadEnvironmentVariable, match="WHALE_THREADS='0'"):
        pipeline_threads()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        pipeline_threads(0)


def test_thread_env_defaults_fill_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    set_thread_env_defaults(3)
    assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "1"


def test_importing_ultralytics_no_longer_leaves_one_openmp_thread(tmp_path: Path) -> None:
    """Ultralytics' import writes OMP_NUM_THREADS=1 when unset; a torch imported after it then starts on one thread."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from whale_ml.offline import configure_environment\n"
        "configure_environment(Path(sys.argv[1]))\n"
        "import ultralytics, torch\n"
        "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "WHALE_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == [str(available_cores())] * 2


def test_a_fold_trained_after_the_detector_in_one_process_uses_every_core(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_config
) -> None:
    """Real ultralytics training and prediction, then a fold model, in this one process.

    Ultralytics sets torch to cpu_count - 1 threads (at most 8) in every training and
    prediction; the count asked for here differs from that on every machine.
    """
    from whale_ml.detection.yolo import detect_boxes, read_box_file, train_yolo, write_yolo_dataset
    from whale_ml.training.trainer import train_fold

    wanted = min(8, max(1, (os.cpu_count() or 1) - 1)) + 1
    monkeypatch.setenv("WHALE_THREADS", str(wanted))
    torch.set_num_threads(wanted + 1)  # what the process had: neither ultralytics' count nor the pipeline's
    before = ThreadSettings.current()
    ds = write_yolo_dataset(read_box_file(tiny_data / "fluke_boxes.csv"), tiny_data / "train_images", tmp_path / "ds", 0.25, 0)
    weights, _ = train_yolo(ds, tmp_path / "yolo", epochs=1, imgsz=64, batch=8, device="cpu")
    assert ThreadSettings.current() == before, "training the detector left other thread settings behind"
    train = read_train_metadata(tiny_data)
    boxes = detect_boxes(train[["image", "path"]].head(4), weights, 0.25, 1.2, 64, device="cpu")
    assert len(boxes) == 4 and ThreadSettings.current() == before, "prediction left other thread settings behind"

    tr, val = fold_split(make_folds(train, 2, 0.2, 0), 0)
    result = train_fold(tiny_config(epochs=1), tr, val, int(train["label"].max()) + 1, tmp_path / "fold", log=lambda _m: None)
    assert [h["threads"] for h in result.history] == [wanted]
    assert torch.get_num_threads() == wanted + 1, "training put back the count it found"
