"""The deployment controller on k3s, up to the Kubernetes API: a version registered in a
real S3 server and deployed as /admin deploys it becomes a key Secret, engine Deployments
placed and given GPUs as the planner decides for the cluster's nodes, and a Service; the
objects validate against the Kubernetes schemas; the engine pods' init container fetches
the files with the command it is given. No Kubernetes API server runs here: what the
controller sends to one is not exercised (docs/k3s.md says so)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import kubernetes_validate
import msgspec
import pytest

from appliance import deployments
from appliance.config import K3sConfig
from appliance.db import open_db
from appliance.home import state_db_path
from appliance.model_registry import register
from appliance.objectstore import FilesystemSettings
from appliance.planning.inventory import read_inventory
from appliance.planning.plan_model import DeviceUse, ModelPlan, Placement, Plan
from services.engines import kube
from services.engines.deployments import version_model, version_row
from services.engines.kube_controller import (
    LABEL, REGISTRY_MOUNT, ClusterSpec, KubeDeploymentController, deployment_objects, endpoint, leftover,
)
from tests.conftest import default_gguf

INVENTORIES = Path(__file__).parents[1] / "inventories"
GiB = 1 << 30


NODES = ["gpu-a", "gpu-b", "ctl"]


def cluster(profile_gpus: list[str] = ()) -> ClusterSpec:
    """Three nodes: `gpu-a` and `gpu-b` with a T4 each, `ctl` with CPUs only; the profile's own
    engines hold the GPUs of the nodes in `profile_gpus`."""
    cpu, gpu = read_inventory(INVENTORIES / "edge-cpu-here.json"), read_inventory(INVENTORIES / "node-1x-t4.json")
    inventories = [msgspec.structs.replace(gpu if node.startswith("gpu") else cpu, hostname=node) for node in NODES]
    profile = ModelPlan(name="m", engine="llamacpp",
                        replicas=[Placement(node=node, device="gpu", gpus=[0]) for node in profile_gpus])
    return ClusterSpec(k3s=K3sConfig(namespace="llm", image="localhost/appliance:0.1.0@sha256:" + "a" * 64),
                       inventories=inventories, plan=Plan(profile="p", nodes=NODES, models=[profile], devices=[]),
                       store_secret="minio-credentials")


def objects(deployed, spec: ClusterSpec) -> tuple[dict, list[dict]]:
    """What the controller applies for the deployment, and the version it runs."""
    home, db, store, row = deployed
    model = version_model(db, store.open(), home, row["version_id"], name=row["name"], engine=row["engine"],
                          replicas=row["replicas"], context_length=row["context_length"])
    version = version_row(db, row["version_id"])
    return version, deployment_objects(spec, store, row, model, [version], "k" * 48)


def pods_by_node(docs: list[dict]) -> dict[str, dict]:
    engines = [d for d in docs if d["kind"] == "Deployment"]
    assert all(d["spec"]["replicas"] == 1 for d in engines)
    return {d["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]: d["spec"]["template"]["spec"]
            for d in engines}


@pytest.fixture
def deployed(tmp_path, s3_server):
    """The default model registered in the S3 server and deployed as /admin does: (home, db, row)."""
    home = tmp_path / "home"
    home.mkdir()
    db = open_db(state_db_path(home))
    store = msgspec.structs.replace(s3_server, bucket_prefix=f"k{time.monotonic_ns() % 10**8}-")
    objects = store.open()
    objects.ensure_buckets()  # as the gateway does at its start
    register(db, objects, "smol", default_gguf(), source="test", created_by="test")
    deployments.deploy(db, "smol", 1, name="smol-chat", replicas=2, context_length=1024, reserved=set(),
                       created_by="test")
    (row,) = deployments.wanted(db)
    return home, db, store, row


def test_a_deployment_becomes_a_secret_engine_deployments_on_the_planned_nodes_and_a_service(deployed):
    spec = cluster()
    version, docs = objects(deployed, spec)
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        assert doc["metadata"]["namespace"] == "llm" and doc["metadata"]["labels"][LABEL] == "smol-chat"
    secret, *_, service = docs
    assert (secret["kind"], secret["stringData"]) == ("Secret", {"api-key": "k" * 48})
    assert service["kind"] == "Service" and service["metadata"]["name"] == "engine-smol-chat"

    # Two replicas, whole GPUs: one on each T4.
    pods = pods_by_node(docs)
    assert sorted(pods) == ["gpu-a", "gpu-b"]
    for pod in pods.values():
        engine = pod["containers"][0]
        assert engine["resources"]["limits"] == {"nvidia.com/gpu": 1} and pod["runtimeClassName"] == "nvidia"
        args = engine["args"]
        assert args[args.index("--model") + 1] == f"{REGISTRY_MOUNT}/{version['sha256']}.gguf"
        assert args[args.index("--ctx-size") + 1] == str(1024 * int(args[args.index("--parallel") + 1]))
        assert {"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "deployment-smol-chat",
                                                                         "key": "api-key"}}} in engine["env"]
        assert "k" * 48 not in " ".join(args), "the key is never in the command line"
        assert engine["image"] == spec.k3s.image and engine["imagePullPolicy"] == "Never"
        assert pod["securityContext"]["runAsUser"] == 10001
        (fetch,) = pod["initContainers"]
        assert fetch["command"][:3] == ["python", "-m", "services.engines.fetch"]
        assert {"name": "APPLIANCE_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {
            "name": "minio-credentials", "key": "root-password"}}} in fetch["env"]
        assert pod["volumes"] == [{"name": "registry", "hostPath": {"path": "/var/lib/appliance/models/registry",
                                                                    "type": "DirectoryOrCreate"}}]
        assert {"name": "registry", "mountPath": REGISTRY_MOUNT, "readOnly": True} in engine["volumeMounts"]
    assert endpoint(spec, "smol-chat", "x")["base_url"] == "http://engine-smol-chat.llm.svc:8000/v1"


def test_a_deployment_goes_where_the_profiles_engines_leave_room(deployed):
    """The profile's engines hold both GPUs: the deployment runs on CPUs, with no GPU limits."""
    _, docs = objects(deployed, cluster(profile_gpus=["gpu-a", "gpu-b"]))
    pods = pods_by_node(docs)
    assert len(pods) == 2, "two nodes, one replica each"
    for pod in pods.values():
        assert "limits" not in pod["containers"][0]["resources"] and "runtimeClassName" not in pod


def test_the_init_containers_command_fetches_and_checks_the_files(deployed, tmp_path):
    store = deployed[2]
    version, docs = objects(deployed, cluster())
    fetch = docs[1]["spec"]["template"]["spec"]["initContainers"][0]["command"]
    dest = tmp_path / "node-cache"
    argv = [sys.executable, *fetch[1:]]
    argv[argv.index("--dest") + 1] = str(dest)
    env = {"APPLIANCE_S3_ACCESS_KEY": store.access_key, "APPLIANCE_S3_SECRET_KEY": store.secret_key, "PATH": ""}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    fetched = dest / f"{version['sha256']}.gguf"
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == version["sha256"]
    assert done.stdout.strip() == f"{fetched}: ready"

    del env["APPLIANCE_S3_SECRET_KEY"]
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert refused.returncode == 2 and "APPLIANCE_S3_SECRET_KEY must be set" in refused.stderr


def test_the_nodes_are_planned_as_the_profiles_engines_leave_them():
    spec = cluster()
    plan = Plan(profile="p", nodes=NODES, devices=[
        DeviceUse(node="ctl", device="ram", total_bytes=8 * GiB, planned_bytes=2 * GiB, free_after_bytes=1 * GiB)],
        models=[ModelPlan(name="m", engine="llamacpp", replicas=[Placement(node="gpu-a", device="gpu", gpus=[0])])])
    gpu_a, gpu_b, ctl = leftover(spec.inventories, plan)
    assert ctl.memory_available_bytes == spec.inventories[2].memory_available_bytes - 2 * GiB
    assert gpu_a.gpus == [] and gpu_b.gpus == spec.inventories[1].gpus, "the profile's engine has gpu-a's T4"


def test_a_deployment_on_the_filesystem_store_fails_saying_why(deployed):
    home, db, _, _ = deployed
    spec = msgspec.structs.replace(cluster(), store_secret=None)
    controller = KubeDeploymentController(home, FilesystemSettings(path=str(home / "blobs")), spec, api=None,
                                          say=lambda line: None)
    assert controller.tend() == ["deploying smol version 1 as smol-chat on the cluster"]
    controller.preparing["smol-chat"].join(30)
    (failed,) = deployments.wanted(db)
    assert failed["state"] == "failed" and "needs MinIO (storage.object_store: minio)" in failed["message"]
    controller.stop()


def test_a_stuck_pod_is_named_with_kubernetes_reason_as_the_client_serves_it():
    """pod_problem reads the API's JSON; the controller's client objects go through the client's own serializer."""
    from kubernetes import client

    serialize = client.ApiClient().sanitize_for_serialization

    def pod(**status) -> dict:
        return serialize(client.V1Pod(metadata=client.V1ObjectMeta(name="engine-x-0"), status=client.V1PodStatus(**status)))

    waiting = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
        reason="ErrImageNeverPull", message='image "localhost/appliance:0.1.1" not present'))
    stuck = pod(container_statuses=[client.V1ContainerStatus(name="engine", image="i", image_id="", ready=False,
                                                             restart_count=0, state=waiting)])
    assert kube.pod_problem(stuck) == kube.PodProblem('pod engine-x-0, container engine: ErrImageNeverPull: '
                                                      'image "localhost/appliance:0.1.1" not present', fatal=True)
    unschedulable = pod(conditions=[client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                                          message="0/3 nodes: Insufficient nvidia.com/gpu")])
    assert kube.pod_problem(unschedulable) == kube.PodProblem(
        "pod engine-x-0 cannot be scheduled: 0/3 nodes: Insufficient nvidia.com/gpu", fatal=False)  # room may come
    leaving = serialize(client.V1Pod(metadata=client.V1ObjectMeta(name="engine-x-0", deletion_timestamp=datetime.now(timezone.utc)),
                                     status=client.V1PodStatus(container_statuses=stuck["status"]["containerStatuses"])))
    assert leaving["metadata"]["deletionTimestamp"] and kube.pod_problem(leaving) is None
    starting = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason="ContainerCreating"))
    assert kube.pod_problem(pod(init_container_statuses=[client.V1ContainerStatus(
        name="fetch-model", image="i", image_id="", ready=False, restart_count=0, state=starting)])) is None
