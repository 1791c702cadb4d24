"""Security: no code runs from a model file, servers stay on 127.0.0.1 by default, no secrets
in the repository, and a Dockerfile that is right by reading (no Docker engine here)."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from whale_ml.checkpoints import CheckpointError
from whale_ml.detection.weights import check_detector_weights
from whale_ml.detection.yolo import detect_boxes, install_weights, read_box_file, train_yolo, write_yolo_dataset
from whale_ml.models.embedding import create_backbone
from whale_ml.retrieval.store import load_embeddings, save_embeddings
from whale_ml.training.trainer import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class Gadget:
    """Unpickling this calls a function of an allowlisted package: ultralytics' own full-pickle loader."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        from ultralytics.nn.tasks import torch_safe_load

        return (torch_safe_load, (str(self.target),))


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: plain unpickling does run it, so 'the marker is absent' below means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---------------------------------------------------------------- training checkpoints


@pytest.fixture
def real_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint shaped like the trainer's: weights, config, plain numbers."""
    path = tmp_path / "best.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "config": {"backbone": "test_resnet"}, "epoch": 3}, path)
    return path


def test_a_weights_checkpoint_loads(real_checkpoint: Path) -> None:
    assert load_checkpoint(real_checkpoint)["epoch"] == 3


def test_tampered_checkpoint_is_refused_naming_the_file_and_the_payload(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "best.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "evil": Payload(marker)}, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: refused to load: it references posix.system") and "nothing in it was run" in message
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_payload_hidden_from_the_static_scan_is_still_refused(tmp_path: Path) -> None:
    """Pickle protocol 4 (frames, STACK_GLOBAL) hides the global from torch's static reader;
    the weights_only unpickler refuses the file anyway."""
    marker = tmp_path / "ran"
    bad = tmp_path / "best.pt"
    torch.save({"evil": Payload(marker)}, bad, pickle_protocol=4)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(bad))}: refused to load"):
        load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_legacy_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "last.pt"
    bad.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda raw: raw[: len(raw) // 2], "zip file cut off or corrupted"),
        (lambda raw: b"<html>404</html>", "not a torch checkpoint"),
        (lambda raw: b"", "not a torch checkpoint"),
        (lambda raw: raw[:30] + bytes(len(raw) - 30), "not a complete torch checkpoint"),
    ],
)
def test_truncated_or_garbled_checkpoint_is_a_clear_error(real_checkpoint: Path, damage, expected: str) -> None:  # type: ignore[no-untyped-def]
    real_checkpoint.write_bytes(damage(real_checkpoint.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(real_checkpoint)
    assert str(info.value).startswith(str(real_checkpoint)) and expected in str(info.value)


def test_backbone_weights_file_is_loaded_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="posix.system"):
        create_backbone("test_resnet", pretrained=True, weights_file=str(bad))
    assert not marker.exists()


def test_embedding_files_never_unpickle(tmp_path: Path) -> None:
    save_embeddings(tmp_path, "train", np.zeros((1, 4), np.float32), ["a.jpg"])
    marker = tmp_path / "ran"
    np.save(tmp_path / "train.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_embeddings(tmp_path, "train")
    assert not marker.exists()


def test_no_unsafe_load_in_the_sources() -> None:
    """Every torch.load goes through whale_ml/checkpoints.py; no pickle/yaml.load/allow_pickle=True anywhere."""
    risky = re.compile(
        r"torch\.load\(|pickle\.loads?\(|cloudpickle\.load|joblib\.load|allow_pickle\s*=\s*True|yaml\.load\(|weights_only\s*=\s*False"
    )
    found = []
    for folder in ("whale_ml", "whale_assets", "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if risky.search(line) and not (path.name == "checkpoints.py" and "weights_only=True" in line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert found == []


# ---------------------------------------------------------------- detector weights (ultralytics unpickles in full)


@pytest.fixture(scope="module")
def yolo_weights(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ultralytics checkpoint: yolov8n.yaml trained for one epoch at 64 px."""
    work = tmp_path_factory.mktemp("yolo")
    ds = write_yolo_dataset(read_box_file(tiny_data / "fluke_boxes.csv"), tiny_data / "train_images", work / "ds", 0.25, 0)
    best, _ = train_yolo(ds, work, epochs=1, imgsz=64, batch=8, device="cpu")
    return best


def _tampered(clean: Path, out: Path, extra: object, protocol: int = 2) -> Path:
    ckpt = torch.load(clean, map_location="cpu", weights_only=False)  # our own file, just trained
    ckpt["evil"] = extra
    torch.save(ckpt, out, pickle_protocol=protocol)
    return out


@pytest.mark.slow
def test_real_detector_weights_pass_and_detect(yolo_weights: Path, tiny_data: Path) -> None:
    check_detector_weights(yolo_weights)
    photos = pd.read_csv(tiny_data / "train.csv").head(2)
    photos["path"] = [str(tiny_data / "train_images" / n) for n in photos["image"]]
    boxes = detect_boxes(photos, yolo_weights, min_confidence=0.5, expand=1.0, imgsz=64, device="cpu")
    assert len(boxes) == 2 and set(boxes["source"]) <= {"detector", "full_frame"}


@pytest.mark.slow
def test_tampered_detector_weights_are_refused_before_ultralytics_sees_them(yolo_weights: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = _tampered(yolo_weights, tmp_path / "fluke.pt", Payload(marker))
    with pytest.raises(CheckpointError) as info:
        check_detector_weights(bad)
    assert str(info.value).startswith(f"{bad}: refused as detector weights: it references posix.system")
    photos = pd.DataFrame({"image": ["x.jpg"], "path": [str(tmp_path / "x.jpg")]})
    with pytest.raises(CheckpointError):
        detect_boxes(photos, bad, 0.5, 1.0, 64, device="cpu")
    with pytest.raises(CheckpointError):
        install_weights(bad, tmp_path / "home" / "detector.pt")
    assert not (tmp_path / "home" / "detector.pt").exists()
    assert not marker.exists()


@pytest.mark.slow
def test_gadget_in_an_allowlisted_package_is_refused(yolo_weights: Path, tmp_path: Path) -> None:
    """Only nn.Module classes of ultralytics.nn pass: a function there (a loader that unpickles
    another file in full) does not."""
    marker = tmp_path / "ran"
    inner = _tampered(yolo_weights, tmp_path / "inner.pt", Payload(marker))
    bad = _tampered(yolo_weights, tmp_path / "fluke.pt", Gadget(inner))
    with pytest.raises(CheckpointError, match=r"it references ultralytics\.nn\.tasks\.torch_safe_load"):
        check_detector_weights(bad)
    assert not marker.exists()


@pytest.mark.slow
def test_detector_weights_the_scan_cannot_read_are_refused(yolo_weights: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hidden = _tampered(yolo_weights, tmp_path / "p4.pt", Payload(marker), protocol=4)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"model": Payload(marker)}))
    for bad in (hidden, legacy):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(bad))}: refused as detector weights: it cannot be checked"):
            check_detector_weights(bad)
    assert not marker.exists()


@pytest.mark.slow
def test_tampered_weights_fail_the_detector_asset_with_the_reason(yolo_weights: Path, tmp_path: Path, tiny_data: Path) -> None:
    """source='weights' with a tampered .pt: the real fluke_detector materialisation fails, naming file and payload."""
    from whale_assets.defs.detection import fluke_detector
    from whale_assets.resources import MlflowTracking, WhaleHome

    marker = tmp_path / "ran"
    bad = _tampered(yolo_weights, tmp_path / "theirs.pt", Payload(marker))
    home = tmp_path / "home"
    result = dg.materialize(
        [fluke_detector],
        resources={
            "whale": WhaleHome(data_dir=str(tiny_data), home=str(home)),
            "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home}/m.db"),
        },
        run_config={"ops": {"fluke_detector": {"config": {"source": "weights", "weights_path": str(bad)}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert "CheckpointError" in message and f"{bad}: refused as detector weights: it references posix.system" in message
    assert not list(home.rglob("detector.pt")) and not marker.exists()


# ---------------------------------------------------------------- servers bind 127.0.0.1


def _ui_sh_args(tmp_path: Path, env_extra: dict[str, str]) -> dict[str, list[str]]:
    """Run the real scripts/ui.sh with mlflow and dagster replaced by recorders of their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    for tool in ("mlflow", "dagster"):
        script = bin_dir / tool
        # Record the arguments, then stay up until the other server has recorded its own:
        # ui.sh stops both as soon as one exits.
        script.write_text(
            f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/{tool}.tmp" && mv "{tmp_path}/{tool}.tmp" "{tmp_path}/{tool}.args"\n'
            f'i=0; while [ ! -f "{tmp_path}/mlflow.args" ] || [ ! -f "{tmp_path}/dagster.args" ]; do\n'
            f"  i=$((i + 1)); [ $i -gt 600 ] && exit 1; sleep 0.1\ndone\n"
        )
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("WHALE_UI_HOST", "DAGSTER_HOME")}
    env.update({"BIN": str(bin_dir), "WHALE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), **env_extra})
    subprocess.run([str(REPO / "scripts" / "ui.sh")], env=env, timeout=120, capture_output=True, check=False, start_new_session=True)
    return {tool: (tmp_path / f"{tool}.args").read_text().split("\n")[:-1] for tool in ("mlflow", "dagster")}


def _option(args: list[str], *names: str) -> str:
    i = next(i for i, a in enumerate(args) if a in names)
    return args[i + 1]


@pytest.mark.slow
def test_ui_script_binds_localhost_unless_told_otherwise(tmp_path: Path) -> None:
    default = _ui_sh_args(tmp_path / "default", {})
    assert _option(default["mlflow"], "--host") == "127.0.0.1"
    assert _option(default["dagster"], "-h", "--host") == "127.0.0.1"
    chosen = _ui_sh_args(tmp_path / "chosen", {"WHALE_UI_HOST": "0.0.0.0"})
    assert _option(chosen["mlflow"], "--host") == "0.0.0.0" and _option(chosen["dagster"], "-h", "--host") == "0.0.0.0"


# ---------------------------------------------------------------- secrets


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / n for n in names if n and (REPO / n).is_file()]


# Built from parts so that this file does not match itself.
_SECRET_PATTERNS = {
    "AWS access key id": re.compile("(?:A" + "KIA|A" + r"SIA)[0-9A-Z]{16}"),
    "private key": re.compile("-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE" + " KEY-----"),
    "GitHub token": re.compile("gh" + r"[pousr]_[A-Za-z0-9]{36}"),
    "Slack token": re.compile("xo" + r"x[abprs]-[A-Za-z0-9-]{10,}"),
    "credentials in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s:@'\"{}$<]{3,}@"),
    "secret assigned a literal": re.compile(
        r"(?i)\b[\w-]*(?:pass" + r"word|passwd|secret|token|api_?key|access_?key)[\w-]*\s*[:=]\s*['\"][^'\"\s${}<>]{6,}['\"]"
    ),
}


def _secrets_in(text: str) -> list[str]:
    return [name for name, pattern in _SECRET_PATTERNS.items() if pattern.search(text)]


def test_the_secret_scanner_finds_secrets() -> None:
    """Control: each pattern catches a made-up secret of its kind, and leaves env-var reads alone."""
    fakes = [
        "key = " + "AKIA" + "ABCDEFGHIJKLMNOP",
        "-----BEGIN " + "RSA PRIVATE KEY-----",
        "ghp_" + "a" * 36,
        "xoxb-" + "1234567890-abc",
        "MLFLOW_TRACKING_URI=https://alice:" + "s3cr3tpass@mlflow.example.org",
        "MLFLOW_TRACKING_PASS" + 'WORD = "hunter22"',
    ]
    assert [_secrets_in(f) for f in fakes] == [[n] for n in _SECRET_PATTERNS]
    assert _secrets_in('password = os.environ["MLFLOW_TRACKING_PASSWORD"]\nMLFLOW_TRACKING_PASSWORD=\nhttp://127.0.0.1:5000') == []


def test_no_secrets_in_tracked_files() -> None:
    found = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        found += [f"{path.relative_to(REPO)}: {kind}" for kind in _secrets_in(text)]
    assert found == []


def test_env_example_documents_every_credential_without_values() -> None:
    example = REPO / ".env.example"
    assert example in _tracked_text_files()
    lines = example.read_text().splitlines()
    keys = {}
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
            assert lines[i - 1].startswith("#"), f"{key}: no comment line above it"
    for key in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_S3_ENDPOINT_URL",
        "WHALE_HOME",
        "WHALE_DATA_DIR",
        "WHALE_UI_HOST",
    ):
        assert key in keys, key
    assert {k: v for k, v in keys.items() if v} == {}
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".env"], check=False)
    assert ignored.returncode == 0, ".env is not in .gitignore"


# ---------------------------------------------------------------- Dockerfile (read, not built)


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def test_dockerfile_base_image_is_pinned_to_the_python_the_pins_were_frozen_with() -> None:
    (base,) = [args for ins, args in _dockerfile() if ins == "FROM"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base)
    assert match, f"FROM {base}: not an exact python:X.Y.Z-slim-<debian> tag"
    frozen = re.search(r"frozen with Python (\d+)\.(\d+)\.(\d+)", (REPO / "requirements" / "constraints.txt").read_text())
    assert frozen and match.groups()[:3] == frozen.groups(), (
        "the image's Python is not the one requirements/constraints.txt was frozen with"
    )


def test_dockerfile_copies_only_tracked_files() -> None:
    """A build from a fresh clone sees only what git tracks (existence is tests/test_packaging.py's check)."""
    copies = [args.split() for ins, args in _dockerfile() if ins in ("COPY", "ADD")]
    assert copies
    for parts in copies:
        assert not any(p.startswith("--from") for p in parts)
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", source], check=False, capture_output=True)
            assert tracked.returncode == 0, f"COPY {source}: not tracked by git"


def test_dockerfile_installs_with_the_constraints_and_exact_pins() -> None:
    (install,) = [args for ins, args in _dockerfile() if ins == "RUN" and "pip install" in args]
    assert "-c requirements/constraints.txt" in install
    pins = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines() if "==" in line)
    named = re.findall(r"(?<![\w-])([A-Za-z][\w.-]*)==([\w.+-]+)", install)
    assert named and all(pins.get(name) == version for name, version in named), named


def test_dockerfile_runs_as_a_user_and_checks_its_health() -> None:
    steps = _dockerfile()
    kinds = [ins for ins, _ in steps]
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("CMD") > max(i for i, k in enumerate(kinds) if k == "USER")
    (health,) = [args for ins, args in steps if ins == "HEALTHCHECK"]
    assert "CMD" in health and "127.0.0.1:3000/server_info" in health
    assert any(ins == "RUN" and "curl" in args and "apt-get install" in args for ins, args in steps)  # the health check's tool
    (cmd,) = [args for ins, args in steps if ins == "CMD"]
    script = REPO / cmd.strip('[]"')
    assert script.is_file() and os.access(script, os.X_OK)
