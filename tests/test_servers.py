"""The real Dagster server: `dagster dev` on 127.0.0.1, driven through its GraphQL API as
the UI drives it, and its lineage page opened in headless Chromium; the MLflow UI on the
same home, reached through the links the assets' metadata gives.

The server runs in its own process group with a temporary DAGSTER_HOME and WHALE_HOME
on the tiny data set, and is stopped by process group at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from chromium import SKIP_REASON, browser, chromium_command
from health import stop_group, wait_healthy

from whale_assets.resources import MlflowTracking
from whale_assets.rounds import Round
from whale_assets.stages import PREPARE_DATA, asset_names, ensemble_and_submit, train_folds

# The stages' assets in the one-round graph, resolved from their groups (whale_assets/stages.py).
ONLY_ROUND = Round(1, 1)
UPSTREAM, PER_FOLD, DOWNSTREAM = (asset_names(s, 1) for s in (PREPARE_DATA, train_folds(ONLY_ROUND), ensemble_and_submit(ONLY_ROUND)))

pytestmark = [pytest.mark.server, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
LOCATION, REPOSITORY = "whale_photo_id", "__repository__"
ARTIFACTS = Path(os.environ.get("WHALE_TEST_ARTIFACTS", REPO / "test-artifacts"))


class Dagster:
    def __init__(self, url: str, home: Path, mlflow_port: int) -> None:
        self.url = url
        self.home = home
        self.mlflow_port = mlflow_port  # where the asset metadata's MLflow links point (WHALE_MLFLOW_UI)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert "errors" not in out, out["errors"]
        return out["data"]

    def launch(self, job: str, run_config: dict, partition: str | None = None) -> str:
        """launchRun, as the UI's launchpad does; returns the run id."""
        tags = [{"key": "dagster/partition", "value": partition}] if partition else []
        data = self.graphql(
            """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
                 __typename ... on LaunchRunSuccess { run { runId } }
                 ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }""",
            {
                "p": {
                    "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job},
                    "runConfigData": run_config,
                    "executionMetadata": {"tags": tags},
                }
            },
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def wait(self, run_id: str, timeout: float = 420) -> dict:
        """Poll the run until it ends; return its status, materialisations and check results."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.graphql(
                """query($id: ID!) { runOrError(runId: $id) { ... on Run { status
                     assetMaterializations { assetKey { path } partition }
                     eventConnection(limit: 5000) { events { __typename
                       ... on AssetCheckEvaluationEvent { evaluation { checkName success } }
                       ... on ExecutionStepFailureEvent { error { message } } } } } } }""",
                {"id": run_id},
            )["runOrError"]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
            time.sleep(2)


@pytest.fixture(scope="module")
def dagster_dev(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[Dagster]:
    home = tmp_path_factory.mktemp("server") / "home"
    mlflow_port = free_port()
    env = {
        **os.environ,
        "WHALE_MLFLOW_UI": f"http://127.0.0.1:{mlflow_port}",
        "WHALE_HOME": str(home),
        "WHALE_DATA_DIR": str(tiny_data),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "WHALE_N_FOLDS": "2",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [sys.executable, "-c", "from whale_assets.instance import prepare_dagster_home; prepare_dagster_home()"], env=env, check=True
    )
    port = free_port()
    dagster = Path(sys.executable).with_name("dagster")
    log = open(home / "dagster_dev.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(
        [str(dagster), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Dagster(f"http://127.0.0.1:{port}", home, mlflow_port)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status = server.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }")
                entries = status["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    break
            except (OSError, AssertionError):
                pass
            assert proc.poll() is None, (home / "dagster_dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not come up in 120 s"
            time.sleep(1)
        yield server
    finally:
        stop_group(proc)
        log.close()


def test_materialize_all_as_the_ui_does(dagster_dev: Dagster) -> None:
    """'Materialize all' on the lineage page: one asset backfill over every asset and both folds."""
    keys = [{"path": [k]} for k in UPSTREAM + PER_FOLD + DOWNSTREAM]
    data = dagster_dev.graphql(
        """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
             __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
        {"p": {"assetSelection": keys, "allPartitions": True, "runConfigData": _config(*UPSTREAM, *PER_FOLD, *DOWNSTREAM)}},
    )["launchPartitionBackfill"]
    assert data["__typename"] == "LaunchBackfillSuccess", data
    backfill = data["backfillId"]
    deadline = time.monotonic() + 600
    while True:
        status = dagster_dev.graphql(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }", {"id": backfill}
        )["partitionBackfillOrError"]["status"]
        if status not in ("REQUESTED", "IN_PROGRESS"):
            break
        assert time.monotonic() < deadline, f"backfill {backfill} still {status}"
        time.sleep(3)
    runs = dagster_dev.graphql(
        """query($t: [ExecutionTag!]) { runsOrError(filter: {tags: $t}) { ... on Runs { results { status
             assetMaterializations { assetKey { path } partition }
             eventConnection(limit: 5000) { events { __typename
               ... on AssetCheckEvaluationEvent { evaluation { checkName success } } } } } } } }""",
        {"t": [{"key": "dagster/backfill", "value": backfill}]},
    )["runsOrError"]["results"]
    assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, [r["status"] for r in runs])
    done = {("/".join(m["assetKey"]["path"]), m["partition"]) for r in runs for m in r["assetMaterializations"]}
    assert {a for a, _ in done} == set(UPSTREAM + PER_FOLD + DOWNSTREAM)
    assert {p for a, p in done if a == "arcface_model"} == {"fold0", "fold1"}
    # Each unpartitioned asset once, after the folds it depends on.
    assert sum(1 for r in runs for m in r["assetMaterializations"] if m["assetKey"]["path"] == ["gallery"]) == 1
    checks: dict[str, bool] = {}
    for r in runs:
        checks.update(_checks(r))
    assert checks == {
        "train_metadata_is_clean": True,
        "full_frame_share_is_low": checks["full_frame_share_is_low"],  # a WARN check: reported, either way
        "folds_hold_out_individuals": True,
        "embeddings_are_unit_vectors": True,
        "threshold_in_range": True,
        "submission_format": True,
    }


def _config(*ops: str) -> dict:
    recipe = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    # In-process steps: one process per run instead of one per step (each re-imports torch).
    return {"ops": {k: v for k, v in recipe["ops"].items() if k in ops}, "execution": {"config": {"in_process": {}}}}


def _materialised(run: dict) -> set[tuple[str, str | None]]:
    return {("/".join(m["assetKey"]["path"]), m["partition"]) for m in run["assetMaterializations"]}


def _checks(run: dict) -> dict[str, bool]:
    return {e["evaluation"]["checkName"]: e["evaluation"]["success"] for e in run["eventConnection"]["events"] if "evaluation" in e}


def _materialised_before(server: Dagster, asset: str) -> bool:
    data = server.graphql(
        """query($k: AssetKeyInput!) { assetOrError(assetKey: $k) { __typename
             ... on Asset { assetMaterializations(limit: 1) { runId } } } }""",
        {"k": {"path": [asset]}},
    )["assetOrError"]
    return data["__typename"] == "Asset" and bool(data["assetMaterializations"])


def _prepare_data(server: Dagster) -> None:
    """The folds, from the test above when it ran, else from the prepare_data job launched now."""
    if not _materialised_before(server, "cv_folds"):
        prepared = server.wait(server.launch("prepare_data", _config(*UPSTREAM)))
        assert prepared["status"] == "SUCCESS", [e for e in prepared["eventConnection"]["events"] if "error" in e]


def test_single_fold_rerun_through_graphql(dagster_dev: Dagster) -> None:
    """Rerun fold1 alone from the launchpad: only fold1's partitions are materialised, and the
    graph still knows every asset. Its input (the folds) comes from the test above when it ran,
    or from the prepare_data job launched here first, so that the test passes alone too."""
    _prepare_data(dagster_dev)
    run = dagster_dev.wait(dagster_dev.launch("train_folds", _config(*PER_FOLD), "fold1"))
    assert run["status"] == "SUCCESS", [e for e in run["eventConnection"]["events"] if "error" in e]
    assert _materialised(run) == {("arcface_model", "fold1"), ("fold_embeddings", "fold1")}
    assert _checks(run) == {"embeddings_are_unit_vectors": True}
    nodes = dagster_dev.graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]
    assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= set(UPSTREAM + PER_FOLD + DOWNSTREAM)


GROUPS = ("raw", "detection", "splits", "training", "retrieval", "submission")


@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_lineage_pages_in_headless_chromium(dagster_dev: Dagster, tmp_path: Path) -> None:
    """The pages a user opens first, rendered by a real browser: the global lineage lists the
    asset groups, each group's lineage its assets, the catalog every asset. Screenshots are kept."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = chromium_command(tmp_path / "profile", "--virtual-time-budget=20000")

    def page(path: str, shot: str | None = None, height: int = 1000) -> str:
        url, size = f"{dagster_dev.url}/{path}", f"--window-size=1600,{height}"
        if shot:
            subprocess.run([*common, size, f"--screenshot={ARTIFACTS / shot}", url], capture_output=True, timeout=120, check=False)
            assert (ARTIFACTS / shot).stat().st_size > 10_000, f"no screenshot of {url}"
        return subprocess.run([*common, size, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False).stdout

    lineage = page("asset-groups", "dagster_lineage.png")
    assert all(group in lineage for group in GROUPS), "the lineage page lists every asset group"
    assert "Join the Dagster community" not in lineage  # nux is off in the generated dagster.yaml
    retrieval = page(f"locations/{LOCATION}/asset-groups/retrieval", "dagster_lineage_retrieval.png")
    assert all(asset in retrieval for asset in ("fold_embeddings", "gallery", "match_threshold"))
    # The catalog renders only the rows in view: a window tall enough for every asset (with the
    # pseudo-label round's, about 25 rows).
    catalog = page("assets", height=4000)
    missing = [a for a in UPSTREAM + PER_FOLD + DOWNSTREAM if a not in catalog]
    assert not missing, f"not in the catalog: {missing}"


def _latest_mlflow_link(server: Dagster, asset: str) -> str | None:
    """The ``mlflow_run`` link of the asset's latest materialisation, as the Dagster UI shows it."""
    data = server.graphql(
        """query($k: AssetKeyInput!) { assetOrError(assetKey: $k) { __typename
             ... on Asset { assetMaterializations(limit: 1) { metadataEntries { label ... on UrlMetadataEntry { url } } } } } }""",
        {"k": {"path": [asset]}},
    )["assetOrError"]
    if data["__typename"] != "Asset" or not data["assetMaterializations"]:
        return None
    return next((e["url"] for e in data["assetMaterializations"][0]["metadataEntries"] if e["label"] == "mlflow_run"), None)


@pytest.fixture
def mlflow_ui(dagster_dev: Dagster, tmp_path: Path) -> Iterator[str]:
    """``mlflow ui`` on the server's home store (as scripts/ui.sh starts it), at the port the
    asset metadata links to; its background job runner is off (not needed, 7 processes fewer)."""
    home, url = dagster_dev.home, f"http://127.0.0.1:{dagster_dev.mlflow_port}"
    log = open(tmp_path / "mlflow_ui.log", "w")  # noqa: SIM115 - open for the server's lifetime
    store = ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "mlartifacts")]
    address = ["--host", "127.0.0.1", "--port", str(dagster_dev.mlflow_port), "--workers", "1"]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "ui", *store, *address],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield url
    finally:
        stop_group(proc, timeout=15)
        log.close()


@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_mlflow_links_open_the_training_runs_in_headless_chromium(dagster_dev: Dagster, mlflow_ui: str, tmp_path: Path) -> None:
    """The MLflow link of a fold model's materialisation, followed in a real browser: the run
    opens in MLflow's model-training view (Runs, Models, Model registry), not its GenAI view
    (Overview, Traces, Evaluation runs), where MLflow 3.17 opens any experiment otherwise; the
    experiment's page lists the fold runs (or the release runs they are nested under). Trains fold1 first when no fold model exists yet."""
    link = _latest_mlflow_link(dagster_dev, "arcface_model")
    if link is None:
        _prepare_data(dagster_dev)
        run = dagster_dev.wait(dagster_dev.launch("train_folds", _config(*PER_FOLD), "fold1"))
        assert run["status"] == "SUCCESS", [e for e in run["eventConnection"]["events"] if "error" in e]
        link = _latest_mlflow_link(dagster_dev, "arcface_model")
    assert link is not None and link.startswith(f"{mlflow_ui}/#/experiments/"), link
    experiment_id = link.split("/#/experiments/")[1].split("/")[0]
    wait_healthy(mlflow_ui, tmp_path / "mlflow_ui.log")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dagster_dev.home / 'mlflow.db'}")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    training = client.search_runs([experiment_id], filter_string="tags.stage = 'training'")
    assert training, "no training run in the store"
    # The experiment's page lists top-level runs: a fold run nested under its release shows as that release's run.
    run_names = {client.get_run(r.data.tags["mlflow.parentRunId"]).info.run_name if "mlflow.parentRunId" in r.data.tags else r.info.run_name
                 for r in training}  # fmt: skip

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = chromium_command(tmp_path / "profile", "--virtual-time-budget=20000")

    def dom(url: str, *flags: str) -> str:
        return subprocess.run([*common, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False).stdout

    training_view, genai_view = ("Model registry",), ("Evaluation runs", "Judges", "Token Usage")
    run_page = dom(link)
    run_id = link.split("/runs/")[1].split("?")[0]
    assert client.get_run(run_id).info.run_name in run_page and "System metrics" in run_page
    assert all(t in run_page for t in training_view) and not any(t in run_page for t in genai_view), "run page not in the training view"

    experiment_url = MlflowTracking(ui_url=mlflow_ui).experiment_url(experiment_id)
    shot = ARTIFACTS / "mlflow_experiment.png"
    experiment_page = dom(experiment_url, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000, f"no screenshot of {experiment_url}"
    assert all(name in experiment_page for name in run_names), (run_names, experiment_page[-2000:])
    assert all(t in experiment_page for t in training_view) and not any(t in experiment_page for t in genai_view)
