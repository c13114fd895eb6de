"""The bare-metal install, run by `install.sh` from the freshly installed virtual environment.

`appliance install` copies the models into the data directory, writes the profile and
its plan into /etc/appliance, renders the systemd units (installer.systemd), creates the
service user and its folders (systemd-sysusers, systemd-tmpfiles), creates the admin key,
then enables and starts appliance.target. Every step compares before it writes, so a
second run with nothing changed changes nothing and says so. `appliance uninstall`
removes what the install added and keeps the data unless --purge.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import click
import msgspec
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from appliance.cli_options import profile_option
from appliance.config import load_profile, profile_file
from appliance.db import open_db
from appliance.errors import InstallError
from appliance.discovery import local_url
from appliance.home import admin_key_path, gateway_url_path, state_db_path
from appliance.keys import ensure_admin_key
from installer.layout import Layout, write_if_changed
from appliance.planning.plan_model import Plan
from appliance.planning.engine_builds import check_engine_builds
from appliance.planning.planner import choose_profile, make_plan
from appliance.planning.estimate import gib
from appliance.planning.probe import probe, probe_disk
from installer.systemd import SYSUSERS, TARGET, TMPFILES, render_systemd

PROFILE_FILE = "profile.yaml"
PLAN_FILE = "plan.json"


class Installer:
    def __init__(self, layout: Layout, console: Console):
        self.layout = layout
        self.console = console
        self.changed: list[str] = []

    def say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def path(self, target: Path) -> Path:
        return self.layout.on_disk(target)

    def write(self, target: Path, data: bytes, mode: int = 0o644) -> None:
        if write_if_changed(self.path(target), data, mode):
            self.changed.append(str(target))

    # --- steps ---------------------------------------------------------------

    def copy_models(self, profile) -> dict[str, str]:
        """Copy each local model into data/models/<name>/; returns name -> installed path."""
        installed: dict[str, str] = {}
        work = [(m, Path(m.path)) for m in profile.models if m.engine != "remote"]
        files = [(m, src, f) for m, src in work for f in ([src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()))]
        todo = []
        for model, src, f in files:
            rel = f.name if src.is_file() else f"{src.name}/{f.relative_to(src).as_posix()}"
            target = self.layout.models / model.name / rel
            dest = self.path(target)
            if not (dest.is_file() and dest.stat().st_size == f.stat().st_size and _same(dest, f)):
                todo.append((f, dest, target))
            installed[model.name] = str(self.layout.models / model.name / src.name)
        needed, free = sum(f.stat().st_size for f, _, _ in todo), probe_disk(self.path(self.layout.models)).free_bytes
        if needed > free:
            raise InstallError(f"the models need {gib(needed)} in {self.layout.models}, the disk has {gib(free)} free; "
                               "nothing was copied")
        if todo:
            columns = [TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
            with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:
                task = progress.add_task("copying models", total=needed)
                for f, dest, target in todo:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(dest.name + ".partial")
                    with open(f, "rb") as src_file, open(tmp, "wb") as out:
                        while chunk := src_file.read(1 << 20):
                            out.write(chunk)
                            progress.advance(task, len(chunk))
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, dest)
                    self.changed.append(str(target))
        return installed

    def write_profile(self, profile_source: Path, installed: dict[str, str]) -> Path:
        """The profile as installed: model paths point into the data directory."""
        data = yaml.safe_load(profile_source.read_text(encoding="utf-8"))
        for entry in data["models"]:
            if entry["name"] in installed:
                entry["path"] = installed[entry["name"]]
        target = self.layout.etc / PROFILE_FILE
        text = f"# Installed by install.sh from {profile_source.name}; re-run install.sh to change it.\n"
        self.write(target, (text + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode())
        return target

    def write_plan(self, plan: Plan) -> None:
        """plan.json, rewritten only when the placements or engine settings change (not free memory)."""
        path = self.path(self.layout.etc / PLAN_FILE)
        try:
            if msgspec.json.decode(path.read_bytes(), type=Plan).models == plan.models:
                return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass
        self.write(self.layout.etc / PLAN_FILE, msgspec.json.format(msgspec.json.encode(plan), indent=2) + b"\n")

    def systemd_files(self, profile, plan: Plan, with_minio: bool) -> list[Path]:
        rendered = render_systemd(profile, plan, self.layout, self.layout.root, with_minio=with_minio)
        root = self.layout.root
        self.changed += ["/" + str(p.relative_to(root)) for p in [*rendered.changed, *rendered.removed]]
        return rendered.units

    def service_user(self) -> None:
        """systemd-sysusers and systemd-tmpfiles apply our entries (they work on a --root tree too)."""
        root = ["--root", str(self.layout.root)] if self.layout.root != Path("/") else []
        _run(["systemd-sysusers", *root, str(self.path(SYSUSERS))])
        _run(["systemd-tmpfiles", *root, "--create", str(self.path(TMPFILES))])

    def gateway_url(self, gateway) -> None:
        """Where the CLI on this machine finds the gateway (appliance.discovery), beside the admin key."""
        self.write(gateway_url_path(self.layout.data), (local_url(gateway.host, gateway.port) + "\n").encode())

    def admin_key(self) -> Path:
        home = self.path(self.layout.data)
        db = open_db(state_db_path(home))
        try:
            if ensure_admin_key(db, admin_key_path(home), by="appliance install"):
                self.changed.append(str(admin_key_path(self.layout.data)))
        finally:
            db.conn.close()
        self._own(home)
        return admin_key_path(self.layout.data)

    def _own(self, home: Path) -> None:
        """The data directory belongs to the service user (uid from the tree's own passwd)."""
        uid = gid = None
        passwd = self.path(Path("/etc/passwd"))
        for line in passwd.read_text().splitlines() if passwd.exists() else []:
            fields = line.split(":")
            if fields[0] == self.layout.user:
                uid, gid = int(fields[2]), int(fields[3])
        if uid is None or os.geteuid() != 0:
            return
        for path in [home, *home.rglob("*")]:
            if not path.is_symlink() and (path.stat().st_uid, path.stat().st_gid) != (uid, gid):
                os.chown(path, uid, gid)

    def enable(self, units: list[Path]) -> str:
        if self.layout.root != Path("/"):
            _run(["systemctl", "--root", str(self.layout.root), "enable", TARGET])
            return "enabled in the tree, not started (--root): the machine that boots it starts them"
        if not Path("/run/systemd/system").exists():
            _run(["systemctl", "enable", TARGET])
            return "enabled, not started: systemd is not running on this machine"
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", TARGET])
        if self.changed:
            _run(["systemctl", "restart", TARGET])
        else:
            _run(["systemctl", "start", TARGET])
        return "running: " + ", ".join(p.name for p in units)


def _same(a: Path, b: Path) -> bool:
    def digest(p: Path) -> str:
        with open(p, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return digest(a) == digest(b)


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise InstallError(f"{argv[0]} is not installed; the bare-metal install needs systemd") from None
    if done.returncode != 0:
        raise InstallError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")


def install(layout: Layout, profile_name: str, console: Console) -> None:
    """Install `profile_name` (a built-in name, a YAML file, or `auto`: chosen from the hardware)."""
    step = Installer(layout, console)
    machine = probe(step.path(layout.data))
    profile_source = profile_file(choose_profile([machine]) if profile_name == "auto" else profile_name)
    step.say(f"installing profile {profile_source} into {layout.root}")
    source = load_profile(str(profile_source))
    # Refuses, with the numbers, before anything is written. The plan holds no paths, so it
    # stands for the installed copies of the models too.
    plan = make_plan(source, [machine])
    check_engine_builds(plan, machine)
    installed = step.copy_models(source)
    target_profile = step.write_profile(profile_source, installed)
    profile = load_profile(str(step.path(target_profile)), check_files=False)  # paths as on the target
    step.write_plan(plan)
    with_minio = step.path(layout.bin / "minio").is_file()
    units = step.systemd_files(profile, plan, with_minio)
    step.service_user()  # after rendering: it applies the rendered sysusers.d and tmpfiles.d entries
    step.gateway_url(profile.gateway)
    key = step.admin_key()
    state = step.enable(units)
    gateway = profile.gateway
    host = "<this machine's address>" if gateway.host in ("0.0.0.0", "::") else gateway.host
    summary = [
        "",
        "nothing changed: the install was already up to date" if not step.changed else f"{len(step.changed)} file(s) changed",
        f"  OpenAI endpoint:  http://{host}:{gateway.port}/v1",
        f"  admin key:        {key} (mode 0600; readable by root)",
        f"  profile:          {target_profile} (plan: {layout.etc / PLAN_FILE})",
        f"  models:           {', '.join(m.name for m in profile.models)}",
        f"  units:            {', '.join(p.name for p in units)}",
        f"  services:         {state}",
    ]
    for line in summary:
        step.say(line)


def uninstall(layout: Layout, purge: bool) -> None:
    step = Installer(layout, Console())
    units_dir = step.path(layout.units)
    units = sorted(units_dir.glob("appliance*.service")) + sorted(units_dir.glob(TARGET))
    if layout.root == Path("/") and Path("/run/systemd/system").exists():
        _run(["systemctl", "disable", "--now", TARGET])
    elif (units_dir / TARGET).exists():
        _run(["systemctl", *(["--root", str(layout.root)] if layout.root != Path("/") else []), "disable", TARGET])
    gateway_url = step.path(gateway_url_path(layout.data))  # no gateway serves the kept data any more
    removed = [p for p in [*units, step.path(SYSUSERS), step.path(TMPFILES), gateway_url] if p.exists()]
    for path in removed:
        path.unlink()
    for folder in [layout.prefix, layout.etc, *([layout.data] if purge else [])]:
        if step.path(folder).exists():
            shutil.rmtree(step.path(folder))
            removed.append(step.path(folder))
    # Plain echo: the libraries of the environment just removed may no longer import.
    click.echo(f"removed {len(removed)} item(s): units, {layout.prefix}, {layout.etc}" + (f", {layout.data}" if purge else ""))
    click.echo(f"removed the data in {layout.data} too (--purge)" if purge else
               f"kept the data in {layout.data} (state.db, admin.key, models); `--purge` removes it")


root_option = click.option("--root", type=click.Path(file_okay=False), default="/", show_default=True,
                           help="Install into this directory tree instead of / (tests, image builds).")


@click.command("install")
@root_option
@profile_option("auto", note=" install.sh passes a bundle's own.")
def install_command(root: str, profile_name: str) -> None:
    """Install the stack as systemd services (run by install.sh; safe to run again).

    Copies the profile's models into /var/lib/appliance/models, writes /etc/appliance
    (profile, plan, gateway runtime and secrets with mode 0600), renders the units,
    creates the `appliance` user and its folders, creates the admin key and enables
    appliance.target (and starts it when systemd runs and --root is /).

    Runs on this machine, not through the admin API: it installs the gateway that
    serves that API, and records its URL in the data directory for the CLI here.
    """
    install(Layout(root=Path(root).absolute()), profile_name, Console(stderr=False))


@click.command("uninstall")
@root_option
@click.option("--purge", is_flag=True, help="Also remove the data directory: state database, keys, models.")
def uninstall_command(root: str, purge: bool) -> None:
    """Stop and remove the installed appliance; keeps /var/lib/appliance unless --purge.

    Runs on this machine, not through the admin API: it removes the gateway that serves it.
    """
    uninstall(Layout(root=Path(root).absolute()), purge)
