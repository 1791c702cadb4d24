"""Kubernetes (opt-in, ``WHALE_EXECUTOR=k8s``): the code location's definitions load with
dagster-k8s's ``k8s_job_executor``, its config is valid, and the Kubernetes Job it would
create for a GPU step asks for a GPU while a CPU step does not.

No cluster is here: the executor is created for real from a kubeconfig naming a server
that is never contacted, and the step Jobs are built with dagster-k8s's own functions
(what its step handler calls before sending them to the API server).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.executor.init import InitExecutorContext
from dagster_k8s import k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from whale_assets import k8s

GPU_STEPS = ["fluke_detector", "boxes_and_crops", "arcface_model", "fold_embeddings"]
CPU_STEPS = ["cv_folds", "gallery", "match_threshold"]

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: never-used}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def _load(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dg.Definitions:
    for key in [
        k8s.EXECUTOR_ENV,
        k8s.NAMESPACE_ENV,
        k8s.HOME_CLAIM_ENV,
        k8s.PULL_POLICY_ENV,
        k8s.MAX_CONCURRENT_ENV,
        k8s.KUBECONFIG_ENV,
        k8s.TRAIN_GPUS_ENV,
    ]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from whale_assets.definitions import defs

    return defs()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The definitions loaded twice in one process: without the switch, then with it."""
    tmp = tmp_path_factory.mktemp("k8s")
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    home = str(tmp / "home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALE_HOME", home)
        default = _load(mp, {})
        k8s_env = {
            k8s.EXECUTOR_ENV: "k8s",
            k8s.NAMESPACE_ENV: "whale",
            k8s.HOME_CLAIM_ENV: "whale-home-rwx",
            k8s.MAX_CONCURRENT_ENV: "4",
            k8s.KUBECONFIG_ENV: str(kubeconfig),
            k8s.TRAIN_GPUS_ENV: "2",
        }
        on_k8s = _load(mp, k8s_env)
        # The executor's config is read when the definitions load: keep the environment for the tests.
        yield {"default": default, "k8s": on_k8s, "home": home, "kubeconfig": str(kubeconfig)}


def test_without_the_switch_the_executor_is_dagsters_default(loaded: dict) -> None:
    defs = loaded["default"]
    for job in [defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("train_folds")]:
        assert job.executor_def is dg.multi_or_in_process_executor, job.name


def test_with_the_switch_every_job_uses_the_k8s_job_executor(loaded: dict) -> None:
    defs = loaded["k8s"]
    jobs = [defs.resolve_implicit_global_asset_job_def(), *(defs.resolve_job_def(n) for n in ["prepare_data", "train_folds"])]
    for job in jobs:
        assert job.executor_def.name == "whale_k8s", job.name
        # Configured from dagster-k8s's executor: same creation function, fixed config.
        assert job.executor_def.executor_creation_fn is k8s_job_executor.executor_creation_fn


def test_executor_config_validates_and_carries_the_settings(loaded: dict) -> None:
    job = loaded["k8s"].resolve_job_def("train_folds")
    # Validation maps the executor's fixed config through dagster-k8s's schema (defaults filled in).
    config = dg.validate_run_config(job, {})["execution"]["whale_k8s"]
    assert config["job_namespace"] == "whale"
    assert config["max_concurrent"] == 4
    assert config["image_pull_policy"] == "IfNotPresent"
    assert config["kubeconfig_file"] == loaded["kubeconfig"] and config["load_incluster_config"] is False
    assert {"name": "whale-home", "mount_path": loaded["home"]} in config["volume_mounts"]
    assert config["volumes"][0]["persistent_volume_claim"] == {"claim_name": "whale-home-rwx"}


def test_the_home_volume_is_added_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without WHALE_K8S_HOME_CLAIM the deployment (Helm, run launcher) mounts the home: no second copy."""
    monkeypatch.delenv(k8s.HOME_CLAIM_ENV, raising=False)
    config = k8s.k8s_executor_config()
    assert "volumes" not in config and "volume_mounts" not in config and "env_vars" not in config


def test_an_invalid_executor_config_fails_validation() -> None:
    """The validation above is real: a wrong type in the same config is rejected."""

    @dg.op
    def noop() -> None: ...

    @dg.job(executor_def=k8s_job_executor.configured({**k8s.k8s_executor_config(), "max_concurrent": "four"}, name="bad"))
    def bad_job() -> None:
        noop()

    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurrent"):
        dg.validate_run_config(bad_job, {})


def _step_job(loaded: dict, step: str):
    """The Kubernetes Job the k8s executor would create for ``step``: the executor built for
    real from its resolved config, the step's ``dagster-k8s/config`` tag and then the executor's
    per-step config merged over it in the order dagster-k8s's step handler merges them, and the
    Job built by dagster-k8s."""
    job = loaded["k8s"].resolve_job_def("train_folds" if step in ("arcface_model", "fold_embeddings") else "__ASSET_JOB")
    executor_config = dg.validate_run_config(job, {})["execution"]["whale_k8s"]
    with dg.instance_for_test() as instance:
        init = InitExecutorContext(job=InMemoryJob(job), executor_def=job.executor_def, executor_config=executor_config, instance=instance)
        executor = job.executor_def.executor_creation_fn(init)
    handler = executor._step_handler
    tags = job.graph.node_named(step).tags
    per_step = UserDefinedDagsterK8sConfig.from_dict(handler._per_step_k8s_config.get(step, {}))
    context = handler._executor_container_context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))).merge(
        K8sContainerContext(run_k8s_config=per_step)
    )
    k8s_job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="whale-photo-id:test", dagster_home="/opt/dagster/dagster_home"),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{step.replace('_', '-')}",
        user_defined_k8s_config=context.run_k8s_config,
    )
    return context, k8s_job


@pytest.mark.parametrize("step", GPU_STEPS)
def test_gpu_steps_request_a_gpu(loaded: dict, step: str) -> None:
    """One GPU each; the fold model WHALE_K8S_TRAIN_GPUS of them (2 here), for DDP training."""
    context, job = _step_job(loaded, step)
    assert context.namespace == "whale"
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == ("2" if step == "arcface_model" else "1")
    assert container.resources.limits["memory"] == "32Gi"  # the override replaces the GPU count only
    assert container.resources.requests["cpu"] == "4" and container.resources.requests["memory"] == "16Gi"
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert mounts["/dev/shm"] == "dshm" and mounts[loaded["home"]] == "whale-home"
    assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    assert {"WHALE_HOME": loaded["home"]}.items() <= {e.name: e.value for e in container.env}.items()


@pytest.mark.parametrize("step", CPU_STEPS)
def test_cpu_steps_request_no_gpu(loaded: dict, step: str) -> None:
    _, job = _step_job(loaded, step)
    container = job.spec.template.spec.containers[0]
    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    assert container.resources.requests == k8s.CPU_STEP_RESOURCES["requests"]
    assert loaded["home"] in {m.mount_path for m in container.volume_mounts}


def test_gpu_assets_keep_the_gpu_pool(loaded: dict) -> None:
    """The GPU tag adds pod resources; the pool (one GPU step at a time by default) stays."""
    defs = loaded["k8s"]
    for step in GPU_STEPS:
        spec = defs.resolve_assets_def("bboxes" if step == "boxes_and_crops" else step)  # one op makes bboxes and crops
        assert spec.op.pool == "gpu", step
        assert spec.op.tags["dagster-k8s/config"], step


def test_unknown_executor_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(k8s.EXECUTOR_ENV, "kubernetes")
    with pytest.raises(ValueError, match="WHALE_EXECUTOR='kubernetes'.*default, k8s"):
        k8s.configured_executor()
    monkeypatch.setenv(k8s.EXECUTOR_ENV, "k8s")
    monkeypatch.setenv(k8s.TRAIN_GPUS_ENV, "two")
    with pytest.raises(ValueError, match="WHALE_K8S_TRAIN_GPUS='two': expected a whole number >= 1"):
        k8s.k8s_executor_config()


def _yaml_after(marker: str) -> dict:
    text = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    block = text.split(marker, 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def test_documented_dagster_yaml_is_a_valid_k8s_instance(tmp_path: Path) -> None:
    """docs/deployment.md's dagster.yaml: a valid instance config, and a valid K8sRunLauncher config."""
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    documented = _yaml_after("<!-- dagster.yaml: validated by tests/test_k8s.py -->")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(documented))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "K8sRunLauncher" and config["concurrency"]["pools"]["default_limit"] >= 1
    result = validate_config(K8sRunLauncher.config_type(), documented["run_launcher"]["config"])
    assert result.success, result.errors
    # The same check fails on a misspelt field: it is not vacuous.
    bad = {**documented["run_launcher"]["config"], "volume_mount": []}
    assert not validate_config(K8sRunLauncher.config_type(), bad).success
