"""Litestream replication, status and restore: real `litestream` processes, real SQLite files, and a
real S3 server (moto) on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from appliance.home import litestream_config_path
from appliance.cli import cli  # as users run it (a group invoked alone caches a different --help)
from appliance.db import open_db
from appliance.errors import BackupError
from appliance.objectstore import S3Settings
from services.storage.litestream import (
    BackupTarget, health_url, litestream_env, parse_target, render_config, replicate_argv, restore,
    status,
)
from tests.conftest import free_port

SYNC_INTERVAL_S = 1.0  # the profile's default
IN_SYNC_WITHIN_S = 10.0


def add_usage(db, n: int, tag: str) -> None:
    """n rows, one transaction each, as the gateway's metering writes them."""
    for i in range(n):
        db["usage"].insert({"ts": time.time(), "request_id": f"{tag}-{i}", "model": "m", "endpoint": "/v1/chat/completions",
                            "stream": 0, "status": 200, "total_tokens": i})


def usage_rows(db_path: Path) -> list[tuple]:
    db = open_db(db_path, migrate=False)
    try:
        return [tuple(row) for row in db.execute("SELECT * FROM usage ORDER BY id").fetchall()]
    finally:
        db.conn.close()


@contextlib.contextmanager
def replicating(home: Path, target: BackupTarget, base_env: dict[str, str] | None = None):
    """`litestream replicate` on the home's state database, as `appliance up` runs it; stopped with SIGTERM."""
    config = litestream_config_path(home)
    config.parent.mkdir(parents=True, exist_ok=True)
    metrics = f"127.0.0.1:{free_port()}"
    config.write_text(render_config([home / "state.db"], target, sync_interval_s=SYNC_INTERVAL_S,
                                    metrics_addr=metrics, socket_path=config.parent / "litestream.sock"))
    log = home / "litestream.log"
    proc = subprocess.Popen(replicate_argv(config), env=litestream_env(target, base_env or os.environ),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"litestream exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"litestream not ready:\n{log.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(health_url(metrics), timeout=1) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.05)
        yield config
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            assert proc.wait(15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not [p for p in children if p.is_running()]


def wait_for_state(config: Path, state: str, **credentials):
    """The state database's status once it reaches `state`, and how long that took."""
    start = time.monotonic()
    while True:
        current = status(config, **credentials)[0]
        if current.state == state:
            return current, time.monotonic() - start
        assert time.monotonic() - start < IN_SYNC_WITHIN_S, f"still {current} after {IN_SYNC_WITHIN_S} s"
        time.sleep(0.1)


# --- targets and config ----------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, where", [
    ("file:///srv/backups", "file", "/srv/backups"),
    ("file:///srv/my%20backups", "file", "/srv/my backups"),
    ("/srv/backups/", "file", "/srv/backups"),
    ("s3://bk/litestream?endpoint=http://10.0.0.5:9000", "s3", ("bk", "litestream", "http://10.0.0.5:9000", "us-east-1")),
    ("s3://bk?endpoint=https://s3.example.com&region=eu-west-1", "s3", ("bk", "", "https://s3.example.com", "eu-west-1")),
])
def test_parse_target_accepts(text, kind, where):
    target = parse_target(text, access_key="ak", secret_key="sk")
    assert target.kind == kind
    if kind == "file":
        assert target.path == where
    else:
        assert (target.bucket, target.prefix, target.store.endpoint, target.store.region) == where
        assert (target.store.access_key, target.store.secret_key) == ("ak", "sk")


def test_parse_target_plain_relative_folder_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_target("backups", access_key=None, secret_key=None).path == str(tmp_path / "backups")


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("ftp://host/backups", "scheme 'ftp' is not supported"),
    ("file://otherhost/backups", "file:///absolute/folder"),
    ("s3://?endpoint=http://h:1", "no bucket"),
    ("s3://bk/litestream", "needs ?endpoint=http(s)://host:port"),
    ("s3://bk?endpoint=ftp://h:1", "needs ?endpoint=http(s)://host:port"),
    ("s3://bk?endpoint=http://h:1&storage-class=GLACIER", "unknown parameter storage-class"),
])
def test_parse_target_rejects(text, says):
    with pytest.raises(BackupError) as info:
        parse_target(text, access_key="ak", secret_key="sk")
    assert says in info.value.message


def test_parse_target_s3_needs_credentials():
    with pytest.raises(BackupError, match="access key and a secret key"):
        parse_target("s3://bk?endpoint=http://h:1", access_key=None, secret_key="sk")


def test_render_config_replicates_each_database_under_the_prefix(tmp_path):
    store = S3Settings(endpoint="http://127.0.0.1:9000", access_key="AK-SECRET-ID", secret_key="SK-SECRET",
                       bucket_prefix="acme-")
    target = BackupTarget(kind="s3", store=store)
    text = render_config([tmp_path / "state.db", tmp_path / "jobs.db"], target, sync_interval_s=0.25,
                         metrics_addr="127.0.0.1:9091", socket_path=tmp_path / "ls.sock")
    assert "SECRET" not in text
    config = yaml.safe_load(text)
    assert config["addr"] == "127.0.0.1:9091"
    assert config["socket"] == {"enabled": True, "path": str(tmp_path / "ls.sock")}
    assert [db["path"] for db in config["dbs"]] == [str(tmp_path / "state.db"), str(tmp_path / "jobs.db")]
    assert [db["monitor-interval"] for db in config["dbs"]] == ["125ms", "125ms"]  # twice per sync interval
    replicas = [db["replica"] for db in config["dbs"]]
    assert [(r["bucket"], r["path"], r["sync-interval"]) for r in replicas] == [
        ("acme-backups", "litestream/state.db", "250ms"), ("acme-backups", "litestream/jobs.db", "250ms")]
    assert target.url("state.db") == ("s3://acme-backups/litestream/state.db?endpoint=http://127.0.0.1:9000"
                                      "&region=us-east-1&force-path-style=true")
    with pytest.raises(BackupError, match="share a file name"):
        render_config([tmp_path / "a" / "state.db", tmp_path / "b" / "state.db"], target)
    with pytest.raises(BackupError, match="longer than 107 bytes"):
        render_config([tmp_path / "state.db"], target, socket_path=tmp_path / ("s" * 120))


def test_litestream_env_drops_aws_variables_and_passes_credentials():
    base = {"PATH": "/bin", "AWS_CA_BUNDLE": "/etc/ca.pem", "AWS_ACCESS_KEY_ID": "other", "AWS_PROFILE": "x"}
    store = S3Settings(endpoint="http://127.0.0.1:9000", access_key="ak", secret_key="sk")
    assert litestream_env(BackupTarget(kind="s3", store=store), base) == {
        "PATH": "/bin", "LITESTREAM_ACCESS_KEY_ID": "ak", "LITESTREAM_SECRET_ACCESS_KEY": "sk"}
    assert litestream_env(BackupTarget(kind="file", path="/srv/b"), base) == {"PATH": "/bin"}


# --- replication, status, restore ----------------------------------------------------------------

def test_file_target_replicates_reports_lag_and_restores(tmp_path):
    home, target = tmp_path / "home", BackupTarget(kind="file", path=str(tmp_path / "backups"))
    db = open_db(home / "state.db")
    add_usage(db, 20, "before")
    with replicating(home, target) as config:
        add_usage(db, 10, "during")
        synced, took = wait_for_state(config, "in sync")
        assert synced.local_txid == synced.replica_txid >= 1
        assert (synced.uncaptured_commits, synced.lag_transactions, synced.lag_s) == (0, 0, 0.0)
        assert synced.replica == f"file://{tmp_path}/backups/state.db"
        assert took < 2 * SYNC_INTERVAL_S + 2
        replicated = usage_rows(home / "state.db")

    # replication stopped: what is written now is not in the replica, and status says so
    add_usage(db, 5, "after")
    behind = status(config)[0]
    assert behind.state == "behind"
    assert (behind.uncaptured_commits, behind.lag_transactions) == (5, 5)
    assert behind.local_txid == behind.replica_txid == synced.replica_txid
    assert behind.lag_s >= 0
    db.conn.close()  # the last connection checkpoints the WAL away: the commits can no longer be counted
    closed = status(config)[0]
    assert closed.state == "behind" and closed.uncaptured_commits is None
    assert "checkpointed" in closed.detail

    # jobs.db is optional: an appliance that never replicated one restores without it
    restored = restore(target, tmp_path / "new", ("state.db", "jobs.db"), optional=("jobs.db",))
    assert [(r.path, r.txid) for r in restored] == [(str(tmp_path / "new" / "state.db"), synced.replica_txid)]
    assert len(replicated) == 30
    assert usage_rows(tmp_path / "new" / "state.db") == replicated
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["state.db"]


def test_status_in_sync_after_a_checkpoint_of_captured_changes(tmp_path):
    """A database whose WAL was checkpointed away unchanged is compared with the replica byte for byte."""
    home, target = tmp_path / "home", BackupTarget(kind="file", path=str(tmp_path / "backups"))
    db = open_db(home / "state.db")
    add_usage(db, 3, "x")
    with replicating(home, target) as config:
        wait_for_state(config, "in sync")
    db.conn.close()
    open_db(home / "state.db").conn.close()  # e.g. `appliance keys list` while the appliance is down
    assert not Path(f"{home}/state.db-wal").exists()
    assert status(config)[0].state == "in sync"


def test_s3_target_replicates_and_restores_through_the_cli(tmp_path, object_store_settings):
    home = tmp_path / "home"
    target = BackupTarget(kind="s3", store=object_store_settings)
    ca_bundle = tmp_path / "ca.pem"
    ca_bundle.write_text("")
    env = {**os.environ, "AWS_CA_BUNDLE": str(ca_bundle)}
    db = open_db(home / "state.db")
    add_usage(db, 12, "s3")
    db["api_keys"].insert({"id": "k1", "name": "ci", "role": "developer", "key_hash": "h", "prefix": "sk-",
                           "created_at": time.time()})

    # litestream 0.5 itself refuses a custom endpoint while AWS_CA_BUNDLE is set ...
    config = litestream_config_path(home)
    config.parent.mkdir(parents=True)
    config.write_text(render_config([home / "state.db"], target))
    refused = subprocess.run(replicate_argv(config), env={**litestream_env(target, env), "AWS_CA_BUNDLE": str(ca_bundle)},
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "RootCAs" in refused.stderr
    # ... and runs with the environment litestream_env gives it
    credentials = {"access_key": object_store_settings.access_key, "secret_key": object_store_settings.secret_key}
    with replicating(home, target, base_env=env) as config:
        synced, _ = wait_for_state(config, "in sync", **credentials)
        assert synced.replica == target.url("state.db")
        cli_env = {"APPLIANCE_S3_ACCESS_KEY": credentials["access_key"],
                   "APPLIANCE_S3_SECRET_KEY": credentials["secret_key"], "AWS_CA_BUNDLE": str(ca_bundle)}
        shown = CliRunner().invoke(cli, ["backup", "status", "--home", str(home), "--json"], env=cli_env)
        assert shown.exit_code == 0, shown.output
        assert '"replicating": true' in shown.output and '"state": "in sync"' in shown.output
    db.conn.close()

    source = f"s3://{target.bucket}/litestream?endpoint={object_store_settings.endpoint}"
    new_home = tmp_path / "new"
    result = CliRunner().invoke(cli, ["restore", "--from", source, "--home", str(new_home)], env=cli_env)
    assert result.exit_code == 0, result.output
    assert f"position: TXID {synced.replica_txid}" in result.output
    assert "usage: 12 rows" in result.output and "api_keys: 1 rows" in result.output
    assert f"appliance up --home {new_home}" in result.output and "admin.key" in result.output
    assert usage_rows(new_home / "state.db") == usage_rows(home / "state.db")


def test_restore_refuses_an_existing_database_unless_forced(tmp_path):
    """Also: paths with a space and a `$` reach litestream as they are (no URL escaping, no expansion)."""
    home, target = tmp_path / "a home$HOME", BackupTarget(kind="file", path=str(tmp_path / "back ups$HOME"))
    db = open_db(home / "state.db")
    add_usage(db, 4, "a")
    with replicating(home, target) as config:
        wait_for_state(config, "in sync")
    db.conn.close()

    other = open_db(tmp_path / "other" / "state.db")
    add_usage(other, 1, "local")
    before = (tmp_path / "other" / "state.db").read_bytes()
    with pytest.raises(BackupError, match="already exists"):
        restore(target, tmp_path / "other")
    assert (tmp_path / "other" / "state.db").read_bytes() == before
    other.conn.close()

    restore(target, tmp_path / "other", force=True)
    assert usage_rows(tmp_path / "other" / "state.db") == usage_rows(home / "state.db")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["state.db"]


def test_restore_from_a_target_without_a_backup_says_so(tmp_path, object_store_settings):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackupError, match=f"no backup of state.db at file://{tmp_path}/empty/state.db"):
        restore(BackupTarget(kind="file", path=str(tmp_path / "empty")), tmp_path / "home")
    with pytest.raises(BackupError, match="no backup of state.db at s3://.*backups/nothing-here/state.db"):
        restore(BackupTarget(kind="s3", store=object_store_settings, prefix="nothing-here"), tmp_path / "home")
    with pytest.raises(BackupError, match="cannot read the backup at s3://no-such-bucket/.*NoSuchBucket"):
        restore(BackupTarget(kind="s3", store=object_store_settings, bucket="no-such-bucket"), tmp_path / "home")
    assert list((tmp_path / "home").iterdir()) == []  # nothing half-written


def test_status_reports_an_unreachable_replica_quickly(tmp_path):
    home = tmp_path / "home"
    open_db(home / "state.db").conn.close()
    down = S3Settings(endpoint=f"http://127.0.0.1:{free_port()}", access_key="ak", secret_key="sk")
    config = litestream_config_path(home)
    config.parent.mkdir(parents=True)
    config.write_text(render_config([home / "state.db", home / "jobs.db"], BackupTarget(kind="s3", store=down)))
    start = time.monotonic()
    state, jobs = status(config, access_key="ak", secret_key="sk")
    assert time.monotonic() - start < 10
    assert state.state == "replica unreachable" and "cannot connect to" in state.detail
    assert jobs.state == "no database"
    assert "no S3 credentials" in status(config)[0].detail


def test_backup_status_without_replication_says_so(tmp_path):
    result = CliRunner().invoke(cli, ["backup", "status", "--home", str(tmp_path)])
    assert isinstance(result.exception, BackupError)
    assert "replication is not running or not configured" in result.exception.message
    assert str(tmp_path / "run" / "litestream.yml") in result.exception.message
