"""systemd units for a bare-metal install, rendered from a profile and its plan.

The templates in systemd/ (package data `appliance.systemd`) are filled with string.Template.
`out_dir` is laid out as the root of the machine: units in out_dir/etc/systemd/system, the
config and secrets in out_dir/etc/appliance, the sysusers.d and tmpfiles.d entries in
out_dir/usr/lib, so `out_dir` may be a staging folder or the install root itself. Engine
keys and MinIO credentials are generated on the first render and read back on the next,
and files are only rewritten when their bytes or mode change, so a re-render with nothing
changed changes nothing.

An engine's key is never on its command line (any local user reads those with `ps`): each
replica has its own environment file, root's and mode 0600, holding the one variable its
engine reads the key from (LLAMA_API_KEY or VLLM_API_KEY); systemd (as root) reads it into
the engine's environment, which only the service user and root can read.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import msgspec

from appliance.discovery import local_url
from appliance.home import (
    RUNTIME_ENV, gpu_readings_path, jobs_db_path, litestream_socket_path, minio_data_dir, state_db_path,
)
from appliance.config import ModelConfig, Profile
from appliance.errors import InstallError
from appliance.objectstore import FilesystemSettings, ObjectStoreSettings, S3Settings
from installer.layout import ENGINE_BASE_PORT, Layout, write_if_changed
from appliance.planning.plan_model import Placement, Plan, planned_model
from services.engines.commands import KEY_ENV, EngineCommand, engine_command
from services.engines.launch import engine_slots
from services.gateway.metrics import MULTIPROC_ENV
from services.gateway.runtime import GatewayRuntime, ReplicaEndpoint, read_runtime
from services.gpus import SAMPLE_INTERVAL_S
from services.engines.warmup import warm_up_argv
from services.stack import gateway_argv, runtime_settings, remote_endpoint, served_model
from services.storage import litestream
from services.storage.minio import (
    DEFAULT_MINIO_ENDPOINT, ROOT_USER, filesystem_settings, server_argv, store_kind, store_settings,
)

ENGINE_HOST = "127.0.0.1"
TARGET = "appliance.target"
GATEWAY_UNIT = "appliance-gateway.service"
CONTROLLER_UNIT = "appliance-controller.service"
WORKER_UNIT = "appliance-worker.service"
LITESTREAM_UNIT = "appliance-litestream.service"
MINIO_UNIT = "appliance-minio.service"
GPU_SAMPLER_UNIT = "appliance-gpu-sampler.service"
LEGACY_ENGINES_ENV = "engines.env"  # every engine's key, from renders that put keys in ExecStart; removed
MINIO_ENV = "minio.env"
REMOTE_KEYS_ENV = "remote-keys.env"  # written by the operator: one line per remote model's api_key_env
GATEWAY_RUNTIME = "gateway.json"
LITESTREAM_CONFIG = "litestream.yml"
SYSUSERS = Path("/usr/lib/sysusers.d/appliance.conf")
TMPFILES = Path("/usr/lib/tmpfiles.d/appliance.conf")
METRICS_DIR = "appliance-gateway"  # RuntimeDirectory: /run/appliance-gateway, fresh at each start
SAFE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./{}$-]+")


@dataclass(frozen=True)
class RenderedSystemd:
    units: list[Path]  # unit files, appliance.target last
    files: list[Path]  # /etc/appliance files (secrets 0600), sysusers.d and tmpfiles.d entries
    changed: list[Path]  # of the above, those whose bytes or mode this render changed
    removed: list[Path]  # units of an earlier render that this one no longer has (stop them)


def _slug(name: str) -> str:
    """The model name in unit names: lowercase letters, digits and '-' (as installer.k3s names objects)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")


def _word(arg: str) -> str:
    """One command-line argument as systemd reads it: % and $ doubled, quoted when needed."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if SAFE_WORD.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command(argv: list[str]) -> str:
    return " ".join(_word(a) for a in argv)


def _wait_ready(layout: Layout, url: str) -> str:
    """ExecStartPost: poll `url` every 2 s until it answers 200 (TimeoutStartSec ends the wait)."""
    code = ("import time; from services.engines.process import http_ok; "
            f"any(http_ok({url!r}) or time.sleep(2) for _ in iter(int, 1))")
    return _command([str(layout.bin / "python"), "-c", code])


def _template(name: str) -> str:
    return (importlib.resources.files("appliance.systemd") / name).read_text(encoding="utf-8")


def _fill(name: str, **values: str) -> str:
    """Fill a template; a line that is only a placeholder whose value is empty is left out."""
    lines = [line for line in _template(name).splitlines() if not (line.startswith("$") and values.get(line[1:]) == "")]
    return Template("\n".join(lines) + "\n").substitute(values)


def _hardening(layout: Layout, *, gpu: bool = False, capabilities: str = "", writable: tuple[Path, ...] = ()) -> str:
    if gpu:
        devices = ("# CUDA and NVML open /dev/nvidia*, which PrivateDevices=yes would hide: the host's /dev\n"
                   "# stays, and the device cgroup admits only NVIDIA devices (and /dev/null, /dev/urandom, ...).\n"
                   "PrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=char-nvidia* rw")
    else:
        devices = "PrivateDevices=yes"
    return _fill("hardening.in", user=layout.user, writable=" ".join(map(str, (layout.data, *writable))),
                 capabilities=capabilities, devices=devices).rstrip("\n")


def _read_env(path: Path) -> dict[str, str]:
    """NAME=VALUE lines of an earlier render's environment file."""
    if not path.exists():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InstallError(f"{path}: cannot read the secrets of the earlier render: {exc.strerror}") from None
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _env_file(header: str, values: dict[str, str]) -> str:
    return header + "".join(f"{name}={value}\n" for name, value in values.items())


def _previous_runtime(path: Path) -> GatewayRuntime | None:
    """The earlier render's gateway.json: its models' `created` times and S3 credentials are kept."""
    try:
        return read_runtime(path)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _object_store(profile: Profile, home: Path, etc: Path, with_minio: bool, previous: GatewayRuntime | None,
                  env: dict[str, str]) -> tuple[ObjectStoreSettings | None, dict[str, str] | None]:
    """The object store of the installed gateway, controller and Litestream (as `appliance up`
    resolves it), and MinIO's root credentials when the appliance runs MinIO."""
    storage = profile.storage
    kind = store_kind(storage, with_minio)
    if kind == "none":
        return None, None
    if kind == "filesystem":
        return filesystem_settings(storage, home), None
    if kind == "s3":
        access_key, secret_key = env.get(storage.access_key_env), env.get(storage.secret_key_env)
        kept = previous.storage if previous else None
        if not (access_key and secret_key) and isinstance(kept, S3Settings) and kept.endpoint == storage.endpoint:
            access_key, secret_key = kept.access_key, kept.secret_key
        if not (access_key and secret_key):
            raise InstallError(f"storage: object_store 's3' needs its credentials when installing: set "
                               f"{storage.access_key_env} and {storage.secret_key_env} (they are then kept in "
                               f"{etc / GATEWAY_RUNTIME}, mode 0600)")
        return store_settings(storage, storage.endpoint, access_key, secret_key), None
    if not with_minio:
        raise InstallError("storage.object_store is 'minio' but the install brings no MinIO binary "
                           "(build the bundle with --minio, or set storage.object_store)")
    old = _read_env(etc / MINIO_ENV)
    credentials = {"MINIO_ROOT_USER": old.get("MINIO_ROOT_USER") or ROOT_USER,
                   "MINIO_ROOT_PASSWORD": old.get("MINIO_ROOT_PASSWORD") or secrets.token_hex(24)}
    endpoint = storage.endpoint or DEFAULT_MINIO_ENDPOINT
    return store_settings(storage, endpoint, credentials["MINIO_ROOT_USER"], credentials["MINIO_ROOT_PASSWORD"]), credentials


@dataclass(frozen=True)
class _Replica:
    model: ModelConfig
    index: int  # in the plan's replicas of the model
    placement: Placement
    port: int
    slots: int | None  # what the gateway lets it run at once

    @property
    def unit(self) -> str:
        return f"appliance-engine-{_slug(self.model.name)}-{self.index}.service"

    @property
    def env_file(self) -> str:
        """Its key, in /etc/appliance: root's, mode 0600."""
        return f"engine-{_slug(self.model.name)}-{self.index}.env"


def _local_replicas(profile: Profile, plan: Plan, node: str) -> list[_Replica]:
    local = [m for m in profile.models if m.engine != "remote"]
    slugs = [_slug(m.name) for m in local]
    if clash := next((s for s in slugs if slugs.count(s) > 1), None):
        raise InstallError(f"models whose names differ only in case or punctuation share the unit name {clash!r}; rename one")
    replicas: list[_Replica] = []
    for model in local:
        mp = next((m for m in plan.models if m.name == model.name), None)
        if mp is None:
            raise InstallError(f"the plan has no model {model.name!r}; re-plan with the profile being rendered")
        here = [(i, p) for i, p in enumerate(mp.replicas) if p.node == node]
        if not here:
            where = ", ".join(sorted({p.node for p in mp.replicas})) or "no node"
            raise InstallError(f"model {model.name!r} has no replica on node {node!r} (the plan puts it on {where}); "
                               "systemd units serve one machine: render k3s manifests for a cluster")
        for index, placement in here:
            port = ENGINE_BASE_PORT + len(replicas)
            replicas.append(_Replica(model, index, placement, port, engine_slots(planned_model(model, mp, placement))))
    return replicas


def _engine_command(replica: _Replica, plan: Plan, key: str) -> EngineCommand:
    served = planned_model(replica.model, plan.model(replica.model.name), replica.placement)
    return engine_command(served, ENGINE_HOST, replica.port, key)


def _engine_argv(command: EngineCommand, layout: Layout) -> list[str]:
    """engine_command's argv (no key in it) with the installed venv's executables."""
    argv = command.argv
    program = "python" if argv[0] == sys.executable else argv[0]
    return [str(layout.bin / program), *argv[1:]]


def _engine_unit(replica: _Replica, command: EngineCommand, layout: Layout, header: str) -> str:
    model, placement = replica.model, replica.placement
    gpu = bool(placement.gpus)
    env = []
    if gpu:
        # NVML's (the probe's and the plan's) GPU order is PCI bus order; CUDA's default is not.
        env += ["CUDA_DEVICE_ORDER=PCI_BUS_ID", f"CUDA_VISIBLE_DEVICES={','.join(map(str, placement.gpus))}"]
    if model.engine == "vllm":
        env += ["HF_HUB_OFFLINE=1", "VLLM_NO_USAGE_STATS=1"]
    return _fill(
        "appliance-engine.service.in",
        header=header, model=model.name, replica=str(replica.index), engine=model.engine, port=str(replica.port),
        device=f"GPU {','.join(map(str, placement.gpus))}" if gpu else "CPU",
        after="After=nvidia-persistenced.service" if gpu else "",
        exec_start=_command(_engine_argv(command, layout)),
        warm_up=_command(warm_up_argv(str(layout.bin / "python"), f"http://{ENGINE_HOST}:{replica.port}", model,
                                      command.key_env)),
        home=str(layout.data), key_file=str(layout.etc / replica.env_file),
        environment="\n".join(f"Environment={e}" for e in env),
        start_timeout=str(math.ceil(model.startup_timeout_s)),
        hardening=_hardening(layout, gpu=gpu),
    )


def _gateway_unit(profile: Profile, replicas: list[_Replica], layout: Layout, header: str, after: str,
                  writable: tuple[Path, ...]) -> str:
    gateway = profile.gateway
    argv = gateway_argv(str(layout.bin / "python"), gateway.host, gateway.port, gateway.workers)
    lines = []
    if gateway.workers > 1:
        # Several workers add their Prometheus values up through files, fresh each start.
        lines += [f"RuntimeDirectory={METRICS_DIR}", f"Environment={MULTIPROC_ENV}=/run/{METRICS_DIR}"]
    if any(m.api_key_env for m in profile.models):
        lines.append(f"EnvironmentFile=-{layout.etc / REMOTE_KEYS_ENV}")
    capabilities = ""
    if gateway.port < 1024:
        capabilities = "CAP_NET_BIND_SERVICE"
        lines.append(f"AmbientCapabilities={capabilities}")
    engines = "".join(f" {r.unit}" for r in replicas) + after
    return _fill(
        "appliance-gateway.service.in",
        header=header, listen=f"{gateway.host}:{gateway.port}", engines=engines, exec_start=_command(argv),
        wait_ready=_wait_ready(layout, f"{local_url(gateway.host, gateway.port)}/healthz"),
        home=str(layout.data), runtime=str(layout.etc / GATEWAY_RUNTIME), environment="\n".join(lines),
        hardening=_hardening(layout, capabilities=capabilities, writable=writable),
    )


def _has_gpus(plan: Plan, node: str) -> bool:
    """The node's inventory lists GPUs (whether or not the profile's models use them)."""
    return any(d.node == node and d.device.startswith("gpu") for d in plan.devices)


def _controller_unit(plan: Plan, node: str, layout: Layout, header: str, after: str, writable: tuple[Path, ...]) -> str:
    gpu = _has_gpus(plan, node)
    argv = [str(layout.bin / "appliance"), "controller", "--runtime", str(layout.etc / GATEWAY_RUNTIME)]
    return _fill("appliance-controller.service.in", header=header, after=after, exec_start=_command(argv),
                 home=str(layout.data), runtime_env=RUNTIME_ENV, runtime=str(layout.etc / GATEWAY_RUNTIME),
                 hardening=_hardening(layout, gpu=gpu, writable=writable))


def _gpu_sampler_unit(layout: Layout, header: str) -> str:
    """The one process that reads NVML for the gateway, which has PrivateDevices=yes."""
    argv = [str(layout.bin / "appliance"), "gpu-sampler", "--runtime", str(layout.etc / GATEWAY_RUNTIME),
            "--interval", f"{SAMPLE_INTERVAL_S:g}"]
    return _fill("appliance-gpu-sampler.service.in", header=header, exec_start=_command(argv), home=str(layout.data),
                 interval=f"{SAMPLE_INTERVAL_S:g}", readings=str(gpu_readings_path(layout.data)),
                 hardening=_hardening(layout, gpu=True))


def _worker_unit(layout: Layout, header: str, after: str, writable: tuple[Path, ...]) -> str:
    argv = [str(layout.bin / "appliance"), "worker", "--runtime", str(layout.etc / GATEWAY_RUNTIME)]
    return _fill("appliance-worker.service.in", header=header, after=after, exec_start=_command(argv),
                 home=str(layout.data), runtime_env=RUNTIME_ENV, runtime=str(layout.etc / GATEWAY_RUNTIME),
                 hardening=_hardening(layout, writable=writable))


def _litestream(profile: Profile, layout: Layout, target: litestream.BackupTarget | None, header: str,
                after: str) -> tuple[str | None, dict[Path, tuple[str, int]], str]:
    """Litestream's unit and files (config, credentials), and the tmpfiles line of a backup folder."""
    if target is None:
        return None, {}, ""
    config = layout.etc / LITESTREAM_CONFIG
    text = header + "\n" + litestream.render_config(
        [state_db_path(layout.data), jobs_db_path(layout.data)], target, sync_interval_s=profile.backup.sync_interval_s,
        socket_path=litestream_socket_path(layout.data))
    files = {config: (text, 0o644)}
    environment, folder, writable = "", "", ()
    credentials = litestream.litestream_env(target, {})
    if credentials:
        files[layout.etc / litestream.LITESTREAM_ENV] = (_env_file("# The backup target's S3 credentials.\n", credentials), 0o600)
        environment = f"EnvironmentFile={layout.etc / litestream.LITESTREAM_ENV}"
    if target.kind == "file":
        folder = f"d {target.path} 0750 {layout.user} {layout.user} -\n"
        writable = (Path(target.path),)
    unit = _fill(
        "appliance-litestream.service.in", header=header, home=str(layout.data),
        hardening=_hardening(layout, writable=writable),
        after=after, environment=environment, replica=target.url("state.db"),
        exec_start=_command([str(layout.bin / "litestream"), "replicate", "-no-expand-env", "-config", str(config)]),
    )
    return unit, files, folder


def _runtime(profile: Profile, replicas: list[_Replica], keys: dict[str, str], layout: Layout,
             created: dict[str, int], store: ObjectStoreSettings | None, replicated: bool,
             sampled: bool) -> GatewayRuntime:
    """What the gateway serves: as `appliance up` writes it, with the units' ports and keys."""
    now = int(time.time())
    served = []
    for model in profile.models:
        if model.engine == "remote":
            endpoints = [remote_endpoint(model)]
        else:
            endpoints = [ReplicaEndpoint(base_url=f"http://{ENGINE_HOST}:{r.port}/v1",
                                         health_url=f"http://{ENGINE_HOST}:{r.port}/health", api_key=keys[r.unit],
                                         slots=r.slots)
                         for r in replicas if r.model is model]
        served.append(served_model(model, profile.gateway, endpoints, created.get(model.name, now)))
    return GatewayRuntime(home=str(layout.data), profile=profile.name, gateway=profile.gateway, models=served,
                          storage=store, **runtime_settings(profile),
                          litestream_config=str(layout.etc / LITESTREAM_CONFIG) if replicated else None,
                          gpu_readings=str(gpu_readings_path(layout.data)) if sampled else None)


def render_systemd(profile: Profile, plan: Plan, layout: Layout, out_dir: Path, *, node: str | None = None,
                   with_minio: bool = False, env: dict[str, str] | None = None) -> RenderedSystemd:
    """Write the units and their files for `node` (default: the plan's first) under out_dir.

    with_minio: MinIO's binary is at layout.bin/minio on the target, so `storage.object_store:
    auto` runs it. env: where the credentials of an `s3` object store are read (os.environ).
    """
    node = node or plan.nodes[0]
    if node not in plan.nodes:
        raise InstallError(f"node {node!r} is not in the plan (its nodes: {', '.join(plan.nodes)})")
    if out_dir.exists() and not out_dir.is_dir():
        raise InstallError(f"--out {out_dir}: is a file, not a folder")

    def at(path: Path) -> Path:
        return out_dir / path.relative_to("/")

    etc, units_dir = at(layout.etc), at(layout.units)
    header = f"# Rendered by `appliance render systemd` from profile {profile.name}: re-render rather than edit."
    replicas = _local_replicas(profile, plan, node)

    commands = {r.unit: _engine_command(r, plan, _read_env(etc / r.env_file).get(KEY_ENV[r.model.engine])
                                        or secrets.token_hex(24)) for r in replicas}
    keys = {unit: command.api_key for unit, command in commands.items()}
    previous = _previous_runtime(etc / GATEWAY_RUNTIME)
    store, minio_credentials = _object_store(profile, layout.data, etc, with_minio, previous,
                                             os.environ if env is None else env)
    objects: tuple[Path, ...] = ()  # a filesystem store outside the home: made at boot, writable by its users
    if isinstance(store, FilesystemSettings) and not Path(store.path).is_relative_to(layout.data):
        objects = (Path(store.path),)
    created = {m.name: m.created for m in previous.models} if previous else {}
    backup = litestream.backup_target(profile.backup, layout.data, store)
    # On a node with GPUs, appliance-gpu-sampler.service reads them for the gateway, which cannot.
    sampled = _has_gpus(plan, node)
    runtime = _runtime(profile, replicas, keys, layout, created, store, replicated=backup is not None, sampled=sampled)

    files = {
        **{etc / r.env_file: (_env_file(f"# The API key of {r.unit}: generated on the first render, kept on the next.\n",
                                        commands[r.unit].env), 0o600) for r in replicas},
        etc / GATEWAY_RUNTIME: (msgspec.json.format(msgspec.json.encode(runtime)).decode() + "\n", 0o600),
    }
    units: dict[str, str] = {}
    after = ""
    if minio_credentials is not None:
        files[etc / MINIO_ENV] = (_env_file("# MinIO root credentials: generated on the first render, kept on the next.\n",
                                            minio_credentials), 0o600)
        data = Path(profile.storage.data_path) if profile.storage.data_path else minio_data_dir(layout.data)
        units[MINIO_UNIT] = _fill(
            "appliance-minio.service.in", header=header, endpoint=store.endpoint, home=str(layout.data),
            minio_env=str(layout.etc / MINIO_ENV),
            hardening=_hardening(layout, writable=() if data.is_relative_to(layout.data) else (data,)),
            exec_start=_command(server_argv(layout.bin / "minio", store.endpoint, data)),
        )
        after = f" {MINIO_UNIT}"
    units.update({r.unit: _engine_unit(r, commands[r.unit], layout, header) for r in replicas})
    units[GATEWAY_UNIT] = _gateway_unit(profile, replicas, layout, header, after, objects)
    units[CONTROLLER_UNIT] = _controller_unit(plan, node, layout, header, after, objects)
    units[WORKER_UNIT] = _worker_unit(layout, header, after, objects)
    if sampled:
        units[GPU_SAMPLER_UNIT] = _gpu_sampler_unit(layout, header)
    litestream_unit, litestream_files, backup_folder = _litestream(profile, layout, backup, header, after)
    if litestream_unit is not None:
        units[LITESTREAM_UNIT] = litestream_unit
        files.update({at(path): content for path, content in litestream_files.items()})
    units[TARGET] = _fill("appliance.target.in", header=header, profile=profile.name, units=" ".join(units))
    files[at(SYSUSERS)] = (_fill("appliance.sysusers.conf.in", header=header, user=layout.user, home=str(layout.data)), 0o644)
    files[at(TMPFILES)] = (_fill("appliance.tmpfiles.conf.in", header=header, user=layout.user, home=str(layout.data),
                                 etc=str(layout.etc), runtime=str(layout.etc / GATEWAY_RUNTIME))
                           + "".join(f"d {p} 0750 {layout.user} {layout.user} -\n" for p in objects) + backup_folder, 0o644)

    changed = []
    for path, (text, mode) in [*((units_dir / name, (text, 0o644)) for name, text in units.items()), *files.items()]:
        if write_if_changed(path, text.encode(), mode):
            changed.append(path)
    unit_paths = [units_dir / name for name in units]
    # Units of an earlier render that this one no longer has (a removed model or replica, no MinIO, backup or GPU).
    removed = [p for p in [*units_dir.glob("appliance-engine-*.service"), units_dir / MINIO_UNIT, units_dir / LITESTREAM_UNIT,
                           units_dir / GPU_SAMPLER_UNIT]
               if p.exists() and p not in unit_paths]
    for path in removed:
        path.unlink()
    # Keys no unit reads any more: a removed replica's, and the old all-engines file.
    for path in [*etc.glob("engine-*.env"), etc / LEGACY_ENGINES_ENV]:
        if path.exists() and path not in files:
            path.unlink()
    return RenderedSystemd(units=unit_paths, files=list(files), changed=changed, removed=sorted(removed))
