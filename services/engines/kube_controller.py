"""The deployment controller on k3s: model versions deployed through /admin become engine
Deployments in the cluster, through the Kubernetes API (the official client).

It runs in the control pod (`appliance controller --kubernetes FILE`), with the state
volume and a service account whose Role (rendered by installer/k3s.py from PERMISSIONS)
lets it manage Deployments, Services and Secrets in the appliance's namespace, nothing
else. The database is the hand-off point, as on bare metal (appliance/deployments.py):

- pending: on a thread, the version's files are fetched into the control pod's cache and
  read to size the engine; the model is planned on the nodes the render described
  (ClusterSpec: their inventories, less what the profile's own engines take), then its
  key Secret, its engine Deployments (one per node and replica shape, with the plan's
  nodeSelector and whole GPUs as limits) and its Service are applied. Each engine pod
  first fetches the same files from the object store into a per-node cache
  (`<k3s.models_host_path>/registry`, checked by SHA-256) with an init container.
- starting: running once every Deployment has all its replicas ready; the gateway then
  routes to the Service. failed, with Kubernetes' reason, when a pod cannot be scheduled
  or keeps crashing.
- stopping: the objects are deleted and the row removed.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance import deployments
from appliance.config import K3sConfig, ModelConfig, Profile
from appliance.db import open_db
from appliance.errors import ApplianceError
from appliance.home import state_db_path
from appliance.objectstore import ObjectStoreSettings
from appliance.objectstore.s3 import S3Settings
from appliance.planning.inventory import Inventory
from appliance.planning.plan_model import Plan
from services.engines import kube
from services.engines.deployments import tend_until, version_model, version_row

REGISTRY_MOUNT = "/var/lib/appliance-registry"  # in engine pods: the node's cache of registry files
LABEL = "appliance/deployment"  # on every object of a deployment: how undeploy finds them
# What the controller does with the API, and so all its Role grants (installer/k3s.py).
PERMISSIONS = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "secrets"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
]


class ClusterSpec(msgspec.Struct, kw_only=True):
    """What the render tells the controller (the `cluster` ConfigMap's cluster.json)."""

    k3s: K3sConfig
    inventories: list[Inventory]
    plan: Plan  # the profile's own engines on those nodes: deployments go where they leave room
    store_secret: str | None  # the Secret with the object store's credentials (root-user, root-password)


def leftover(inventories: list[Inventory], plan: Plan) -> list[Inventory]:
    """The nodes as the profile's engines leave them: their RAM less what the plan gives
    engines there, and no GPU that the plan uses (pods get whole GPUs)."""
    ram = {u.node: u.planned_bytes for u in plan.devices if u.device == "ram"}
    taken = {(p.node, g) for m in plan.models for p in m.replicas for g in p.gpus}
    return [msgspec.structs.replace(
        inv,
        memory_available_bytes=max(0, inv.memory_available_bytes - ram.get(inv.hostname, 0)),
        gpus=[g for g in inv.gpus if (inv.hostname, g.index) not in taken],
    ) for inv in inventories]


def _fetch_container(spec: ClusterSpec, store: S3Settings, versions: list[dict]) -> dict:
    """The init container that brings the version's files from the object store into the node's cache."""
    argv = ["python", "-m", "services.engines.fetch", "--endpoint", store.endpoint, "--region", store.region,
            "--bucket-prefix", store.bucket_prefix, "--dest", REGISTRY_MOUNT,
            "--versions", msgspec.json.encode(versions).decode()]
    return {
        "name": "fetch-model",
        **kube.appliance_image(spec.k3s),
        "command": argv,
        "env": [kube.secret_env("APPLIANCE_S3_ACCESS_KEY", spec.store_secret, "root-user"),
                kube.secret_env("APPLIANCE_S3_SECRET_KEY", spec.store_secret, "root-password")],
        "volumeMounts": [{"name": "registry", "mountPath": REGISTRY_MOUNT}],
    }


def deployment_objects(spec: ClusterSpec, store: S3Settings, row: dict, model: ModelConfig, versions: list[dict],
                       key: str) -> list[dict]:
    """The Kubernetes objects of one deployment: its key Secret, engine Deployments and Service.

    `model` has the files in the control pod's cache (for sizing); `versions` are the
    registry rows the engine pods fetch ({format, sha256, files}, the base first).
    """
    from appliance.planning.planner import make_plan

    name = row["name"]
    plan = make_plan(Profile(name=f"deployment-{name}", models=[model]), leftover(spec.inventories, spec.plan),
                     whole_gpus=True)
    in_pod = Path(REGISTRY_MOUNT)
    paths = [in_pod / Path(p).name for p in [model.path] + model.extra_args[1::2]]  # the model, then --lora files
    engine_model = msgspec.structs.replace(model, path=str(paths[0]),
                                           extra_args=[a for p in paths[1:] for a in ("--lora", str(p))])
    ns, mark = spec.k3s.namespace, {LABEL: kube.name(name)}
    secret_name = kube.name("deployment", name)
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": kube.meta(secret_name, ns, kube.labels(secret_name, "secrets", **mark)),
              "type": "Opaque", "stringData": {"api-key": key}}
    registry = f"{spec.k3s.models_host_path.rstrip('/')}/registry"
    engines = kube.engine_deployments(
        spec.k3s, engine_model, plan.model(name), path=engine_model.path, key_ref=(secret_name, "api-key"),
        key_digest=kube.digest(key), extra_labels=mark,
        volumes=[{"name": "registry", "hostPath": {"path": registry, "type": "DirectoryOrCreate"}}],
        mounts=[{"name": "registry", "mountPath": REGISTRY_MOUNT, "readOnly": True}],
        init_containers=[_fetch_container(spec, store, versions)])
    return [secret, *engines, kube.engine_service(spec.k3s, name, extra_labels=mark)]


def endpoint(spec: ClusterSpec, name: str, key: str) -> dict:
    """How the gateway reaches a deployment: its Service, which balances its pods."""
    root = f"http://{kube.name('engine', name)}.{spec.k3s.namespace}.svc:{kube.ENGINE_PORT}"
    return {"base_url": root + "/v1", "health_url": root + "/health", "api_key": key}


class KubeApi:
    """The few calls the controller makes, through the official client, in one namespace."""

    def __init__(self, namespace: str):
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # the pod's service account
        except config.ConfigException as exc:
            raise ApplianceError(f"--kubernetes runs in a pod of the cluster, with its service account ({exc})") from None
        self.namespace = namespace
        self.apps, self.core = client.AppsV1Api(), client.CoreV1Api()
        self.serialize = client.ApiClient().sanitize_for_serialization  # a model object as the API's JSON
        self.ApiException = client.ApiException

    def _calls(self, kind: str):
        return {"Deployment": (self.apps.create_namespaced_deployment, self.apps.patch_namespaced_deployment),
                "Service": (self.core.create_namespaced_service, self.core.patch_namespaced_service),
                "Secret": (self.core.create_namespaced_secret, self.core.patch_namespaced_secret)}[kind]

    def apply(self, doc: dict) -> None:
        """Create the object, or patch it to `doc` when it exists (a controller restart)."""
        create, patch = self._calls(doc["kind"])
        try:
            create(self.namespace, doc)
        except self.ApiException as exc:
            if exc.status != 409:
                raise
            patch(doc["metadata"]["name"], self.namespace, doc)

    def progress(self, name: str) -> tuple[bool, kube.PodProblem | None]:
        """(every engine Deployment of deployment `name` has all its replicas ready, why a pod is not starting)."""
        selector = f"{LABEL}={kube.name(name)}"
        items = self.apps.list_namespaced_deployment(self.namespace, label_selector=selector).items
        ready = bool(items) and all((d.status.ready_replicas or 0) >= (d.spec.replicas or 0) for d in items)
        for pod in self.core.list_namespaced_pod(self.namespace, label_selector=selector).items:
            if problem := kube.pod_problem(self.serialize(pod)):
                return ready, problem
        return ready, None

    def delete(self, name: str) -> None:
        selector = f"{LABEL}={kube.name(name)}"
        for item in self.apps.list_namespaced_deployment(self.namespace, label_selector=selector).items:
            self.apps.delete_namespaced_deployment(item.metadata.name, self.namespace)
        for item in self.core.list_namespaced_service(self.namespace, label_selector=selector).items:
            self.core.delete_namespaced_service(item.metadata.name, self.namespace)
        for item in self.core.list_namespaced_secret(self.namespace, label_selector=selector).items:
            self.core.delete_namespaced_secret(item.metadata.name, self.namespace)


class KubeDeploymentController:
    """tend() as the bare-metal controller's, with Kubernetes objects in place of child processes."""

    def __init__(self, home: Path, store: ObjectStoreSettings | None, spec: ClusterSpec, api: KubeApi,
                 say: Callable[[str], None]):
        self.home, self.spec, self.api, self.say = home, spec, api, say
        self.settings = store
        self.store = store.open() if store else None
        self.db = open_db(state_db_path(home))
        self.preparing: dict[str, threading.Thread] = {}
        # A restart while applying: apply again (applying an object that exists patches it).
        self.db.execute("UPDATE deployments SET state = 'pending' WHERE state = 'starting' AND endpoints = '[]'")

    def tend(self) -> list[str]:
        lines: list[str] = []
        for row in deployments.wanted(self.db):
            name, state = row["name"], row["state"]
            if state == "pending" and name not in self.preparing:
                lines.append(f"deploying {row['model']} version {row['version']} as {name} on the cluster")
                self.preparing[name] = threading.Thread(target=self._apply, args=(row,), daemon=True,
                                                        name=f"deploy {name}")
                self.preparing[name].start()
            elif state == "starting" and row["endpoints"] and not self._applying(name):
                lines += self._check(row)
            elif state == "stopping":
                if (thread := self.preparing.pop(name, None)) is not None:
                    thread.join(timeout=60)
                self.api.delete(name)
                deployments.remove(self.db, name)
                lines.append(f"undeployed {name}")
        return lines

    def _apply(self, row: dict) -> None:
        db = open_db(state_db_path(self.home), migrate=False)
        name = row["name"]
        try:
            if not isinstance(self.settings, S3Settings) or self.spec.store_secret is None:
                raise ApplianceError("deploying a registered version on k3s needs MinIO (storage.object_store: "
                                     "minio): the engine pods fetch its files from it")
            deployments.set_state(db, name, "starting", message="fetching the model files to size the engine")
            model = version_model(db, self.store, self.home, row["version_id"], name=name, engine=row["engine"],
                                  replicas=row["replicas"], context_length=row["context_length"])
            version = version_row(db, row["version_id"])
            versions = [version_row(db, version["base_id"]), version] if version["format"] == "gguf-lora" else [version]
            key = secrets.token_hex(24)
            for doc in deployment_objects(self.spec, self.settings, row, model, versions, key):
                self.api.apply(doc)
            deployments.set_state(db, name, "starting", endpoints=[endpoint(self.spec, name, key)],
                                  message="waiting for the engine pods")
        except Exception as exc:
            message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
            deployments.set_state(db, name, "failed", message=message)
            self.say(f"deployment {name} failed: {message}")
        finally:
            db.conn.close()

    def _applying(self, name: str) -> bool:
        thread = self.preparing.get(name)
        return thread is not None and thread.is_alive()

    def _check(self, row: dict) -> list[str]:
        """Running once every replica is ready; a pod that cannot run is reported (and a
        crashing or unpullable one fails the deployment; an unscheduled one may yet fit)."""
        name = row["name"]
        ready, problem = self.api.progress(name)
        if ready:
            deployments.set_state(self.db, name, "running", endpoints=row["endpoints"])
            return [f"deployment {name} is running"]
        if problem is None or problem.message == row["message"]:
            return []
        state = "failed" if problem.fatal else "starting"
        deployments.set_state(self.db, name, state, endpoints=row["endpoints"], message=problem.message)
        return [f"deployment {name}: {problem.message}"]

    def stop(self) -> None:
        self.db.conn.close()


def run_kube_controller(home: Path, store: ObjectStoreSettings | None, spec_file: Path, say: Callable[[str], None],
                        tend_interval_s: float = 2.0) -> None:
    """The controller in the control pod until SIGTERM: the engines it made stay up when it stops."""
    import signal

    spec = msgspec.json.decode(spec_file.read_bytes(), type=ClusterSpec)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    controller = KubeDeploymentController(home, store, spec, KubeApi(spec.k3s.namespace), say)
    say(f"deployment controller on k3s, namespace {spec.k3s.namespace}, nodes {', '.join(i.hostname for i in spec.inventories)}")
    tend_until(stopping, controller, say, tend_interval_s)
