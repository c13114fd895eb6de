"""`appliance backup status` and `appliance restore`: how far the replica of the state is, and
rebuilding a home from it (on a new machine, or after losing the old one). `appliance backup
snapshot|restore-snapshot|check-rows`: a copy of the databases at one moment, as upgrades take
and put back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import msgspec

from appliance.cli_format import when
from appliance.cli_options import home_option, json_option
from appliance.errors import BackupError
from appliance.home import DATABASES, JOBS_DB, litestream_config_path, resolve_home
from appliance.snapshots import lost_rows, put_back, row_counts, take
from services.storage.litestream import (
    LITESTREAM_ENV, DatabaseStatus, daemon_info, parse_target, restore, status,
)
from services.storage.minio import CREDENTIALS_FILE, read_credentials

ACCESS_KEY_ENV = "APPLIANCE_S3_ACCESS_KEY"
SECRET_KEY_ENV = "APPLIANCE_S3_SECRET_KEY"


def _s3_credentials(home: Path | None, config: Path | None = None) -> tuple[str | None, str | None]:
    """From APPLIANCE_S3_ACCESS_KEY / APPLIANCE_S3_SECRET_KEY, else the home's managed MinIO,
    else the litestream.env beside the config (a bare-metal install's, readable by root)."""
    access_key, secret_key = os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV)
    if (not access_key or not secret_key) and home is not None:
        minio = read_credentials(home / CREDENTIALS_FILE)
        access_key, secret_key = minio.get("MINIO_ROOT_USER"), minio.get("MINIO_ROOT_PASSWORD")
    if (not access_key or not secret_key) and config is not None:
        try:
            installed = read_credentials(config.parent / LITESTREAM_ENV)
        except PermissionError:
            raise BackupError(f"{config.parent / LITESTREAM_ENV} holds the replica's credentials and only root "
                              "may read it: run this with sudo") from None
        access_key, secret_key = installed.get("LITESTREAM_ACCESS_KEY_ID"), installed.get("LITESTREAM_SECRET_ACCESS_KEY")
    return access_key, secret_key


def _describe(s: DatabaseStatus) -> list[str]:
    lines = [f"{s.path}: {s.state}", f"  replica:  {s.replica}"]
    if s.local_txid is not None or s.replica_txid is not None:
        uncaptured = "?" if s.uncaptured_commits is None else s.uncaptured_commits
        lines.append(f"  position: local TXID {s.local_txid or '-'} (+{uncaptured} commits not captured yet), "
                     f"replica TXID {s.replica_txid or '-'} at {when(s.replica_time)}")
    if s.lag_transactions is not None or s.lag_s is not None:
        lag = "?" if s.lag_transactions is None else s.lag_transactions
        seconds = "-" if s.lag_s is None else f"{s.lag_s:.1f} s"
        lines.append(f"  lag:      {lag} transactions, {seconds}")
    if s.detail:
        lines.append(f"  note:     {s.detail}")
    return lines


@click.group("backup")
def backup() -> None:
    """Continuous backup of the state database (Litestream)."""


@backup.command("status")
@home_option()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="litestream's config. Default: the one `appliance up` writes, $APPLIANCE_HOME/run/litestream.yml; "
                   "a bare-metal install's is /etc/appliance/litestream.yml.")
@json_option("Print JSON instead of text.")
def backup_status(home: str | None, config_file: str | None, as_json: bool) -> None:
    """Where each database's replica stands: positions, lag, and whether replication runs.

    Reads litestream's config and the replica itself; S3 credentials come from
    APPLIANCE_S3_ACCESS_KEY and APPLIANCE_S3_SECRET_KEY, else from the home's managed
    MinIO, else from the litestream.env beside the config. Runs on this machine; through
    the admin API, GET /admin/system gives each database's state and lag.
    """
    home_path = resolve_home(home)
    config = Path(config_file) if config_file else litestream_config_path(home_path)
    if not config.is_file():
        hint = "" if config_file else (" (`appliance up` writes it unless the profile's backup.target is none; "
                                       "a bare-metal install's is /etc/appliance/litestream.yml: pass --config)")
        raise BackupError(f"replication is not running or not configured for {home_path}: {config} does not exist{hint}")
    access_key, secret_key = _s3_credentials(home_path, config)
    statuses = status(config, access_key=access_key, secret_key=secret_key)
    daemon = daemon_info(config)
    if as_json:
        click.echo(json.dumps({"home": str(home_path), "replicating": daemon is not None, "daemon": daemon,
                               "databases": msgspec.to_builtins(statuses)}, indent=2))
        return
    running = f"running (pid {daemon['pid']}, up {daemon['uptime_seconds']} s)" if daemon else "not running"
    lines = [f"replication: {running}"]
    for s in statuses:
        lines += ["", *_describe(s)]
    click.echo("\n".join(lines))


def _next_steps(home: Path) -> list[str]:
    return [
        "next steps:",
        "  - the admin key file (admin.key) is not part of the backup. Existing API keys, the admin key",
        "    included, keep working: only their hashes are stored. Without the admin secret, make a new",
        f"    one: appliance keys bootstrap --home {home}",
        f"  - start the appliance on this home: appliance up --home {home}",
        "    With the profile's backup target pointing at the same place, replication carries on from the",
        "    restored position.",
    ]


@click.command("restore")
@click.option("--from", "source", required=True, metavar="TARGET",
              help="file:///folder, a folder path, or s3://bucket[/prefix]?endpoint=http://host:port[&region=...] "
                   f"(credentials from {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}).")
@home_option()
@click.option("--force", is_flag=True, help="Replace databases that already exist in the home (stop the appliance first).")
@json_option("Print JSON instead of text.")
def restore_command(source: str, home: str | None, force: bool, as_json: bool) -> None:
    """Rebuild the state database (and the job queue's) into a home from its backup, e.g. on a new machine.

    The newest position in the backup is restored under a temporary name, checked with
    PRAGMA integrity_check, and only then moved into place. An existing database is refused
    unless --force. Runs on this machine, not through the admin API: it rebuilds a home
    that no gateway serves yet.
    """
    home_path = resolve_home(home)
    access_key, secret_key = _s3_credentials(None)
    if source.strip().startswith("s3://") and not (access_key and secret_key):
        raise BackupError(f"restoring from S3 needs its credentials in {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}")
    target = parse_target(source, access_key=access_key, secret_key=secret_key)
    restored = restore(target, home_path, DATABASES, optional=(JOBS_DB,), force=force)
    rows = {r.path: row_counts(Path(r.path)) for r in restored}
    if as_json:
        report = [{**msgspec.to_builtins(r), "rows": rows[r.path]} for r in restored]
        click.echo(json.dumps({"home": str(home_path), "restored": report}, indent=2))
        return
    lines = []
    for r in restored:
        lines.append(f"restored {r.path} from {r.url} (position: TXID {r.txid}, as of {when(r.time)})")
        lines += [f"  {table}: {count} rows" for table, count in rows[r.path].items()]
    click.echo("\n".join([*lines, "", *_next_steps(home_path)]))


@backup.command("snapshot")
@click.argument("dest", type=click.Path(exists=False, file_okay=False, path_type=Path))
@home_option()
def backup_snapshot(dest: Path, home: str | None) -> None:
    """Copy the home's databases into the new folder DEST, consistently while the appliance runs.

    Uses SQLite's online backup; DEST/rows.json keeps each table's row count, which
    check-rows compares with later. Upgrades take one before they change anything.
    """
    if dest.exists():
        raise BackupError(f"{dest} exists already: a snapshot goes into a new folder")
    rows = take(resolve_home(home), dest)
    click.echo(f"snapshot of {sum(sum(t.values()) for t in rows.values())} rows in {dest}")


@backup.command("restore-snapshot")
@click.argument("snapshot", type=click.Path(exists=True, file_okay=False, path_type=Path))
@home_option()
def backup_restore_snapshot(snapshot: Path, home: str | None) -> None:
    """Replace the home's databases with SNAPSHOT's (from `appliance backup snapshot`).

    Stop the appliance first: nothing may have the databases open. Upgrades that roll back
    run this.
    """
    home_path = resolve_home(home)
    put_back(snapshot, home_path)
    click.echo(f"the databases in {home_path} are the snapshot's ({snapshot})")


@backup.command("check-rows")
@click.argument("snapshot", type=click.Path(exists=True, file_okay=False, path_type=Path))
@home_option()
def backup_check_rows(snapshot: Path, home: str | None) -> None:
    """Fail, naming them, if any table of the home holds fewer rows than in SNAPSHOT.

    An upgrade runs this against the snapshot it took, once the new version has migrated
    the databases.
    """
    total, lost = lost_rows(snapshot, resolve_home(home))
    if lost:
        raise BackupError("rows went missing since the snapshot: " + "; ".join(lost))
    click.echo(f"all {total} rows of the snapshot kept")
