"""`appliance upgrade --bundle FILE`: a bare-metal install from its version to a bundle's,
with the way back kept until the new one has passed its health check.

1. The bundle is verified (every checksum) and checked against this machine before
   anything is written. A bundle already installed (its SHA-256 is in
   /etc/appliance/bundle.json) changes nothing.
2. The services stop (systemd running, root /). The state databases are copied with
   SQLite's online backup into <data>/backups/upgrade-<UTC time>/, with /etc/appliance and
   the unit files; the virtual environment is kept beside itself, hard-linked, as
   <prefix>.previous.
3. pip installs the bundle's wheels into the environment (no index), and the new
   version's `appliance install` lays out models, units and plan from the bundle's
   profile; the databases are migrated when it opens them.
4. The health check: the services start again, or under --root (no services) the new
   version runs `appliance up` on the installed data; it passes once /readyz says every
   model is ready, and every table still holds at least the rows it had.
5. A failure anywhere after step 2 rolls back: the environment, /etc/appliance, the units
   and the databases as they were, and the services start again.

The running upgrade is the old version's code: it imports what it needs before pip
replaces the environment, and runs the new version only as subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import yaml

from appliance.errors import ApplianceError, InstallError
from appliance import snapshots
from appliance.home import gateway_url_path
from installer.install import root_option
from installer.layout import Layout
from installer.systemd import SYSUSERS, TARGET, TMPFILES
from services.engines.process import direct

RECORD = "bundle.json"  # in /etc/appliance: the bundle the install came from


@dataclass(frozen=True)
class Saved:
    """What step 2 kept, to roll back to."""

    folder: Path  # <data>/backups/upgrade-...: the databases, etc/, and units/ (the unit files at their paths)
    previous: Path  # <prefix>.previous


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _installed_version(python: Path) -> str:
    """-I: never the working directory's packages (a checkout's egg-info would answer instead)."""
    done = subprocess.run([str(python), "-I", "-c", "import importlib.metadata as m; print(m.version('appliance'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


class Upgrade:
    def __init__(self, layout: Layout, say, health_timeout_s: float):
        self.layout, self.say, self.health_timeout_s = layout, say, health_timeout_s
        self.prefix = layout.on_disk(layout.prefix)
        self.etc = layout.on_disk(layout.etc)
        self.data = layout.on_disk(layout.data)
        self.systemd = layout.root == Path("/") and Path("/run/systemd/system").exists()

    # --- the steps ---------------------------------------------------------------------

    def run(self, bundle: Path) -> str:
        from installer.bundle import check_compatible, unpack_bundle, verify_bundle  # ~60 ms: not at CLI start

        bundle = bundle.absolute()
        python = self.prefix / "bin" / "python"
        if not (self.prefix / "bin" / "appliance").is_file():
            raise InstallError(f"no appliance is installed in {self.prefix}: install it first (install.sh --bundle FILE)")
        self.say(f"verifying {bundle} ...")
        manifest = verify_bundle(bundle)
        check_compatible(manifest)
        digest = _sha256(bundle)
        old = _installed_version(python)
        record = self._record()
        if record.get("sha256") == digest:
            return f"nothing to do: appliance {old} is installed from this bundle ({digest[:12]}…) already"
        self.say(f"upgrading appliance {old} to {manifest.appliance_version} from {bundle.name}")
        with tempfile.TemporaryDirectory(prefix="appliance-upgrade.") as tmp:
            staging = unpack_bundle(bundle, Path(tmp) / "bundle")
            self._systemctl("stop", TARGET)
            try:
                saved = self._save()
            except BaseException:
                self._systemctl("start", TARGET, check=False)  # nothing was changed: back to serving
                raise
            try:
                self._install(staging, manifest.requirement)
                seconds = self._health_check()
                kept = self._check_rows(saved)
            except BaseException as exc:  # an error, or Ctrl-C: never leave a half-upgraded install
                self._roll_back(saved)
                reason = exc.message if isinstance(exc, ApplianceError) else (
                    "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
                raise InstallError(f"the upgrade to {manifest.appliance_version} failed, so it was rolled back to "
                                   f"{old} (environment, configuration, units and databases as they were; the backup "
                                   f"stays in {saved.folder}): {reason}") from None
        shutil.rmtree(saved.previous)
        self._write_record({"sha256": digest, "appliance_version": manifest.appliance_version,
                            "profile": manifest.profile, "installed_at": datetime.now(timezone.utc).isoformat()})
        return "\n".join([
            f"upgraded appliance {old} to {manifest.appliance_version}",
            f"  health check:  passed in {seconds:.0f} s" + (" (services restarted)" if self.systemd else
                                                           " (the new version ran on the installed data; --root)"),
            f"  databases:     migrated; {kept}",
            f"  backup:        {self.layout.data / saved.folder.relative_to(self.data)}",
        ])

    def _save(self) -> Saved:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        backups = self.data / "backups"
        backups.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=backups, prefix=f"upgrade-{stamp}-"))  # unique, even within a second
        snapshots.take(self.data, folder)
        shutil.copytree(self.etc, folder / "etc", symlinks=True)
        for unit in self._unit_files():  # kept at their paths under the root
            kept = folder / "units" / unit.relative_to(self.layout.root)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(unit, kept)
        previous = self.prefix.with_name(self.prefix.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        shutil.copytree(self.prefix, previous, symlinks=True, copy_function=os.link)
        self.say(f"backed up the databases, {self.layout.etc} and the units into {folder}")
        return Saved(folder=folder, previous=previous)

    def _install(self, staging: Path, requirement: str) -> None:
        self.say("installing the bundle's wheels (no index) ...")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        self._run([str(self.prefix / "bin" / "python"), "-m", "pip", "install", "--quiet", "--isolated",
                   "--disable-pip-version-check", "--no-index", "--find-links", str(staging / "wheels"),
                   "--upgrade", requirement], "pip install", env=env)
        if (staging / "bin" / "minio").is_file():  # a new file: the old one is hard-linked into <prefix>.previous
            fd, tmp = tempfile.mkstemp(dir=self.prefix / "bin", prefix=".minio.")
            os.close(fd)
            shutil.copy2(staging / "bin" / "minio", tmp)
            os.replace(tmp, self.prefix / "bin" / "minio")
        self.say("laying out the new version (appliance install) ...")
        self._run([str(self.prefix / "bin" / "appliance"), "install", "--root", str(self.layout.root),
                   "--profile", str(staging / "profile.yaml")], "appliance install")

    def _health_check(self) -> float:
        """Seconds until the new version's /readyz said every model is ready."""
        start = time.monotonic()
        if self.systemd:
            self._systemctl("start", TARGET)
            url = gateway_url_path(self.data).read_text().strip()
            self._wait_ready(url, None)
            return time.monotonic() - start
        profile = yaml.safe_load((self.etc / "profile.yaml").read_text(encoding="utf-8"))
        for model in profile.get("models", []):
            if model.get("path"):
                model["path"] = str(self.layout.on_disk(Path(model["path"])))
        with tempfile.TemporaryDirectory(prefix="appliance-health.") as tmp:
            path = Path(tmp) / "profile.yaml"
            path.write_text(yaml.safe_dump(profile), encoding="utf-8")
            port = _free_port()
            log = Path(tmp) / "up.log"
            self.say(f"health check: the new version serves the installed data on 127.0.0.1:{port} ...")
            with open(log, "wb") as out:
                up = subprocess.Popen([str(self.prefix / "bin" / "appliance"), "up", "--profile", str(path),
                                       "--home", str(self.data), "--host", "127.0.0.1", "--port", str(port)],
                                      stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
            try:
                self._wait_ready(f"http://127.0.0.1:{port}", up, log)
            finally:
                up.send_signal(signal.SIGTERM)
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.wait()
        return time.monotonic() - start

    def _wait_ready(self, url: str, up: subprocess.Popen | None, log: Path | None = None) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if up is not None and up.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
                raise InstallError(f"the new version exited with {up.returncode} before it was ready; its last lines:\n{tail}")
            try:
                with direct.open(url + "/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"/readyz answered {exc.code}: {exc.read(500).decode(errors='replace')}"
            except OSError as exc:
                last = str(exc)
            time.sleep(1)
        raise InstallError(f"the new version was not ready within {self.health_timeout_s:g} s (--health-timeout); "
                           f"last: {last}")

    def _check_rows(self, saved: Saved) -> str:
        total, lost = snapshots.lost_rows(saved.folder, self.data)
        if lost:
            raise InstallError("rows went missing in the migration: " + "; ".join(lost))
        return f"all {total} rows kept"

    def _roll_back(self, saved: Saved) -> None:
        self.say("rolling back ...")
        self._systemctl("stop", TARGET, check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)
        saved.previous.rename(self.prefix)
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.copytree(saved.folder / "etc", self.etc, symlinks=True)
        for unit in self._unit_files():
            unit.unlink()
        kept = saved.folder / "units"
        for unit in (p for p in kept.rglob("*") if p.is_file()):
            shutil.copy2(unit, self.layout.root / unit.relative_to(kept))
        snapshots.put_back(saved.folder, self.data)
        if self.systemd:
            self._systemctl("daemon-reload")
            self._systemctl("start", TARGET, check=False)

    # --- helpers -----------------------------------------------------------------------

    def _unit_files(self) -> list[Path]:
        """What `appliance install` writes outside /etc/appliance: units, sysusers.d and tmpfiles.d entries."""
        units = self.layout.on_disk(self.layout.units)
        files = sorted(p for p in units.glob("appliance*") if p.is_file()) if units.is_dir() else []
        return files + [p for p in (self.layout.on_disk(SYSUSERS), self.layout.on_disk(TMPFILES)) if p.is_file()]

    def _record(self) -> dict:
        try:
            return json.loads((self.etc / RECORD).read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, record: dict) -> None:
        path = self.etc / RECORD
        path.write_text(json.dumps(record, indent=2) + "\n")
        path.chmod(0o644)

    def _systemctl(self, *args: str, check: bool = True) -> None:
        if self.systemd:
            self._run(["systemctl", *args], f"systemctl {' '.join(args)}", check=check)

    def _run(self, argv: list[str], what: str, *, check: bool = True, env: dict | None = None) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if check and done.returncode:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise InstallError(f"{what} failed (exit {done.returncode}):\n{tail}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@click.command("upgrade")
@root_option
@click.option("--bundle", "bundle", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The new version's bundle (appliance bundle build).")
@click.option("--manifests", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Upgrade a k3s cluster instead: the folder `appliance render k3s` wrote and kubectl applied.")
@click.option("--kubectl", "kubectl", default="kubectl", show_default=True,
              help="With --manifests: the kubectl command (on a k3s server, 'k3s kubectl').")
@click.option("--health-timeout", "health_timeout_s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds the new version has to become ready before the upgrade is rolled back.")
def upgrade_command(root: str, bundle: Path, manifests: Path | None, kubectl: str, health_timeout_s: float) -> None:
    """Upgrade this install, or a k3s cluster, to a bundle's version, rolling back if it
    fails its health check.

    Verifies the bundle, backs up the state databases, configuration and units, installs
    the bundle's wheels and lays out its profile (migrating the databases), then checks
    the new version serves. Any failure restores the previous version and data. A bundle
    already installed changes nothing. install.sh --bundle FILE --upgrade runs this.

    With --manifests DIR, the cluster those manifests run: the bundle's profile is rendered
    into DIR.next (keeping DIR's Secrets), the control pod snapshots its databases, DIR.next
    is applied and must become ready with every row kept; otherwise the snapshot is put
    back and DIR applied again. Import the bundle's image on every node first.
    """
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if manifests is not None:
        from installer.upgrade_cluster import CONTROL, ClusterUpgrade, Kubectl, load_folder

        if root != "/":
            raise click.UsageError("--root is for a bare-metal install; --manifests upgrades a cluster")
        namespace = next((d["metadata"].get("namespace") for d in load_folder(manifests)
                          if d["kind"] == "Deployment" and d["metadata"]["name"] == "control"), None)
        if namespace is None:
            raise click.BadParameter(f"no control Deployment in {manifests}/{CONTROL}: is this a folder "
                                     "`appliance render k3s` wrote?", param_hint="--manifests")
        upgrade = ClusterUpgrade(Kubectl(kubectl, namespace), say, health_timeout_s)
        click.echo(upgrade.run(bundle, manifests))
        return
    upgrade = Upgrade(Layout(root=Path(root).absolute()), say, health_timeout_s)
    click.echo(upgrade.run(bundle))
