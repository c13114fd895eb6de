"""Retention: records older than the profile's `retention` says are deleted, a kind at a time.

Per-request usage rows go after retention.usage_days; their hourly, daily and monthly
rollups (appliance/analytics.py) stay, so totals over any period remain, to the hour.
Logged requests and answers go after retention.request_logs_days, and the log lines of
finished jobs after retention.job_logs_days (a running job keeps its whole log). The audit
log has its own rule (audit.retention_days; appliance/audit.py), which keeps its chain
verifiable. Deletes go in chunks of CHUNK rows, each its own short transaction, so a gateway
writing meanwhile waits for one chunk at most.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from appliance import audit
from appliance.config import AuditConfig, RetentionConfig

if TYPE_CHECKING:
    import sqlite_utils

CHUNK = 5000
DAY_S = 86400

# kind -> (table, the rows of it older than a cutoff `?`, whose ids are deleted)
KINDS = {
    "usage": ("usage", "SELECT id FROM usage WHERE ts < ? LIMIT {chunk}"),
    "request_logs": ("request_logs", "SELECT id FROM request_logs WHERE ts < ? LIMIT {chunk}"),
    "job_logs": ("job_logs", "SELECT l.rowid FROM job_logs l JOIN jobs j ON j.id = l.job_id "
                             "WHERE l.at < ? AND j.state NOT IN ('queued', 'running') LIMIT {chunk}"),
}


def _delete_older(db: sqlite_utils.Database, kind: str, cutoff: float) -> int:
    table, select = KINDS[kind]
    column = "rowid" if kind == "job_logs" else "id"
    deleted = 0
    while True:
        count = db.execute(f"DELETE FROM {table} WHERE {column} IN ({select.format(chunk=CHUNK)})", [cutoff]).rowcount
        deleted += count
        if count < CHUNK:
            return deleted


def prune(db: sqlite_utils.Database, retention: RetentionConfig, audit_config: AuditConfig,
          now: float | None = None) -> dict[str, int]:
    """Delete what each kind's retention has expired; how many rows of each went."""
    now = time.time() if now is None else now
    days = {"usage": retention.usage_days, "request_logs": retention.request_logs_days,
            "job_logs": retention.job_logs_days}
    deleted = {kind: _delete_older(db, kind, now - days[kind] * DAY_S) for kind in KINDS}
    deleted["audit"] = audit.prune(db, now - audit_config.retention_days * DAY_S)
    return deleted
