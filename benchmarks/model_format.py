"""The registered fold model as a torch.export program (``pt2``) against a pickled module (docs/training.md, "MLflow").

For each backbone (untrained weights: the cost does not depend on them), in a fresh SQLite
store: ``whale_ml.registry.register_model`` once with the model as it is (pt2 where
:func:`export_check` passes) and once forced to pickle (the baseline, what the registry did
before), timing the whole registration and, for pt2, the export check alone; then loading
each back with ``mlflow.pytorch.load_model`` and embedding 3 images, and the sizes of the
model file and of the whole logged model folder (pt2 adds the input example as JSON).
Times (wall and this process's CPU) are the fastest of ``--repeats`` registrations (the
least disturbed on a shared machine); the first export in a process is warmed up before.
Prints one JSON object (also written to --out).

    .venv/bin/python benchmarks/model_format.py --out benchmarks/results/model_format.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import mlflow
import mlflow.pytorch
import torch
from common import machine_summary, print_json, timestamp

import whale_ml.registry as registry
from whale_ml.models.embedding import create_embedding_model
from whale_ml.stage_configs import TrainConfig

BACKBONES = [
    ("test_resnet", 32, "the tests' model"),
    ("resnet18", 64, "configs/demo.yaml"),
    ("tf_efficientnet_b4.ns_jft_in1k", 512, "configs/gpu.yaml"),
]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(name: str, size: int, root: Path, repeats: int) -> dict:
    cfg = TrainConfig(backbone=name, image_size=size, embedding_size=512, pretrained=False)
    model = create_embedding_model(cfg, pretrained=False).eval()
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(images)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    row: dict = {"backbone": name, "image_size": size, "parameters": sum(p.numel() for p in model.parameters())}
    registry.export_check(model, size)  # warm-up: torch.export's first call in a process costs more
    t, c = time.perf_counter(), time.process_time()
    row["export_check_error"] = registry.export_check(model, size)
    row["export_check_s"], row["export_check_cpu_s"] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
    for fmt in ("pickle", "pt2"):
        times, cpu, registered = [], [], None
        for i in range(repeats):
            # The baseline: the check says no, so the model is pickled as before.
            forced = mock.patch.object(registry, "export_check", return_value="forced") if fmt == "pickle" else contextlib.nullcontext()
            with forced, mlflow.start_run(experiment_id=experiment):
                t, c = time.perf_counter(), time.process_time()
                registered = registry.register_model(uri, f"{name}-{fmt}", model, size, 512, alias=f"a{i}", tags={}, log=lambda _m: None)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        assert registered is not None
        if fmt == "pt2" and registered.serialization != "pt2":
            row["pt2"] = {"fell_back_to_pickle": registered.export_error}
            continue
        info = mlflow.models.get_model_info(f"models:/{registered.model_id}")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered.model_id}", dst_path=str(root / f"dl_{name}_{fmt}")))
        model_file = next(local.rglob("model.pt2" if fmt == "pt2" else "model.pth"))
        t, c = time.perf_counter(), time.process_time()
        loaded = mlflow.pytorch.load_model(str(local))
        load_s, load_cpu_s = time.perf_counter() - t, time.process_time() - c
        with torch.no_grad():
            got = loaded(images)
        row[fmt] = {
            "register_s": round(min(times), 2),
            "register_s_all": [round(x, 2) for x in times],
            "register_cpu_s": round(min(cpu), 2),
            "load_s": round(load_s, 2),
            "load_cpu_s": round(load_cpu_s, 2),
            "model_file_bytes": model_file.stat().st_size,
            "logged_model_bytes": folder_size(local),
            "max_abs_diff_3_images": float((got - want).abs().max()),
            "model_size_bytes_in_mlmodel": info.model_size_bytes if hasattr(info, "model_size_bytes") else None,
        }
    mlflow.set_tracking_uri(None)
    if "register_s" in row.get("pt2", {}):
        row["ratio_register_pt2_over_pickle"] = round(row["pt2"]["register_s"] / row["pickle"]["register_s"], 2)
        row["ratio_register_cpu_pt2_over_pickle"] = round(row["pt2"]["register_cpu_s"] / row["pickle"]["register_cpu_s"], 2)
        row["ratio_file_pt2_over_pickle"] = round(row["pt2"]["model_file_bytes"] / row["pickle"]["model_file_bytes"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="backbone names (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, used_by in BACKBONES:
            if args.only and name not in args.only:
                continue
            rows.append({**measure(name, size, Path(tmp) / name, args.repeats), "used_by": used_by})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": timestamp(),
        "machine": machine_summary(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "mlflow": mlflow.__version__},
        "rows": rows,
    }
    print_json(result, args.out)


if __name__ == "__main__":
    main()
