"""The model registry and deployments through the admin API and the CLI, on a real stack
(real engine, real model) with each object store in turn: the embedded filesystem store and
a real S3 server process (moto)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest

from appliance.objectstore import FilesystemSettings, S3Settings
from tests.conftest import QUESTION, SYSTEM, appliance, default_gguf, free_port
from tests.gateway.registry_stores import stack, store_kind, store_settings  # noqa: F401 (each test on both stores)

pytestmark = pytest.mark.stack

def cli(stack, *args, key=None, check=True):
    env = {"APPLIANCE_URL": stack.root, "APPLIANCE_KEY": key or stack.admin_key}
    return appliance(*args, env=env, check=check)


def api(stack, key=None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key or stack.admin_key}"}, timeout=120)


def stored_model_keys(settings) -> set[str]:
    return {o.key for o in settings.open().list_objects("models")}


def hf_directory(path: Path) -> Path:
    """A small HF-format directory: config, tokenizer config, README front matter, one safetensors file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
        "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 16, "torch_dtype": "bfloat16"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    header = json.dumps({"embed.weight": {"dtype": "BF16", "shape": [16, 8], "data_offsets": [0, 256]},
                         "head.weight": {"dtype": "BF16", "shape": [8, 4], "data_offsets": [256, 320]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(320))
    return path


def test_the_registry_reads_for_every_role_and_deletes_only_for_operators(stack):
    assert httpx.get(f"{stack.root}/admin/models").status_code == 401
    developer = json.loads(appliance("keys", "create", "dev", "--role", "developer", "--json", home=stack.home).stdout)["key"]
    viewer = json.loads(appliance("keys", "create", "view", "--role", "viewer", "--json", home=stack.home).stdout)["key"]
    deadline = time.monotonic() + 10  # the gateway reloads keys every second; the viewer's is the newer
    while (allowed := api(stack, viewer).get("/admin/models")).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert allowed.status_code == 200
    denied = api(stack, developer).delete("/admin/models/x/versions/1")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_role"
    assert "models.delete" in denied.json()["error"]["message"]
    by_path = api(stack, developer).post("/admin/models/x/versions", json={"path": "/etc/passwd"})
    assert by_path.status_code == 403 and by_path.json()["error"]["param"] == "path", by_path.text  # server files


def test_register_by_upload_fills_the_card_from_gguf_metadata(stack, store_settings):
    gguf = default_gguf()
    out = cli(stack, "models", "register", "smol", str(gguf), "--json").stdout
    row = json.loads(out[out.index("{"):])
    assert row["version"] == 1 and row["format"] == "gguf" and row["size"] == gguf.stat().st_size
    card = row["card"]
    assert card["architecture"] == "llama" and card["parameters"] == 134_515_008
    assert card["quantization"] == "Q4_1" and card["context_length"] == 8192 and card["license"] == "apache-2.0"
    assert "<|im_start|>" in card["chat_template"]
    assert row["files"][0]["path"] == gguf.name
    assert f"sha256/{row['sha256']}" in stored_model_keys(store_settings)
    versions = json.loads(cli(stack, "models", "versions", "smol", "--json").stdout)["versions"]
    assert [v["version"] for v in versions] == [1]


def test_bad_model_input_registers_nothing(stack, store_settings, tmp_path):
    gguf = default_gguf()
    before = stored_model_keys(store_settings)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[:1_000_000])
    result = cli(stack, "models", "register", "broken", str(truncated), check=False)
    assert result.returncode == 1 and "not a readable GGUF file (truncated or corrupt" in result.stderr
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 4096)
    result = cli(stack, "models", "register", "broken", str(junk), check=False)
    assert result.returncode == 1 and "unknown model format" in result.stderr
    result = cli(stack, "models", "register", "broken", str(gguf), "--sha256", "0" * 64, check=False)
    assert result.returncode == 1 and "SHA-256 is" in result.stderr and "expected 000" in result.stderr
    # A client that hangs up halfway through its upload.
    with socket.create_connection(("127.0.0.1", stack.port)) as s:
        s.sendall(f"POST /admin/models/broken/upload?filename=cut.gguf HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {stack.admin_key}\r\nContent-Length: 50000000\r\n\r\n".encode())
        s.sendall(gguf.read_bytes()[:2_000_000])
    time.sleep(1)
    assert api(stack).get("/admin/models/broken").status_code == 404
    assert stored_model_keys(store_settings) == before
    staged = stack.home / "tmp"
    assert not staged.exists() or not any(staged.iterdir())  # no upload left behind


def test_the_same_content_twice_is_a_conflict(stack):
    cli(stack, "models", "register", "twice", str(default_gguf()))
    result = cli(stack, "models", "register", "twice", str(default_gguf()), check=False)
    assert result.returncode == 1 and "already registered as twice version 1" in result.stderr and "409" in result.stderr


def test_hf_directory_from_the_server_path_then_edit_and_compare(stack, tmp_path):
    directory = hf_directory(tmp_path / "tiny-llama")
    cli(stack, "models", "register", "mixed", str(default_gguf()))
    row = json.loads(cli(stack, "models", "register", "mixed", str(directory), "--server-path", "--json").stdout)
    assert row["version"] == 2 and row["format"] == "hf"
    assert row["card"]["parameters"] == 16 * 8 + 8 * 4 and row["card"]["license"] == "mit"
    assert row["card"]["architecture"] == "LlamaForCausalLM" and row["card"]["chat_template"] == "{{ messages }}"
    assert sorted(f["path"] for f in row["files"]) == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]

    cli(stack, "models", "edit-card", "mixed:2", "--set", "description=tiny test model", "--tags", "test,tiny",
        "--set", "license=apache-2.0")
    shown = json.loads(cli(stack, "models", "show", "mixed:2", "--json").stdout)
    assert shown["card"]["description"] == "tiny test model" and shown["card"]["tags"] == ["test", "tiny"]
    assert shown["card"]["license"] == "apache-2.0" and shown["edited_fields"] == ["description", "license", "tags"]
    assert shown["card"]["parameters"] == 160  # extracted facts stay
    refused = api(stack).patch("/admin/models/mixed/versions/2/card", json={"parameters": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "parameters"

    compared = json.loads(cli(stack, "models", "compare", "mixed", "1", "2", "--json").stdout)
    fields = {f["field"]: f for f in compared["fields"]}
    assert fields["format"]["a"] == "gguf" and fields["format"]["b"] == "hf" and not fields["format"]["same"]
    assert fields["architecture"]["a"] == "llama" and fields["architecture"]["b"] == "LlamaForCausalLM"
    assert fields["quantization"]["a"] == "Q4_1" and fields["quantization"]["b"] == "bfloat16"
    table = cli(stack, "models", "compare", "mixed", "1", "2").stdout
    assert "parameters" in table and "134515008" in table and "160" in table


def test_deploy_serves_without_restart_and_delete_waits_for_undeploy(stack, store_settings):
    cli(stack, "models", "register", "deployable", str(default_gguf()))
    gateway_pid = [p.pid for p in stack.descendants() if "granian" in " ".join(p.cmdline())]
    out = cli(stack, "models", "deploy", "deployable:1", "--as", "smol-deployed", "--context-length", "1024").stdout
    assert "is running as smol-deployed" in out
    client = stack.client()
    assert "smol-deployed" in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(model="smol-deployed", messages=[SYSTEM, QUESTION], temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    assert [p.pid for p in stack.descendants() if "granian" in " ".join(p.cmdline())] == gateway_pid  # no restart
    # A route may name the registry version itself: whichever deployment serves it answers.
    assert api(stack).put("/admin/routes/deployable-route", json={"targets": [{"model": "deployable@1"}]}).status_code == 200
    deadline = time.monotonic() + 5  # the gateway serves a new route within a second
    while (routed := api(stack).post("/v1/chat/completions", json={
            "model": "deployable-route", "messages": [SYSTEM, QUESTION], "max_tokens": 3})).status_code == 404 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert routed.status_code == 200 and routed.headers["x-appliance-model"] == "smol-deployed", routed.text
    unserved = api(stack).put("/admin/routes/deployable-route", json={"targets": [{"model": "deployable@2"}]})
    assert unserved.status_code == 400 and unserved.json()["error"]["param"] == "targets[0].model"
    assert api(stack).delete("/admin/routes/deployable-route").status_code == 200

    refused = cli(stack, "models", "delete", "deployable:1", check=False)
    assert refused.returncode == 1 and "deployed as smol-deployed: undeploy it first" in refused.stderr
    clash = api(stack).post("/admin/deployments", json={"model": "deployable", "version": 1, "name": "smollm2-135m-instruct"})
    assert clash.status_code == 409

    cli(stack, "models", "undeploy", "smol-deployed")
    deadline = time.monotonic() + 30
    while "smol-deployed" in [m.id for m in client.models.list().data] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "smol-deployed" not in [m.id for m in client.models.list().data]
    while api(stack).get("/admin/deployments/smol-deployed").status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stack.engine_pids("smol-deployed")
    gone = api(stack).post("/v1/chat/completions", json={"model": "smol-deployed", "messages": [QUESTION]})
    assert gone.status_code == 404
    cli(stack, "models", "delete", "deployable:1")
    assert api(stack).get("/admin/models/deployable").status_code == 404
    audited = json.loads(cli(stack, "audit", "list", "--json", "--target", "deployment/smol-deployed").stdout)
    assert [(e["action"], e["outcome"]) for e in audited] == [("deployment.delete", "ok"), ("deployment.create", "ok")]


def test_every_change_is_audited_with_who_and_request_id(stack, tmp_path):
    directory = hf_directory(tmp_path / "audited")
    cli(stack, "models", "register", "audited", str(directory), "--server-path")
    cli(stack, "models", "register", "audited", str(directory), "--server-path", check=False)  # refused: twice
    cli(stack, "models", "delete", "audited:1")
    response = api(stack).patch("/admin/models/nothing-here/versions/1/card", json={"description": "x"})
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    entries = json.loads(cli(stack, "audit", "list", "--json", "--limit", "1000").stdout)
    mine = [e for e in entries if e["request_id"] == request_id]
    assert len(mine) == 1 and mine[0]["action"] == "model.card.edit" and mine[0]["target"] == "model/nothing-here/1"
    assert mine[0]["outcome"].startswith("refused: model 'nothing-here' has no version 1")
    assert mine[0]["key_name"] == "admin (first start)" and mine[0]["role"] == "admin"
    audited = [(e["action"], e["outcome"]) for e in entries if e["target"].startswith("model/audited")]
    assert audited == [("model.delete", "ok"),
                       ("model.register", "refused: this content is already registered as audited version 1"),
                       ("model.register", "ok")]


@pytest.mark.parametrize("dead, why", [
    (lambda tmp: S3Settings(endpoint=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b"), "unreachable"),
    (lambda tmp: FilesystemSettings(path=str(tmp / "a-file" / "blobs")), "Not a directory"),
], ids=["s3", "filesystem"])
def test_unusable_object_store_is_a_clear_503_and_nothing_is_registered(tmp_path, dead, why):
    from appliance import model_registry
    from appliance.db import open_db
    from appliance.errors import StorageUnavailable

    db = open_db(tmp_path / "state.db")
    (tmp_path / "a-file").write_text("")
    gguf = tmp_path / "m.gguf"
    shutil.copy(default_gguf(), gguf)
    with pytest.raises(StorageUnavailable) as error:
        model_registry.register(db, dead(tmp_path).open(), "m", gguf, source="test", created_by=None)
    assert error.value.status == 503 and why in error.value.message
    assert db.execute("SELECT count(*) FROM model_versions").fetchone()[0] == 0
