"""What MLflow's system metrics cost a run (docs/training.md, "MLflow").

In a fresh SQLite store, one MLflow run per sampling interval: the ``mlflow`` resource's
monitor (``MlflowTracking._system_metrics``: MLflow's ``SystemMetricsMonitor`` plus a last
sample at the end) runs for ``--seconds`` while the main thread sleeps; a run without it
is the baseline. The cost is the process's extra CPU time (all threads: sampling with
psutil, reading the run's status, writing the metrics to the store) per sample and per
second, and the rows a run of one hour would add to the store. Prints one JSON object
(also written to --out).

    .venv/bin/python benchmarks/system_metrics.py --out benchmarks/results/system_metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
from common import machine_summary, print_json, timestamp

from whale_assets.resources import MlflowTracking


def timed_run(tracking: MlflowTracking, experiment: str, seconds: float, monitored: bool) -> tuple[float, str]:
    """CPU seconds the process spent while a run stayed open ``seconds`` (sleeping), and the run id."""
    with mlflow.start_run(experiment_id=experiment) as run:
        start = time.process_time()
        if monitored:
            with tracking._system_metrics(run.info.run_id, False, print):
                time.sleep(seconds)
        else:
            time.sleep(seconds)
        return time.process_time() - start, run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="how long each run stays open")
    parser.add_argument("--intervals", type=float, nargs="*", default=[1.0, 5.0, 10.0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("system-metrics", artifact_location=(Path(tmp) / "artifacts").as_uri())
        client = mlflow.MlflowClient(uri)
        timed_run(MlflowTracking(tracking_uri=uri), experiment, 2.0, True)  # warm-up: imports, psutil's first reading
        baseline, _ = timed_run(MlflowTracking(tracking_uri=uri), experiment, args.seconds, False)
        for interval in args.intervals:
            tracking = MlflowTracking(tracking_uri=uri, system_metrics_interval_s=interval)
            cpu, run_id = timed_run(tracking, experiment, args.seconds, True)
            metrics = client.get_run(run_id).data.metrics
            names = sorted(k for k in metrics if k.startswith("system/"))
            samples = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
            extra = max(cpu - baseline, 0.0)
            rows.append(
                {
                    "interval_s": interval,
                    "run_s": args.seconds,
                    "samples": samples,
                    "metrics_per_sample": len(names),
                    "cpu_s": round(cpu, 3),
                    "extra_cpu_s": round(extra, 3),
                    "extra_cpu_ms_per_sample": round(1000 * extra / samples, 1) if samples else None,
                    "extra_cpu_share_of_one_core": round(extra / args.seconds, 4),
                    "store_rows_per_hour": round(3600 / interval) * len(names),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        mlflow.set_tracking_uri(None)
    result = {
        "date": timestamp(),
        "machine": machine_summary(),
        "mlflow": mlflow.__version__,
        "baseline_cpu_s": round(baseline, 3),
        "metrics": names,
        "rows": rows,
    }
    print_json(result, args.out)


if __name__ == "__main__":
    main()
