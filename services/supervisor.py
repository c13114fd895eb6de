"""`appliance up`: one foreground supervisor for the whole stack.

It starts one engine process per local replica, waits for each to be healthy and to
answer a one-token warm-up, writes the gateway's runtime file, starts the gateway
(Granian) and the job worker, restarts any child that dies (with backoff; an engine that
crashes `max_crashes` times within `crash_window_s` is marked failed instead), says why
each died, and on Ctrl-C or SIGTERM stops the gateway, the worker, then the engines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance.config import Profile
from appliance.db import open_db
from appliance.discovery import clear_gateway_url, local_url, write_gateway_url
from appliance.errors import ApplianceError, StorageUnavailable
from appliance.home import (
    RUNTIME_ENV, admin_key_path, gateway_runtime_path, jobs_db_path, litestream_config_path, litestream_socket_path,
    log_path, logs_dir, metrics_dir, state_db_path,
)
from appliance.keys import ensure_admin_key
from appliance.objectstore import ObjectStoreSettings
from appliance.planning.plan_model import Plan
from services.engines.deployments import DeploymentController
from services.engines.launch import ENGINE_HOST, free_port, replica_process
from services.engines.process import ManagedProcess
from services.gateway.metrics import MULTIPROC_ENV
from services.storage import litestream
from services.storage.minio import resolve_object_store
from services.gateway.runtime import GatewayRuntime, ReplicaEndpoint, ServedModel, write_runtime
from services.stack import gateway_argv, runtime_settings, remote_endpoint, served_model
from services.worker.main import SHUTDOWN_TIMEOUT_S

TEND_INTERVAL_S = 0.5


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ApplianceError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another with --port or APPLIANCE_PORT"
            ) from None


class Supervisor:
    def __init__(self, profile: Profile, plan: Plan, home: Path, host: str, port: int, say: Callable[[str], None] = print):
        self.profile = profile
        self.plan = plan
        self.home = home
        self.host = host
        self.port = port
        self.say = say
        self.engines: list[ManagedProcess] = []
        self.gateway: ManagedProcess | None = None
        self.worker: ManagedProcess | None = None
        self.storage: list[ManagedProcess] = []  # MinIO and Litestream, stopped last
        self.store: ObjectStoreSettings | None = None
        self.store_note = ""
        self.backup_note = ""
        self.litestream_config: Path | None = None  # where replication is on
        self.controller: DeploymentController | None = None
        self._stopping = False

    def _request_stop(self, signum, frame) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        try:
            check_port_free(self.host, self.port)
            admin_secret = self._prepare_home()
            self._start_storage()
            self._start_replication()
            runtime = self._start_engines()
            runtime_file = self._start_gateway(runtime)
            self._start_worker(runtime_file)
            self.controller = DeploymentController(self.home, self.store, self.say)
            self._announce(admin_secret)
            while not self._stopping:
                lines = [child.tend() for child in [*self.storage, *self.engines, self.gateway, self.worker]]
                for line in [*lines, *self.controller.tend()]:
                    if line:
                        self.say(line)
                time.sleep(TEND_INTERVAL_S)
            return 0
        except InterruptedError:
            return 0
        finally:
            self.say("stopping…")
            self.stop()
            self.say("stopped.")

    def _prepare_home(self) -> str | None:
        # As the systemd units' UMask=0077: whatever the stack and its children create (databases
        # with key hashes, configs with credentials, logs with prompts) is its user's alone.
        os.umask(0o077)
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)  # a home made earlier, e.g. by `appliance keys bootstrap`
        db = open_db(state_db_path(self.home))
        try:
            return ensure_admin_key(db, admin_key_path(self.home), by="appliance up")
        finally:
            db.conn.close()

    def _start_storage(self) -> None:
        """The managed MinIO (when the profile has one), then the buckets of the object store."""
        self.store, minio = resolve_object_store(self.profile, self.home)
        if minio is not None:
            child = ManagedProcess("minio", minio.argv, log_path=log_path(self.home, "minio"),
                                   health_url=minio.health_url, env=minio.env, startup_timeout_s=60)
            self.say(f"starting minio on {self.store.endpoint}")
            child.start()
            self.storage.append(child)
            child.wait_ready(lambda: self._stopping)
        if self.store is None:
            self.store_note = "none: the model and dataset registries are off (see storage.object_store)"
            return
        try:
            self.store.open().ensure_buckets()
            self.store_note = self.store.label
        except StorageUnavailable as exc:
            self.store_note = f"{self.store.label}, not available: the registries answer 503 until it is"
            self.say(f"warning: {exc.message}")

    def _start_replication(self) -> None:
        """Litestream ships every commit of the state database to the backup target."""
        target = litestream.backup_target(self.profile.backup, self.home, self.store)
        if target is None:
            self.backup_note = "off (backup.target: none)"
            return
        config, metrics_addr = litestream_config_path(self.home), f"{ENGINE_HOST}:{free_port()}"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(litestream.render_config(
            [state_db_path(self.home), jobs_db_path(self.home)], target, sync_interval_s=self.profile.backup.sync_interval_s,
            metrics_addr=metrics_addr, socket_path=litestream_socket_path(self.home)))
        child = ManagedProcess("litestream", litestream.replicate_argv(config), log_path=log_path(self.home, "litestream"),
                               health_url=litestream.health_url(metrics_addr), env=litestream.litestream_env(target, os.environ),
                               startup_timeout_s=30, stop_timeout_s=15)
        child.start()
        self.storage.append(child)
        child.wait_ready(lambda: self._stopping)
        self.litestream_config = config
        self.backup_note = (f"{target.url('state.db')} (and jobs.db beside it), "
                            f"every {self.profile.backup.sync_interval_s:g} s")

    def _start_engines(self) -> GatewayRuntime:
        served: list[ServedModel] = []
        created = int(time.time())
        for model in self.profile.models:
            endpoints: list[ReplicaEndpoint] = []
            if model.engine == "remote":
                endpoints.append(remote_endpoint(model))
            planned = self.plan.model(model.name)
            for index, placement in enumerate(planned.replicas):
                child, endpoint = replica_process(model, planned, placement, index, self.home)
                self.say(f"starting {model.engine} engine {model.name}#{index} on {endpoint.base_url}")
                child.start()
                self.engines.append(child)
                endpoints.append(endpoint)
            served.append(served_model(model, self.profile.gateway, endpoints, created))
        for child in self.engines:
            child.wait_ready(lambda: self._stopping)
            self.say(f"{child.name} is ready ({child.ready_note})")
        gateway = msgspec.structs.replace(self.profile.gateway, host=self.host, port=self.port)  # as actually served
        return GatewayRuntime(home=str(self.home), profile=self.profile.name, gateway=gateway, models=served,
                              storage=self.store, **runtime_settings(self.profile),
                              litestream_config=str(self.litestream_config) if self.litestream_config else None)

    def _start_gateway(self, runtime: GatewayRuntime) -> Path:
        runtime_file = gateway_runtime_path(self.home)
        write_runtime(runtime, runtime_file)
        env = {name: value for name, value in os.environ.items() if name != MULTIPROC_ENV}
        env[RUNTIME_ENV] = str(runtime_file)
        if runtime.gateway.workers > 1:
            # Several worker processes add their Prometheus values up through files, fresh each
            # start. One worker keeps them in memory: the files cost ~8 µs of CPU per request.
            metrics = metrics_dir(self.home)
            shutil.rmtree(metrics, ignore_errors=True)
            metrics.mkdir(parents=True)
            env[MULTIPROC_ENV] = str(metrics)
        argv = gateway_argv(sys.executable, self.host, self.port, runtime.gateway.workers)
        self.gateway = ManagedProcess(
            "gateway",
            argv,
            log_path=log_path(self.home, "gateway"),
            health_url=f"{local_url(self.host, self.port)}/healthz",
            env=env,
            startup_timeout_s=30,
            restart_at_once=True,
        )
        self.gateway.start()
        self.gateway.wait_ready(lambda: self._stopping)
        write_gateway_url(self.home, self.host, self.port)  # where the CLI on this machine finds it
        return runtime_file

    def _start_worker(self, runtime_file: Path) -> None:
        """Huey's consumer for /admin/jobs, answering its health check on a loopback port."""
        health = f"{ENGINE_HOST}:{free_port()}"
        self.worker = ManagedProcess(
            "worker",
            [sys.executable, "-m", "appliance.cli", "worker", "--runtime", str(runtime_file), "--health", health],
            log_path=log_path(self.home, "worker"),
            health_url=f"http://{health}/healthz",
            startup_timeout_s=30,
            stop_timeout_s=SHUTDOWN_TIMEOUT_S + 5,
        )
        self.worker.start()
        self.worker.wait_ready(lambda: self._stopping)

    def _announce(self, admin_secret: str | None) -> None:
        lines = [
            "",
            f"The appliance is up: profile {self.profile.name}, home {self.home}",
            f"  OpenAI endpoint:  {local_url(self.host, self.port)}/v1"
            + ("   (listening on all interfaces)" if self.host in ("0.0.0.0", "::") else ""),
            f"  models:           {', '.join(m.name for m in self.profile.models)}",
            f"  object store:     {self.store_note}",
            f"  state backup:     {self.backup_note}",
        ]
        if admin_secret:
            lines.append(f"  admin key:        {admin_secret}")
            lines.append(f"                    (shown once; also saved to {admin_key_path(self.home)}, mode 0600)")
        elif admin_key_path(self.home).exists():
            lines.append(f"  admin key:        in {admin_key_path(self.home)}")
        else:
            lines.append(f"  admin key:        {admin_key_path(self.home)} is gone; make a new one with "
                         f"`appliance keys bootstrap --home {self.home}`")
        lines += [f"  logs:             {logs_dir(self.home)}", "Press Ctrl-C to stop.", ""]
        self.say("\n".join(lines))

    def stop(self) -> None:
        """Gateway first (no new requests), the worker, then the engines, then storage; nothing is left running."""
        if self.gateway:
            clear_gateway_url(self.home)
            self.gateway.stop()
        if self.worker:
            self.worker.stop()
        if self.controller:
            self.controller.stop()
        for child in [*self.engines, *reversed(self.storage)]:
            child.stop()
