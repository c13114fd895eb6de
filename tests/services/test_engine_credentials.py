"""Engine credentials on the real stack (`appliance up`, the real llama-server): each engine's
key is on no process's command line (any local user reads those with `ps`), only in the
engine's environment, which its own user and root alone can read; the engine's loopback port
answers nothing but /health without it; and every file in the home that holds a secret is
readable by its owner only."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import psutil
import pytest

from appliance.home import gateway_runtime_path
from services.gateway.runtime import read_runtime
from tests.conftest import DEFAULT_MODEL

# Files in the home that hold secrets: engines' keys and the object store's credentials
# (gateway.json), the admin key, key hashes (state.db and its WAL), jobs (jobs.db), the
# Litestream config and its S3 credentials (when written).
SECRET_FILES = ["run/gateway.json", "admin.key", "state.db", "state.db-wal", "jobs.db", "run/litestream.yml"]


def engine_keys(home: Path) -> list[tuple[str, str]]:
    """(base_url, key) of every local replica, as the gateway is told."""
    runtime = read_runtime(gateway_runtime_path(home))
    return [(r.base_url, r.api_key) for m in runtime.models if m.engine == "llamacpp" for r in m.replicas]


def test_engine_keys_are_in_no_command_line(stack):
    replicas = engine_keys(stack.home)
    assert replicas and all(len(key) == 48 for _, key in replicas)
    engines = stack.engine_pids(DEFAULT_MODEL)
    assert engines, "no engine process found"
    checked = 0
    for proc in psutil.process_iter():  # every process this user may see, the stack's own among them
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        checked += 1
        for _, key in replicas:
            assert key.encode() not in cmdline, f"pid {proc.pid} has an engine key on its command line: {cmdline!r}"
    assert checked > len(stack.descendants())
    logs = list((stack.home / "logs").glob("engine-*"))
    assert logs
    for log in logs:  # nor does the engine write it in its log
        assert not any(key in log.read_text(errors="replace") for _, key in replicas), log
    # The key is in the engine's environment, which only its user and root can read.
    keys = {key for _, key in replicas}
    for pid in engines:
        environ = Path(f"/proc/{pid}/environ")
        assert stat.S_IMODE(environ.stat().st_mode) == 0o400
        found = {e.split(b"=", 1)[1].decode() for e in environ.read_bytes().split(b"\0") if e.startswith(b"LLAMA_API_KEY=")}
        assert len(found) == 1 and found <= keys
    # The supervisor and the gateway were never given one.
    for pid in [stack.proc.pid, *(p.pid for p in stack.descendants() if p.pid not in engines)]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert not any(key.encode() in environ for key in keys), pid


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/completion", "/v1/completions", "/v1/embeddings",
                                  "/v1/models", "/props", "/metrics", "/slots", "/tokenize"])
def test_the_engine_answers_only_with_its_key(stack, path):
    """llama-server exempts only /health and /v1/health (and its web UI, which is off: --no-webui)
    from its key check (tools/server/server-http.cpp, `get_public_endpoints`)."""
    base_url, key = engine_keys(stack.home)[0]
    root = base_url.removesuffix("/v1")
    assert root.startswith("http://127.0.0.1:")
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "max_tokens": 1,
            "n_predict": 1, "input": "Hi", "content": "Hi"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key[:-1]}"}, {"X-Api-Key": "wrong"}):
        answer = httpx.request("GET" if path in ("/v1/models", "/props", "/metrics", "/slots") else "POST",
                               root + path, json=body, headers=headers, timeout=60)
        assert answer.status_code == 401, (path, headers, answer.status_code, answer.text)


def test_with_its_key_the_engine_answers(stack):
    base_url, key = engine_keys(stack.home)[0]
    root = base_url.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {key}"}
    chat = httpx.post(base_url + "/chat/completions", headers=auth, timeout=120, json={
        "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    assert httpx.post(root + "/completion", headers=auth, json={"prompt": "Hi", "n_predict": 1}, timeout=120).status_code == 200
    assert httpx.get(base_url + "/models", headers=auth, timeout=30).status_code == 200
    assert httpx.get(root + "/health", timeout=30).status_code == 200  # public: it says only "ok"


def test_files_holding_secrets_are_private(stack):
    home = stack.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    modes = {str(p.relative_to(home)): stat.S_IMODE(p.stat().st_mode) for p in home.rglob("*") if p.is_file()}
    present = [name for name in SECRET_FILES if name in modes]
    assert {"run/gateway.json", "admin.key", "state.db"} <= set(present), modes
    for name in present:
        assert modes[name] & 0o077 == 0, (name, oct(modes[name]))
    # Nothing in the home is readable by other users, whatever it holds.
    assert not {name: oct(mode) for name, mode in modes.items() if mode & 0o007}, modes
