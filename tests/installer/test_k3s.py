"""k3s manifests: every document validates against the Kubernetes schemas offline, and
the placement, GPUs, Services, secrets and images follow the profile and the plan."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import kubernetes_validate
import msgspec
import pytest
import yaml

from appliance.config import parse_profile
from appliance.errors import InstallError
from installer.k3s import render_k3s
from appliance.planning.inventory import Inventory, read_inventory
from appliance.planning.plan_model import DeviceUse, ModelPlan, Placement, Plan
from services.gateway.runtime import GatewayRuntime

GiB = 1 << 30
SCHEMA_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def small_cluster(tmp_path: Path, storage: dict | None = None, **k3s) -> object:
    data = {
        "name": "small-cluster-test",
        "gateway": {"port": 8080, "workers": 2},
        "models": [
            {"name": "qwen2.5-7b", "engine": "vllm", "path": "/var/lib/appliance/models/qwen2.5-7b-instruct"},
            {"name": "Llama_3B", "engine": "llamacpp", "path": "/srv/models/llama-3b.Q4_K_M.gguf", "replicas": 2,
             "context_length": 4096},
            {"name": "upstream", "engine": "remote", "base_url": "https://llm.example.com/v1",
             "api_key_env": "UPSTREAM_API_KEY", "upstream_model": "big-model"},
        ],
        "k3s": {"namespace": "llm", **k3s},
        **({"storage": storage} if storage else {}),
    }
    return parse_profile(data, source="test", base_dir=tmp_path, check_files=False)


def cluster_plan() -> Plan:
    """A CPU-only control node and two GPU nodes: vLLM on two GPUs of gpu-a, llama.cpp on gpu-b's GPU and on ctl's CPU."""
    return Plan(
        profile="small-cluster-test",
        nodes=["ctl", "gpu-a", "gpu-b"],
        models=[
            ModelPlan(name="qwen2.5-7b", engine="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.9,
                      max_model_len=8192, max_num_seqs=64,
                      replicas=[Placement(node="gpu-a", device="gpu", gpus=[0, 1], gpu_bytes=20 * GiB, ram_bytes=6 * GiB)]),
            ModelPlan(name="Llama_3B", engine="llamacpp", context_length=4096, gpu_layers=-1, layers=28,
                      replicas=[Placement(node="gpu-b", device="gpu", gpus=[0], gpu_bytes=3 * GiB, ram_bytes=2 * GiB),
                                Placement(node="ctl", device="cpu", ram_bytes=3 * GiB)]),
            ModelPlan(name="upstream", engine="remote"),
        ],
        devices=[DeviceUse(node="ctl", device="ram", total_bytes=32 * GiB, planned_bytes=3 * GiB, free_after_bytes=29 * GiB)],
    )


def cluster_inventories() -> list[Inventory]:
    """The plan's three nodes: ctl from this machine's kind of inventory, gpu-a and gpu-b with a T4 each."""
    here = Path(__file__).parents[1] / "inventories"
    cpu, gpu = read_inventory(here / "edge-cpu-here.json"), read_inventory(here / "node-1x-t4.json")
    return [msgspec.structs.replace(cpu, hostname="ctl"), msgspec.structs.replace(gpu, hostname="gpu-a"),
            msgspec.structs.replace(gpu, hostname="gpu-b")]


def load_dir(out: Path) -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(out.glob("*.yaml"))}


def all_docs(out: Path) -> list[dict]:
    return [d for docs in load_dir(out).values() for d in docs]


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_annotations(out: Path) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("annotations")
            for d in all_docs(out) if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["namespace"] == "llm"}


@pytest.fixture
def rendered(tmp_path):
    out = tmp_path / "manifests"
    written = render_k3s(small_cluster(tmp_path), cluster_plan(), out, cluster_inventories())
    return out, written


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_document_validates_against_the_kubernetes_schema(rendered, version):
    out, _ = rendered
    docs = all_docs(out)
    assert len(docs) >= 15
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_validator_catches_a_bad_document(rendered):
    out, _ = rendered
    deployment = find(all_docs(out), "Deployment", "control")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)


def test_files_one_per_concern(rendered):
    out, written = rendered
    assert sorted(p.name for p in written) == [
        "00-namespace.yaml", "05-nvidia-device-plugin.yaml", "10-secrets.yaml", "15-rbac.yaml", "20-minio.yaml", "30-control.yaml",
        "40-engine-llama-3b.yaml", "40-engine-qwen2-5-7b.yaml", "50-services.yaml", "60-disruption-budgets.yaml",
        "images.txt",
    ]
    for doc in all_docs(out):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "appliance"
        assert {"app.kubernetes.io/name", "app.kubernetes.io/component"} <= set(labels)
        if doc["kind"] != "Namespace" and doc["metadata"]["name"] != "nvidia-device-plugin":
            assert doc["metadata"]["namespace"] == "llm"


def test_engine_replicas_are_placed_as_planned(rendered):
    out, _ = rendered
    deployments = {d["metadata"]["name"]: d for d in all_docs(out) if d["kind"] == "Deployment" and d["metadata"]["name"] != "control"}
    assert set(deployments) == {"engine-qwen2-5-7b-gpu-a", "engine-llama-3b-gpu-b", "engine-llama-3b-ctl"}
    for name, node, replicas, gpus, memory in [
        ("engine-qwen2-5-7b-gpu-a", "gpu-a", 1, 2, "6144Mi"),
        ("engine-llama-3b-gpu-b", "gpu-b", 1, 1, "2048Mi"),
        ("engine-llama-3b-ctl", "ctl", 1, 0, "3072Mi"),
    ]:
        spec = deployments[name]["spec"]
        pod = spec["template"]["spec"]
        engine = pod["containers"][0]
        assert spec["replicas"] == replicas
        assert pod["nodeSelector"] == {"kubernetes.io/hostname": node}
        assert engine["resources"]["requests"]["memory"] == memory
        if gpus:
            assert engine["resources"]["limits"] == {"nvidia.com/gpu": gpus}
            assert pod["runtimeClassName"] == "nvidia"
        else:
            assert "limits" not in engine["resources"] and "runtimeClassName" not in pod
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert {"name": "models", "hostPath": {"path": "/var/lib/appliance/models", "type": "Directory"}} in pod["volumes"]
    plugin = load_dir(out)["05-nvidia-device-plugin.yaml"][0]
    terms = plugin["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["gpu-a", "gpu-b"]


def test_engine_command_line_comes_from_the_engine_builders(rendered):
    out, _ = rendered
    docs = all_docs(out)
    cpu = find(docs, "Deployment", "engine-llama-3b-ctl")["spec"]["template"]["spec"]["containers"][0]
    gpu = find(docs, "Deployment", "engine-llama-3b-gpu-b")["spec"]["template"]["spec"]["containers"][0]
    vllm = find(docs, "Deployment", "engine-qwen2-5-7b-gpu-a")["spec"]["template"]["spec"]["containers"][0]
    assert cpu["command"] == ["python"] and cpu["args"][:2] == ["-m", "services.engines.llama_server"]
    args = cpu["args"]
    # Not in models_host_path in the profile: looked for there by its base name.
    assert args[args.index("--model") + 1] == "/var/lib/appliance/models/llama-3b.Q4_K_M.gguf"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    slots = int(args[args.index("--parallel") + 1])
    assert args[args.index("--port") + 1] == "8000" and args[args.index("--ctx-size") + 1] == str(4096 * slots)
    assert args[args.index("--n-gpu-layers") + 1] == "0"
    assert gpu["args"][gpu["args"].index("--n-gpu-layers") + 1] == "-1"
    assert args[args.index("--threads") + 1] == "$(NODE_CPUS)"
    env = {e["name"]: e["valueFrom"] for e in cpu["env"]}
    assert env["LLAMA_API_KEY"] == {"secretKeyRef": {"name": "engine-keys", "key": "llama-3b"}}
    assert env["NODE_CPUS"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert vllm["command"] == ["vllm"] and vllm["args"][:2] == ["serve", "/var/lib/appliance/models/qwen2.5-7b-instruct"]
    vllm_env = {e["name"]: e.get("valueFrom") for e in vllm["env"]}
    assert vllm_env["VLLM_API_KEY"] == {"secretKeyRef": {"name": "engine-keys", "key": "qwen2-5-7b"}}
    assert vllm["args"][vllm["args"].index("--max-model-len") + 1] == "8192"
    for container, key_env in ((cpu, "LLAMA_API_KEY"), (vllm, "VLLM_API_KEY")):
        # The key is in no command line (anyone on the node reads those): only in the environment.
        assert not any(arg.startswith("--api-key") or "API_KEY" in arg for arg in container["args"]), container["args"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
        # started once it has generated one token (a build the node's CPU cannot run fails here)
        warm_up = container["startupProbe"]["exec"]["command"]
        assert warm_up[:3] == ["python", "-m", "services.engines.warmup"] and "--no-wait" in warm_up
        assert warm_up[warm_up.index("--key-env") + 1] == key_env
        assert container["startupProbe"]["timeoutSeconds"] > 120
        assert {"name": "models", "mountPath": "/var/lib/appliance/models", "readOnly": True} in container["volumeMounts"]


def test_control_pod(rendered):
    out, _ = rendered
    docs = load_dir(out)["30-control.yaml"]
    deployment = find(docs, "Deployment", "control")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["gateway", "worker", "litestream", "controller"]
    assert [c["name"] for c in pod["initContainers"]] == ["make-bucket", "restore-state"]
    gateway = pod["containers"][0]
    assert "-m services.gateway.launch" in " ".join(gateway["command"])
    assert "--workers 2" in " ".join(gateway["command"])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in gateway["env"]}
    assert env["APPLIANCE_HOME"]["value"] == "/var/lib/appliance"
    assert env["APPLIANCE_GATEWAY_RUNTIME"]["value"] == "/etc/appliance/gateway.json"
    assert env["UPSTREAM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "remote-api-keys", "key": "UPSTREAM_API_KEY"}}
    config = yaml.safe_load(find(docs, "ConfigMap", "litestream")["data"]["litestream.yml"])
    replica = config["dbs"][0]["replica"]
    assert config["dbs"][0]["path"] == "/var/lib/appliance/state.db"
    assert (replica["bucket"], replica["path"], replica["endpoint"]) == ("backups", "litestream/state.db",
                                                                        "http://minio.llm.svc:9000")
    assert [db["path"] for db in config["dbs"]] == ["/var/lib/appliance/state.db", "/var/lib/appliance/jobs.db"]
    assert config["dbs"][1]["replica"]["path"] == "litestream/jobs.db"
    litestream_env = {e["name"] for e in pod["containers"][2]["env"]}
    assert litestream_env == {"LITESTREAM_ACCESS_KEY_ID", "LITESTREAM_SECRET_ACCESS_KEY"}
    restore = pod["initContainers"][1]["command"]
    assert restore[:2] == ["sh", "-c"] and [c.split()[-1] for c in restore[2].split(" && ")] == [
        "/var/lib/appliance/state.db", "/var/lib/appliance/jobs.db"]
    worker = pod["containers"][1]
    assert worker["command"] == ["appliance", "worker", "--runtime", "/etc/appliance/gateway.json", "--health", "0.0.0.0:8091"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "worker-health"}
    assert {e["name"] for e in worker["env"]} == {"APPLIANCE_HOME", "APPLIANCE_GATEWAY_RUNTIME", "UPSTREAM_API_KEY"}
    assert [m["name"] for m in worker["volumeMounts"]] == ["state", "runtime"]  # not the gateway's metrics folder
    # The gateway reads litestream's config, where gateway.json says, for the replicas' lag (GET /admin/system).
    assert {"name": "litestream", "mountPath": "/etc/litestream", "readOnly": True} in gateway["volumeMounts"]
    # No NVIDIA device reaches the LAN-facing pod: no GPU limit, no nvidia runtime.
    assert "runtimeClassName" not in pod and all("limits" not in c["resources"] or "nvidia.com/gpu" not in
                                                 c["resources"]["limits"] for c in pod["containers"])
    assert find(docs, "PersistentVolumeClaim", "state")["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_a_bundles_image_is_never_pulled(tmp_path):
    out = tmp_path / "m"
    image = "localhost/appliance:0.1.0@sha256:" + "a" * 64
    render_k3s(small_cluster(tmp_path, image=image), cluster_plan(), out, cluster_inventories())
    containers = [c for d in all_docs(out) for c in (d.get("spec", {}).get("template", {}).get("spec", {}).get("initContainers", [])
                                                      + d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []))]
    ours = [c for c in containers if c["image"] == image]
    assert len(ours) == 8  # restore, gateway, worker, litestream, controller, and the three engine Deployments' engines
    assert all(c["imagePullPolicy"] == "Never" for c in ours)
    assert all("imagePullPolicy" not in c for c in containers if c["image"] != image)


def test_every_appliance_pod_runs_as_the_images_user(rendered):
    out, _ = rendered
    for doc in all_docs(out):
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod and pod["containers"][0]["image"] == "appliance:0.1.0":
            assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                              "fsGroup": 10001}, doc["metadata"]["name"]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS[-1:])
def test_the_filesystem_store_needs_no_minio_and_backs_up_to_a_volume(tmp_path, version):
    out = tmp_path / "fs"
    (tmp_path / "fs").mkdir()
    (out / "20-minio.yaml").write_text("# from an earlier render with MinIO\n")
    render_k3s(small_cluster(tmp_path, storage={"object_store": "filesystem"}), cluster_plan(), out, cluster_inventories())
    files = load_dir(out)
    assert "20-minio.yaml" not in files, "no MinIO, and an earlier render's file is gone"
    assert not [d for d in all_docs(out) if d["metadata"]["name"].startswith("minio")]
    assert "minio" not in (out / "images.txt").read_text()
    docs = files["30-control.yaml"]
    pod = find(docs, "Deployment", "control")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["restore-state"]
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}} in pod["volumes"]
    assert find(docs, "PersistentVolumeClaim", "backups")["spec"]["resources"]["requests"]["storage"] == "10Gi"
    for container in (pod["initContainers"][0], pod["containers"][2]):  # restore and litestream
        assert {"name": "backups", "mountPath": "/var/lib/appliance-backups"} in container["volumeMounts"]
        assert not container.get("env"), "no S3 credentials"
    config = yaml.safe_load(find(docs, "ConfigMap", "litestream")["data"]["litestream.yml"])
    assert [db["replica"] for db in config["dbs"]] == [
        {"type": "file", "path": f"/var/lib/appliance-backups/{db}", "sync-interval": "500ms"}
        for db in ("state.db", "jobs.db")]
    runtime = msgspec.json.decode(find(files["10-secrets.yaml"], "Secret", "gateway-runtime")["stringData"]["gateway.json"],
                                  type=GatewayRuntime)
    assert runtime.storage.path == "/var/lib/appliance/blobs"
    for doc in all_docs(out):
        kubernetes_validate.validate(doc, version, strict=True)


def test_minio_statefulset(tmp_path):
    out = tmp_path / "m"
    render_k3s(small_cluster(tmp_path, storage_class="fast", minio_volume_size="500Gi"), cluster_plan(), out, cluster_inventories())
    statefulset = find(load_dir(out)["20-minio.yaml"], "StatefulSet", "minio")
    claim = statefulset["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast" and claim["resources"]["requests"]["storage"] == "500Gi"
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert container["image"].startswith("minio/minio:RELEASE.")


def test_gateway_service_is_a_load_balancer_by_default(rendered):
    out, _ = rendered
    services = {d["metadata"]["name"]: d["spec"] for d in load_dir(out)["50-services.yaml"]}
    assert set(services) == {"engine-qwen2-5-7b", "engine-llama-3b", "gateway", "minio"}
    assert services["gateway"]["type"] == "LoadBalancer"
    assert services["gateway"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    assert services["engine-llama-3b"]["ports"][0]["port"] == 8000


def test_gateway_node_port(tmp_path):
    out = tmp_path / "np"
    render_k3s(small_cluster(tmp_path, gateway_service_type="NodePort", gateway_node_port=30080), cluster_plan(), out, cluster_inventories())
    gateway = find(all_docs(out), "Service", "gateway")["spec"]
    assert gateway["type"] == "NodePort" and gateway["ports"][0]["nodePort"] == 30080
    with pytest.raises(InstallError, match="gateway_node_port"):
        render_k3s(small_cluster(tmp_path, gateway_service_type="ClusterIP", gateway_node_port=30080), cluster_plan(), tmp_path / "x", cluster_inventories())


def test_secrets_are_private_and_kept_on_re_render(tmp_path):
    out = tmp_path / "keep"
    profile = small_cluster(tmp_path)
    out.mkdir()
    leftover = out / "10-secrets.yaml.tmp"  # of a render cut off: world-writable, under no umask
    leftover.write_text("")
    leftover.chmod(0o666)
    snoop = os.open(leftover, os.O_RDONLY)  # another user opened it while it was readable
    umask = os.umask(0)
    try:
        render_k3s(profile, cluster_plan(), out, cluster_inventories())
        # The secrets went into a file of their own, 0600 from its creation, not into the leftover.
        assert os.read(snoop, 1 << 16) == b""
    finally:
        os.umask(umask)
        os.close(snoop)
    secrets_file = out / "10-secrets.yaml"
    assert not leftover.exists()
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    first = {d["metadata"]["name"]: d["stringData"] for d in load_dir(out)["10-secrets.yaml"]}
    assert len(first["engine-keys"]["llama-3b"]) == 48 and first["engine-keys"]["llama-3b"] != first["engine-keys"]["qwen2-5-7b"]
    digests = pod_annotations(out)
    assert set(digests) == {"control", "minio", "engine-qwen2-5-7b-gpu-a", "engine-llama-3b-gpu-b", "engine-llama-3b-ctl"}

    render_k3s(profile, cluster_plan(), out, cluster_inventories())
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    second = {d["metadata"]["name"]: d["stringData"] for d in load_dir(out)["10-secrets.yaml"]}
    assert second == first
    assert pod_annotations(out) == digests  # nothing restarts

    runtime = msgspec.json.decode(first["gateway-runtime"]["gateway.json"], type=GatewayRuntime)
    replicas = {m.name: m.replicas for m in runtime.models}
    assert [r.base_url for r in replicas["Llama_3B"]] == ["http://engine-llama-3b.llm.svc:8000/v1"]
    assert [r.base_url for r in replicas["qwen2.5-7b"]] == ["http://engine-qwen2-5-7b.llm.svc:8000/v1"]
    assert replicas["Llama_3B"][0].api_key == first["engine-keys"]["llama-3b"]
    assert replicas["Llama_3B"][0].health_url == "http://engine-llama-3b.llm.svc:8000/health"
    assert (replicas["upstream"][0].base_url, replicas["upstream"][0].api_key_env) == ("https://llm.example.com/v1", "UPSTREAM_API_KEY")
    assert runtime.home == "/var/lib/appliance" and runtime.gateway.host == "0.0.0.0"
    assert runtime.litestream_config == "/etc/litestream/litestream.yml"
    # The control pod has no GPU and no sampler feeds it: GET /admin/system says so instead of NVML's reason.
    assert runtime.gpu_readings is None and "k3s" in runtime.no_gpus_reason and "docs/k3s.md" in runtime.no_gpus_reason
    # The registries use the cluster's MinIO, with the credentials MinIO itself is given.
    assert (runtime.storage.endpoint, runtime.storage.access_key, runtime.storage.secret_key) == (
        "http://minio.llm.svc:9000", first["minio-credentials"]["root-user"], first["minio-credentials"]["root-password"])
    # A fresh folder makes new secrets, and every pod that uses them restarts.
    fresh = tmp_path / "fresh"
    render_k3s(profile, cluster_plan(), fresh, cluster_inventories())
    assert all(pod_annotations(fresh)[name] != digests[name] for name in digests)
    # No secret value appears in any other manifest.
    others = "".join(p.read_text() for p in out.glob("*.yaml") if p.name != "10-secrets.yaml")
    for value in [*first["engine-keys"].values(), first["minio-credentials"]["root-password"]]:
        assert value not in others and base64.b64encode(value.encode()).decode() not in others


def test_images_txt_lists_every_image(rendered):
    out, _ = rendered
    used = set()
    for doc in all_docs(out):
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        used.update(c["image"] for c in pod.get("initContainers", []) + pod.get("containers", []))
    listed = (out / "images.txt").read_text().split()
    assert sorted(used) == listed
    assert {"appliance:0.1.0", "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"} <= used
    assert all(":" in image and not image.endswith(":latest") for image in listed)


def test_disruption_budgets(rendered):
    out, _ = rendered
    budgets = {d["metadata"]["name"]: d["spec"] for d in load_dir(out)["60-disruption-budgets.yaml"]}
    assert set(budgets) == {"engine-llama-3b", "control"}  # qwen2.5-7b has one replica
    assert budgets["engine-llama-3b"]["minAvailable"] == 1
    assert budgets["engine-llama-3b"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "engine-llama-3b"
    assert budgets["control"] == {"maxUnavailable": 1, "selector": {"matchLabels": {
        "app.kubernetes.io/name": "control", "app.kubernetes.io/component": "control"}}}


def test_a_removed_model_leaves_no_stale_manifest(tmp_path):
    out = tmp_path / "stale"
    render_k3s(small_cluster(tmp_path), cluster_plan(), out, cluster_inventories())
    profile = small_cluster(tmp_path)
    profile.models = [m for m in profile.models if m.name != "qwen2.5-7b"]
    plan = cluster_plan()
    plan.models = [m for m in plan.models if m.name != "qwen2.5-7b"]
    render_k3s(profile, plan, out, cluster_inventories())
    assert not (out / "40-engine-qwen2-5-7b.yaml").exists()
    assert (out / "40-engine-llama-3b.yaml").exists()


def test_out_pointing_at_a_file_is_refused(tmp_path):
    target = tmp_path / "manifests.yaml"
    target.write_text("keep me")
    with pytest.raises(InstallError, match="is a file, not a folder"):
        render_k3s(small_cluster(tmp_path), cluster_plan(), target, cluster_inventories())
    assert target.read_text() == "keep me"


def test_a_model_the_plan_does_not_place_is_refused(tmp_path):
    plan = cluster_plan()
    plan.models = [m for m in plan.models if m.name != "Llama_3B"]
    with pytest.raises(InstallError, match="places no replica of model 'Llama_3B'"):
        render_k3s(small_cluster(tmp_path), plan, tmp_path / "out", cluster_inventories())
    assert not (tmp_path / "out").exists()


def test_replicas_sharing_a_gpu_are_refused(tmp_path):
    plan = cluster_plan()
    plan.model("Llama_3B").replicas[1] = Placement(node="gpu-a", device="gpu", gpus=[1], gpu_bytes=3 * GiB, ram_bytes=2 * GiB)
    with pytest.raises(InstallError, match="replicas \\(qwen2.5-7b, Llama_3B\\) on GPU 1 of node gpu-a"):
        render_k3s(small_cluster(tmp_path), plan, tmp_path / "out", cluster_inventories())
    assert not (tmp_path / "out").exists()


def test_unreadable_earlier_secrets_are_not_silently_rotated(tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    (out / "10-secrets.yaml").write_text("kind: [unclosed")
    with pytest.raises(InstallError, match="move the file away"):
        render_k3s(small_cluster(tmp_path), cluster_plan(), out, cluster_inventories())
    assert (out / "10-secrets.yaml").read_text() == "kind: [unclosed"


def test_render_k3s_command(tmp_path):
    pytest.importorskip("appliance.planning.planner", reason="the planner is not in this tree yet")
    from click.testing import CliRunner

    from appliance.cli import cli

    inventory = Path(__file__).parents[1] / "inventories" / "edge-cpu-here.json"
    out = tmp_path / "manifests"
    result = CliRunner().invoke(cli, ["render", "k3s", "--profile", "edge-cpu", "--inventory", str(inventory), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "kubectl apply -f" in result.output and "appliance:0.1.0" in result.output
    engine = find(all_docs(out), "Deployment", "engine-smollm2-135m-instruct-vm")
    assert engine["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "vm"}


def test_render_k3s_refuses_llamacpp_layers_on_a_gpu_with_the_cpu_only_build(tmp_path):
    """The image carries the portable, CPU-only llama.cpp: a GPU given to it would sit idle."""
    from click.testing import CliRunner

    from appliance.cli import cli

    inventory = Path(__file__).parents[1] / "inventories" / "node-1x-t4.json"
    out = tmp_path / "manifests"
    result = CliRunner().invoke(cli, ["render", "k3s", "--profile", "edge-cpu", "--inventory", str(inventory),
                                      "--out", str(out)])
    assert result.exit_code != 0 and "this llama.cpp build has no GPU offload" in str(result.exception), result.output
    assert "gpu_layers: 0" in str(result.exception) and not out.exists()
