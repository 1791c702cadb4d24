"""Kubernetes: every step as its own pod, GPU steps on GPU nodes (opt-in).

``WHALE_EXECUTOR=k8s`` in the environment of the code location switches the
code location's executor to dagster-k8s's ``k8s_job_executor``: each step of a
run becomes a Kubernetes Job. Without it the executor stays Dagster's default
(multiprocess for launched runs; ``whale run`` and the tests execute in process).

The GPU steps carry their pod resources as a ``dagster-k8s/config`` op tag
(:data:`GPU_STEP_TAGS`), which dagster-k8s merges over the executor's
``step_k8s_config`` (the CPU steps' requests). Outside Kubernetes the tag is
inert. Nothing here imports dagster-k8s until the switch asks for it, so the
base install does not need it (``pip install 'whale-photo-id[k8s]'`` does).
"""

from __future__ import annotations

import os
from typing import Any

from whale_ml.environment import Environment, read_environment

# The variables (parsed in whale_ml/environment.py), all optional: read when the definitions load.
EXECUTOR_ENV = "WHALE_EXECUTOR"
NAMESPACE_ENV = "WHALE_K8S_NAMESPACE"  # where step Jobs go (default: the K8sRunLauncher's namespace)
HOME_CLAIM_ENV = "WHALE_K8S_HOME_CLAIM"  # ReadWriteMany PVC for WHALE_HOME, when no launcher/Helm mount gives it
PULL_POLICY_ENV = "WHALE_K8S_IMAGE_PULL_POLICY"
MAX_CONCURRENT_ENV = "WHALE_K8S_MAX_CONCURRENT"  # step pods at once per run
TRAIN_GPUS_ENV = "WHALE_K8S_TRAIN_GPUS"  # GPUs of each fold model's pod: set with `arcface_model: config: processes: N` (DDP)
KUBECONFIG_ENV = "WHALE_K8S_KUBECONFIG"  # runs outside the cluster (e.g. `dagster dev` on a workstation) launching steps into it
IMAGE_HOME = "/home/whale/whale_home"  # WHALE_HOME in the Dockerfile

# Training and embedding on one GPU. The memory-backed /dev/shm matters: the container
# runtime's default 64 MB is too small for DataLoader workers passing image batches.
GPU_STEP_TAGS: dict[str, Any] = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            },
            "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": {
            "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}],
            # GPU node pools are commonly tainted so that only GPU pods land there.
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}

# Every other step (metadata, crops, folds, gallery, threshold, submission): CPU only.
CPU_STEP_RESOURCES: dict[str, Any] = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "16Gi"}}


def k8s_executor_config(env: Environment | None = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` run config this deployment uses, from its environment."""
    env = env or read_environment()
    k = env.k8s
    config: dict[str, Any] = {
        "image_pull_policy": k.image_pull_policy,
        "step_k8s_config": {"container_config": {"resources": CPU_STEP_RESOURCES}},
    }
    if k.home_claim:
        # Every step reads what the steps before it wrote under WHALE_HOME: one shared volume.
        # Only when nothing else mounts it: the Helm user deployment's (or the K8sRunLauncher's)
        # volumes already reach step pods, and a second volume of the same name is rejected.
        home = os.environ.get("WHALE_HOME", IMAGE_HOME)
        config["env_vars"] = [f"WHALE_HOME={home}"]
        config["volumes"] = [{"name": "whale-home", "persistent_volume_claim": {"claim_name": k.home_claim}}]
        config["volume_mounts"] = [{"name": "whale-home", "mount_path": home}]
    if k.namespace:
        config["job_namespace"] = k.namespace
    if k.max_concurrent:
        config["max_concurrent"] = k.max_concurrent
    if k.train_gpus:
        # Overrides the op tag's one GPU for training only (dagster-k8s applies per-step config last).
        limits = {"nvidia.com/gpu": str(k.train_gpus)}
        config["per_step_k8s_config"] = {"arcface_model": {"container_config": {"resources": {"limits": limits}}}}
    if k.kubeconfig:  # otherwise the in-cluster service account (or the K8sRunLauncher's setting)
        config["load_incluster_config"] = False
        config["kubeconfig_file"] = k.kubeconfig
    return config


def configured_executor(env: Environment | None = None) -> Any | None:
    """The executor for the code location: ``None`` keeps Dagster's default."""
    env = env or read_environment()
    if env.executor == "default":
        return None
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as err:
        raise ImportError(f"{EXECUTOR_ENV}=k8s needs dagster-k8s: pip install 'whale-photo-id[k8s]'") from err
    return k8s_job_executor.configured(k8s_executor_config(env), name="whale_k8s")
