"""The restore drill: write through the API, kill -9 every process, delete the home,
restore it from the object store with `appliance restore`, and find every row that was
committed at least one second before the kill; then run the restored home."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import DEFAULT_MODEL, appliance, s3_env, start_stack, write_profile

pytestmark = pytest.mark.stack


def committed(db_path) -> tuple[set[str], set[str]]:
    """Request ids of the usage rows and of the audit rows in the database right now."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        usage = {r[0] for r in db.execute("SELECT request_id FROM usage")}
        audit = {r[0] for r in db.execute("SELECT request_id FROM audit_log")}
    return usage, audit


def test_kill_everything_delete_the_home_restore_and_lose_nothing_older_than_a_second(tmp_path, object_store_settings):
    profile = write_profile(tmp_path / "profile.yaml", None, storage=object_store_settings)
    stack = start_stack(tmp_path, profile, env=s3_env(object_store_settings))
    db_path = stack.home / "state.db"
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    stop = threading.Event()

    def write_through_the_api():
        with httpx.Client(base_url=stack.root, headers=headers, timeout=10) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    # Metered (a usage row, written in the gateway's next batch) ...
                    client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": []})
                    # ... and audited (written before the answer).
                    client.patch(f"/admin/models/drill-{n}/versions/1/card", json={"description": "x"})
                except httpx.HTTPError:
                    return  # the gateway was killed

    writer = threading.Thread(target=write_through_the_api)
    writer.start()
    snapshots = []  # (when, rows committed then)
    started = time.monotonic()
    while time.monotonic() - started < 5:
        snapshots.append((time.monotonic(), committed(db_path)))
        time.sleep(0.1)

    victims = [psutil.Process(stack.proc.pid), *stack.descendants()]
    assert any("litestream" in " ".join(p.cmdline()) for p in victims)
    killed_at = time.monotonic()
    for process in victims:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    stop.set()
    writer.join(10)
    shutil.rmtree(stack.home)

    _, (usage_then, audit_then) = [s for s in snapshots if s[0] <= killed_at - 1.0][-1]
    assert len(usage_then) > 20 and len(audit_then) > 20, "the writer wrote through the API before the deadline"

    restored_home = tmp_path / "restored"
    bucket = object_store_settings.bucket_prefix + "backups"
    result = appliance("restore", "--from", f"s3://{bucket}/litestream?endpoint={object_store_settings.endpoint}",
                       "--home", str(restored_home), "--json", env=s3_env(object_store_settings))
    restored = json.loads(result.stdout)["restored"]
    assert sorted(Path(r["path"]).name for r in restored) == ["jobs.db", "state.db"]  # the job queue's too
    usage_now, audit_now = committed(restored_home / "state.db")
    assert usage_then <= usage_now, f"{len(usage_then - usage_now)} usage rows lost"
    assert audit_then <= audit_now, f"{len(audit_then - audit_now)} audit rows lost"

    # The restored home runs: the old admin key (kept by the operator, not in the backup) still works.
    (restored_home / "admin.key").write_text(stack.admin_key + "\n")
    (tmp_path / "again").mkdir()
    shutil.copy(profile, tmp_path / "again" / "profile.yaml")
    shutil.move(restored_home, tmp_path / "again" / "home")
    again = start_stack(tmp_path / "again", tmp_path / "again" / "profile.yaml", env=s3_env(object_store_settings))
    try:
        models = httpx.get(f"{again.root}/v1/models", headers=headers, timeout=10)
        assert models.status_code == 200 and DEFAULT_MODEL in [m["id"] for m in models.json()["data"]]
        usage = appliance("usage", "--since", "all", "--json", home=again.home)
        assert sum(row["requests"] for row in json.loads(usage.stdout)) >= len(usage_then)
    finally:
        again.stop()
