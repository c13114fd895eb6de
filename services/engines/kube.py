"""Kubernetes objects for engines, shared by the k3s render (installer/k3s.py) and the
deployment controller that runs in the cluster (services/engines/kube_controller.py):
names and labels, the appliance image and its user, and the engine Deployments.

Engine replicas run where the plan put them: one Deployment per (model, node, replica
shape), pinned with a nodeSelector, with whole GPUs as limits. An engine's key reaches it
only through its environment (secretKeyRef), never its args, which anyone on the node can
read in the process list.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections import Counter
from typing import NamedTuple

import msgspec

from appliance.config import ModelConfig
from appliance.planning.plan_model import ModelPlan, Placement, planned_model
from services.engines.commands import engine_command
from services.engines.warmup import warm_up_argv

ENGINE_PORT = 8000
IMAGE_UID = 10001  # the appliance image's user (k3s/Containerfile)
STARTUP_BUDGET_S = 600  # at least this long to load a model before the kubelet gives up
MIN_ENGINE_MEMORY = 1 << 30


def name(*parts: str) -> str:
    """A DNS-1123 label (Service and object names): lowercase, '-', at most 63 characters."""
    raw = "-".join(parts)
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if len(name) > 63:
        name = name[:54].rstrip("-") + "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return name


def labels(name: str, component: str, **extra: str) -> dict:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "appliance",
        **extra,
    }


def meta(name: str, namespace: str | None, labels: dict) -> dict:
    meta = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return meta


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mebibytes(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def http_probe(path: str, port: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def appliance_image(k3s) -> dict:
    """The appliance image; one named under localhost/ (a bundle's, imported on every node)
    is never pulled, so a node without it says so instead of trying a registry."""
    policy = {"imagePullPolicy": "Never"} if k3s.image.startswith("localhost/") else {}
    return {"image": k3s.image, **policy}


def run_as_image_user() -> dict:
    """The appliance image's own non-root user; new volumes are made writable by its group."""
    return {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID}


STUCK = ("CrashLoopBackOff", "ErrImageNeverPull", "ImagePullBackOff", "CreateContainerConfigError")


class PodProblem(NamedTuple):
    message: str
    fatal: bool  # a crash loop, a missing image, a bad config: it will not start by itself; unschedulable: room may come


def pod_problem(pod: dict) -> PodProblem | None:
    """Why a pod (as the API serves it) is not starting, or None; a pod on its way out is not asked."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp"):
        return None
    for condition in status.get("conditions") or []:
        if (condition.get("type"), condition.get("status"), condition.get("reason")) == (
                "PodScheduled", "False", "Unschedulable"):
            return PodProblem(f"pod {name} cannot be scheduled: {condition.get('message')}", fatal=False)
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return PodProblem(f"pod {name}, container {container['name']}: {waiting['reason']}: "
                              f"{waiting.get('message')}", fatal=True)
    return None


def in_image(argv: list[str]) -> list[str]:
    """commands.py starts Python engines with this interpreter; in the image it is `python`."""
    return ["python", *argv[1:]] if argv[0] == sys.executable else argv


def engine_container(k3s, model: ModelConfig, mp: ModelPlan, device: str, gpus: int, memory: int, *, path: str,
                     key_ref: tuple[str, str], mounts: list[dict]) -> dict:
    """The engine of one replica shape, loading the model from `path` in the pod, its key
    from the Secret key `key_ref` (secret name, key)."""
    shape = Placement(node="", device=device, gpus=list(range(gpus)))
    served = msgspec.structs.replace(
        planned_model(model, mp, shape),
        path=path,
        # Kubernetes expands $(VAR) in args: the node's allocatable CPUs when the profile sets none.
        threads=model.threads or "$(NODE_CPUS)",
    )
    command = engine_command(served, "0.0.0.0", ENGINE_PORT, "")
    argv = in_image(command.argv)
    # The key from the Secret into the variable the engine reads it from: never in args.
    env = [secret_env(command.key_env, *key_ref)]
    if any("$(NODE_CPUS)" in arg for arg in argv):
        env.append({"name": "NODE_CPUS", "valueFrom": {"resourceFieldRef": {"containerName": "engine", "resource": "limits.cpu"}}})
    if model.engine == "vllm":
        env += [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}]
    resources = {"requests": {"cpu": str(model.threads or 1) if device == "cpu" else "1",
                              "memory": mebibytes(max(memory, MIN_ENGINE_MEMORY))}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    if model.engine == "vllm":
        mounts = [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]  # NCCL between tensor-parallel workers
    return {
        "name": "engine",
        **appliance_image(k3s),
        "command": argv[:1],
        "args": argv[1:],
        "env": env,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        # Ready once loaded and one token generated (services/engines/warmup.py).
        "startupProbe": {"exec": {"command": warm_up_argv("python", f"http://127.0.0.1:{ENGINE_PORT}", model,
                                                          command.key_env, wait=False)},
                         "periodSeconds": 10, "timeoutSeconds": 130,  # the warm-up request itself waits up to 120 s
                         "failureThreshold": math.ceil(max(model.startup_timeout_s, STARTUP_BUDGET_S) / 10)},
        "readinessProbe": http_probe("/health", "http", 5, 2),
        "livenessProbe": http_probe("/health", "http", 10, 6),
        "resources": resources,
        "volumeMounts": mounts,
    }


def engine_deployments(k3s, model: ModelConfig, mp: ModelPlan, *, path: str, key_ref: tuple[str, str], key_digest: str,
                       volumes: list[dict], mounts: list[dict], init_containers: list[dict] = (),
                       extra_labels: dict[str, str] | None = None) -> list[dict]:
    """One Deployment per (node, replica shape): the plan decides how many replicas go where.
    `volumes` and `mounts` bring the model's files; `key_digest` changes with the key, so a
    new key restarts the engine."""
    groups: dict[tuple[str, str, int], list[Placement]] = {}
    for placement in mp.replicas:
        groups.setdefault((placement.node, placement.device, len(placement.gpus)), []).append(placement)
    shapes_per_node = Counter(node for node, _, _ in groups)
    model_name = name("engine", model.name)
    docs = []
    for (node, device, gpus), placements in groups.items():
        parts = [node] if shapes_per_node[node] == 1 else [node, f"{device}{gpus or ''}"]
        deployment = name("engine", model.name, *parts)
        selector = {"app.kubernetes.io/name": model_name, "app.kubernetes.io/instance": deployment}
        pod_labels = labels(model_name, "engine", **{"app.kubernetes.io/instance": deployment,
                                                     "appliance/model": name(model.name)}, **(extra_labels or {}))
        memory = max(p.ram_bytes for p in placements)
        pod = {
            "securityContext": run_as_image_user(),
            "nodeSelector": {"kubernetes.io/hostname": node},
            **({"initContainers": list(init_containers)} if init_containers else {}),
            "containers": [engine_container(k3s, model, mp, device, gpus, memory, path=path, key_ref=key_ref,
                                            mounts=mounts)],
            "volumes": list(volumes),
        }
        if model.engine == "vllm":
            pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        if gpus:
            pod["runtimeClassName"] = "nvidia"  # k3s registers it when it finds the NVIDIA container runtime
        docs.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(deployment, k3s.namespace, pod_labels),
            "spec": {
                "replicas": len(placements),
                # No surge: the node has exactly the GPUs and memory the plan gave these replicas.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": pod_labels, "annotations": {"appliance/key-digest": key_digest}},
                             "spec": pod},
            },
        })
    return docs


def engine_service(k3s, model_name: str, extra_labels: dict[str, str] | None = None) -> dict:
    """The Service in front of every replica of a model: ENGINE_PORT on each pod's `http`."""
    service = name("engine", model_name)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(service, k3s.namespace, labels(service, "engine", **{"appliance/model": name(model_name)},
                                                            **(extra_labels or {}))),
            "spec": {"selector": {"app.kubernetes.io/name": service, "app.kubernetes.io/component": "engine"},
                     "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}]}}
