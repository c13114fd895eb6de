"""The deployment controller: runs the engines of registered model versions deployed
through /admin, while the appliance runs (see appliance/deployments.py for the states).

The supervisor calls `tend()` twice a second. A pending deployment is started on a
thread of its own (fetch the files from the object store, plan, start the replicas,
wait until healthy) so a long download never holds up the supervisor; a deployment
marked stopping is drained for a moment (the gateway drops it within a second), then
its engines are stopped and its row removed.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance import deployments
from appliance.config import ModelConfig, Profile
from appliance.db import open_db
from appliance.errors import ApplianceError, ProcessFailed
from appliance.home import models_cache_dir, state_db_path
from appliance.model_registry import materialize
from appliance.objectstore import ObjectStore, ObjectStoreSettings
from services.engines.launch import replica_process
from services.engines.process import FAILED, READY, ManagedProcess

DRAIN_S = 2.0  # the gateway polls deployments every second; let it stop routing first


class _Running:
    def __init__(self, name: str):
        self.name = name
        self.thread: threading.Thread | None = None
        self.prepared: tuple[ModelConfig, object] | None = None  # the model and its plan, once fetched
        self.children: list[ManagedProcess] = []
        self.endpoints: list[dict] = []
        self.ready = False
        self.cancelled = False
        self.stop_at: float | None = None


class DeploymentController:
    def __init__(self, home: Path, store: ObjectStoreSettings | None, say: Callable[[str], None]):
        self.home = home
        self.store = store.open() if store else None
        self.say = say
        self.active: dict[str, _Running] = {}
        self.db = open_db(state_db_path(home))
        # After a restart every deployment starts again; undeploys asked for meanwhile are done.
        for row in deployments.wanted(self.db):
            if row["state"] == "stopping":
                deployments.remove(self.db, row["name"])
            else:
                self.db.execute("UPDATE deployments SET state = 'pending', endpoints = '[]', message = NULL WHERE name = ?",
                                [row["name"]])

    def tend(self) -> list[str]:
        lines: list[str] = []
        rows = {row["name"]: row for row in deployments.wanted(self.db)}
        for name, row in rows.items():
            if row["state"] == "pending" and name not in self.active:
                lines.append(f"deploying {row['model']} version {row['version']} as {name}")
                self._prepare(row)
            elif row["state"] == "stopping":
                lines += self._stop_when_drained(name)
        for name in [n for n in self.active if n not in rows]:  # row deleted behind our back
            self._stop(self.active.pop(name))
        for running in list(self.active.values()):
            if running.cancelled:
                continue
            if running.prepared and not running.children:
                self._launch(running)
            elif running.children and not running.ready:
                lines += self._check_ready(running)
            elif running.ready:
                lines += filter(None, (child.tend() for child in running.children))
                if all(child.state == FAILED for child in running.children):
                    self._failed(self.db, running, ApplianceError("every replica failed: " + "; ".join(
                        f"{child.name}: {child.reason}" for child in running.children)))
        return lines

    def _prepare(self, row: dict) -> None:
        """Fetch and plan on a thread: downloads can be long and the supervisor must keep tending."""
        running = _Running(row["name"])
        running.thread = threading.Thread(target=self._fetch_and_plan, args=(row, running), daemon=True,
                                          name=f"deploy {row['name']}")
        self.active[row["name"]] = running
        running.thread.start()

    def _fetch_and_plan(self, row: dict, running: _Running) -> None:
        from appliance.planning.engine_builds import check_engine_builds
        from appliance.planning.planner import make_plan
        from appliance.planning.probe import probe

        db = open_db(state_db_path(self.home), migrate=False)
        name = row["name"]
        try:
            deployments.set_state(db, name, "starting", message="fetching the model files")
            if self.store is None:
                raise ApplianceError("no object store is configured (storage.object_store), so no files to run")
            model = version_model(db, self.store, self.home, row["version_id"], name=name, engine=row["engine"],
                                  replicas=row["replicas"], context_length=row["context_length"])
            machine = probe(self.home)
            plan = make_plan(Profile(name=f"deployment-{name}", models=[model]), [machine])
            check_engine_builds(plan, machine)
            deployments.set_state(db, name, "starting", message="loading the model")
            running.prepared = (model, plan.model(name))
        except Exception as exc:
            self._failed(db, running, exc)
        finally:
            db.conn.close()


    def _launch(self, running: _Running) -> None:
        """Start the replicas from the supervisor's own thread: they die with the thread that made them."""
        model, planned = running.prepared
        try:
            for index, placement in enumerate(planned.replicas):
                child, endpoint = replica_process(model, planned, placement, index, self.home)
                child.start()
                running.children.append(child)
                running.endpoints.append(msgspec.to_builtins(endpoint))
        except Exception as exc:
            self._failed(self.db, running, exc)

    def _check_ready(self, running: _Running) -> list[str]:
        """Running once every replica is healthy and answered its warm-up; failed if one died or timed out."""
        lines = []
        for child in running.children:
            was_ready = child.state == READY
            try:
                if child.poll_ready() and not was_ready:
                    lines.append(f"{child.name} is ready ({child.ready_note})")
            except ProcessFailed as exc:
                self._failed(self.db, running, exc)
                return lines
        if all(child.state == READY for child in running.children):
            running.ready = True
            deployments.set_state(self.db, running.name, "running", endpoints=running.endpoints)
            lines.append(f"deployment {running.name} is running ({len(running.children)} replica(s))")
        return lines

    def _failed(self, db, running: _Running, exc: Exception) -> None:
        message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
        deployments.set_state(db, running.name, "failed", message=message)
        self.say(f"deployment {running.name} failed: {message}")
        running.cancelled = True
        for child in running.children:
            if child.state != FAILED:  # a failed one is down already and keeps its reason for the gateway
                child.stop()

    def _stop_when_drained(self, name: str) -> list[str]:
        running = self.active.get(name)
        if running is None:
            deployments.remove(self.db, name)
            return [f"undeployed {name}"]
        running.cancelled = True
        if running.stop_at is None:
            running.stop_at = time.monotonic() + DRAIN_S
        if time.monotonic() < running.stop_at or (running.thread and running.thread.is_alive()):
            return []
        self._stop(self.active.pop(name))
        deployments.remove(self.db, name)
        return [f"undeployed {name}"]

    @staticmethod
    def _stop(running: _Running) -> None:
        running.cancelled = True
        if running.thread is not None:
            running.thread.join(timeout=30)
        for child in running.children:
            child.stop()

    def stop(self) -> None:
        """Stop every deployment's engines; they start again with the next `appliance up`."""
        for running in self.active.values():
            self._stop(running)
        self.active.clear()
        self.db.conn.close()


def run_controller(home: Path, store: ObjectStoreSettings | None, say: Callable[[str], None],
                   tend_interval_s: float = 0.5) -> None:
    """The controller alone in the foreground (`appliance controller`) until SIGTERM or SIGINT:
    deployed engines are its children, stopped with it and started again at its next start."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    controller = DeploymentController(home, store, say)
    say(f"deployment controller for {home}: object store {store.label if store else 'none'}")
    tend_until(stopping, controller, say, tend_interval_s)


def tend_until(stopping: threading.Event, controller, say: Callable[[str], None], interval_s: float) -> None:
    """Call controller.tend() every interval_s, saying what it reports, until `stopping`; then stop it."""
    try:
        while not stopping.is_set():
            for line in controller.tend():
                say(line)
            stopping.wait(interval_s)
    finally:
        controller.stop()
        say("deployment controller stopped.")


def version_model(db, store: ObjectStore, home: Path, version_id: str, *, name: str, engine: str, replicas: int,
                  context_length: int) -> ModelConfig:
    """The engine model of a registered version, its files fetched into the home's cache: a
    fine-tuned version (gguf-lora) is its base's file with its own adapter (`--lora`)."""
    version = version_row(db, version_id)
    adapters = []
    if version["format"] == "gguf-lora":
        adapters.append(materialize(store, version, models_cache_dir(home)))
        version = version_row(db, version["base_id"])
    path = materialize(store, version, models_cache_dir(home))
    return ModelConfig(name=name, engine=engine, path=str(path), replicas=replicas, context_length=context_length,
                       extra_args=[arg for adapter in adapters for arg in ("--lora", str(adapter))])


def version_row(db, version_id: str) -> dict:
    format_, sha256, files, base_id = db.execute(
        "SELECT format, sha256, files, base_id FROM model_versions WHERE id = ?", [version_id]).fetchone()
    return {"format": format_, "sha256": sha256, "files": json.loads(files), "base_id": base_id}
