"""The state database: $APPLIANCE_HOME/state.db, SQLite in WAL mode, versioned by migrations.

Each migration is applied once, in order, inside a transaction; PRAGMA user_version
records how many have run.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import StateError

if TYPE_CHECKING:
    import sqlite_utils


# Migration 17's usage rollups, one table per bucket and set of groupings, filled from the
# usage rows already there. Part of that migration: never changed once released.
ALL_GROUPINGS_17 = ("team_id", "user_id", "key_id", "model", "route", "template")
TEAM_GROUPINGS_17 = ("team_id", "model", "route", "template")


def _rollup_17(table: str, groupings: tuple[str, ...], bucket_sql: str) -> tuple[str, str]:
    measures = ("requests INTEGER", "errors INTEGER", "server_errors INTEGER", "prompt_tokens INTEGER",
                "completion_tokens INTEGER", "total_tokens INTEGER", "cost REAL", "cached INTEGER",
                "saved_tokens INTEGER", "latency_ms_sum REAL", "ttft_ms_sum REAL", "ttft_count INTEGER",
                "last_ts REAL")
    columns = ", ".join([f"{g} TEXT NOT NULL" for g in groupings] + [f"{m} NOT NULL" for m in measures])
    create = (f"CREATE TABLE {table} (bucket INTEGER NOT NULL, {columns}, "
              f"PRIMARY KEY (bucket, {', '.join(groupings)})) WITHOUT ROWID")
    keys = ", ".join("model" if g == "model" else "''" if g == "route" else f"coalesce({g}, '')" for g in groupings)
    fill = (f"INSERT INTO {table} SELECT {bucket_sql}, {keys}, count(*), sum(status >= 400), sum(status >= 500), "
            "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(total_tokens), 0), "
            "coalesce(sum(cost), 0), sum(cached), coalesce(sum(saved_tokens), 0), coalesce(sum(latency_ms), 0), "
            f"coalesce(sum(ttft_ms), 0), count(ttft_ms), max(ts) FROM usage GROUP BY "
            f"{', '.join(str(i) for i in range(1, len(groupings) + 2))}")
    return create, fill


# Each entry is one schema version: SQL statements run together in one transaction.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL
        )""",
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            latency_ms REAL,
            ttft_ms REAL
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_model ON usage (key_id, model)",
    ),
    (
        # Who changed what through /admin.
        """CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT,
            key_id TEXT,
            key_name TEXT,
            role TEXT,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            detail TEXT
        )""",
        "CREATE INDEX audit_ts ON audit_log (ts)",
        # Model registry: immutable versions whose files live in the object store.
        """CREATE TABLE registered_models (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            created_by TEXT
        )""",
        """CREATE TABLE model_versions (
            id TEXT PRIMARY KEY,
            model TEXT NOT NULL REFERENCES registered_models (name),
            version INTEGER NOT NULL,
            format TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            files TEXT NOT NULL,
            source TEXT NOT NULL,
            card TEXT NOT NULL,
            card_edits TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            created_by TEXT,
            UNIQUE (model, version)
        )""",
        # A registered version served under a name; the supervisor runs it, the gateway routes to it.
        """CREATE TABLE deployments (
            name TEXT PRIMARY KEY,
            version_id TEXT NOT NULL REFERENCES model_versions (id),
            engine TEXT NOT NULL,
            replicas INTEGER NOT NULL,
            context_length INTEGER NOT NULL,
            state TEXT NOT NULL,
            endpoints TEXT NOT NULL DEFAULT '[]',
            message TEXT,
            created_at REAL NOT NULL,
            created_by TEXT,
            updated_at REAL NOT NULL
        )""",
        # Dataset registry: versions of CSV, JSONL or Parquet files in the object store.
        """CREATE TABLE registered_datasets (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            created_by TEXT
        )""",
        """CREATE TABLE dataset_versions (
            id TEXT PRIMARY KEY,
            dataset TEXT NOT NULL REFERENCES registered_datasets (name),
            version INTEGER NOT NULL,
            format TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            schema TEXT NOT NULL,
            quality TEXT NOT NULL,
            pii TEXT,
            source TEXT NOT NULL,
            parent_id TEXT REFERENCES dataset_versions (id),
            derivation TEXT,
            created_at REAL NOT NULL,
            created_by TEXT,
            UNIQUE (dataset, version)
        )""",
        """CREATE TABLE dataset_splits (
            id TEXT PRIMARY KEY,
            version_id TEXT NOT NULL REFERENCES dataset_versions (id),
            seed INTEGER NOT NULL,
            ratios TEXT NOT NULL,
            parts TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT,
            UNIQUE (version_id, seed, ratios)
        )""",
    ),
    (
        # Background jobs run by the worker; the queue itself is Huey's, in jobs.db.
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            state TEXT NOT NULL,
            message TEXT,
            result TEXT,
            created_at REAL NOT NULL,
            created_by TEXT,
            created_by_name TEXT,
            created_by_role TEXT,
            started_at REAL,
            finished_at REAL
        )""",
        "CREATE INDEX jobs_state ON jobs (state, created_at)",
    ),
    (
        # A usage row is written once per request id, so a replayed journal (appliance/usage.py)
        # inserts nothing twice. Request ids are unique by construction (services/gateway/request_ids.py).
        "CREATE UNIQUE INDEX usage_request_id ON usage (request_id)",
    ),
    (
        # Governance (appliance/governance.py): users, teams, keys owned by either, the limits
        # and policies of keys and teams (JSON of governance.Limits and governance.Policy).
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            email TEXT,
            password_hash TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            disabled_at REAL
        )""",
        """CREATE TABLE teams (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            limits TEXT NOT NULL DEFAULT '{}',
            policy TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE team_members (
            team_id TEXT NOT NULL REFERENCES teams (id),
            user_id TEXT NOT NULL REFERENCES users (id),
            PRIMARY KEY (team_id, user_id)
        )""",
        "ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'key'",  # key, or session (a password login)
        "ALTER TABLE api_keys ADD COLUMN user_id TEXT REFERENCES users (id)",
        "ALTER TABLE api_keys ADD COLUMN team_id TEXT REFERENCES teams (id)",
        "ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE api_keys ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE api_keys ADD COLUMN updated_at REAL",
        "ALTER TABLE usage ADD COLUMN user_id TEXT",
        "ALTER TABLE usage ADD COLUMN team_id TEXT",
        "ALTER TABLE usage ADD COLUMN cost REAL",
        "CREATE INDEX usage_team ON usage (team_id, ts)",
        # The audit log becomes a hash chain (appliance/audit.py): each row's hash covers its
        # content and the previous row's hash.
        "ALTER TABLE audit_log ADD COLUMN prev_hash TEXT",
        "ALTER TABLE audit_log ADD COLUMN hash TEXT",
    ),
    (
        # The audit row's actor gains its user and team (appliance/audit.py Actor).
        "ALTER TABLE audit_log ADD COLUMN user_id TEXT",
        "ALTER TABLE audit_log ADD COLUMN team_id TEXT",
        # Where the audit chain starts (one row): retention deleted the rows through
        # `through_id`, and the oldest kept row links to `hash` (appliance.audit.GENESIS at
        # first); rows through `unsealed_through`, written before the chain, are sealed into
        # it by the next audit write.
        """CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            through_id INTEGER NOT NULL,
            hash TEXT NOT NULL,
            unsealed_through INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "INSERT INTO audit_anchor SELECT 1, 0, '" + "0" * 64 + "', coalesce(max(id), 0),"
        " (julianday('now') - 2440587.5) * 86400 FROM audit_log",
    ),
    (
        # Routes set through /admin/routes (appliance/routes.py): they add to the profile's
        # routes, or replace one of the same name. `spec` is the JSON of config.RouteSpec.
        """CREATE TABLE routes (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT,
            updated_at REAL NOT NULL,
            updated_by TEXT
        )""",
    ),
    (
        # Answers from the response cache (services/gateway/cache.py): no tokens processed or
        # billed; saved_tokens holds what the cached answer had cost.
        "ALTER TABLE usage ADD COLUMN cached INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN saved_tokens INTEGER",
    ),
    (
        # A route's shadow traffic (services/gateway/shadow.py): each mirrored request's two answers.
        """CREATE TABLE shadow_results (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            route TEXT NOT NULL,
            request_id TEXT NOT NULL,
            primary_model TEXT NOT NULL,
            shadow_model TEXT NOT NULL,
            primary_ms REAL NOT NULL,
            shadow_ms REAL NOT NULL,
            primary_tokens INTEGER,
            shadow_tokens INTEGER,
            status INTEGER NOT NULL,
            error TEXT,
            similarity REAL
        )""",
        "CREATE INDEX shadow_route_ts ON shadow_results (route, ts)",
    ),
    (
        # A job's log (appliance/jobs.py): its lines, numbered 1, 2, 3... per job in the order written.
        """CREATE TABLE job_logs (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            text TEXT NOT NULL,
            PRIMARY KEY (job_id, seq)
        )""",
    ),
    (
        # Fine-tuning (appliance/finetune.py, services/worker/training.py) and experiment
        # tracking (appliance/experiments.py). A job's metrics, one row per training step:
        # {"loss", "learning_rate", "tokens_per_s", "step_time_s", "epoch", ...} as JSON.
        """CREATE TABLE job_metrics (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            step INTEGER NOT NULL,
            at REAL NOT NULL,
            metrics TEXT NOT NULL,
            PRIMARY KEY (job_id, step)
        )""",
        # A running job asked to stop (`jobs cancel`): the work sees it and stops.
        "ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL",
        """CREATE TABLE experiments (
            name TEXT PRIMARY KEY,
            description TEXT,
            created_at REAL NOT NULL,
            created_by TEXT
        )""",
        # A run is a job within an experiment: what it was given (params, resolved), where it
        # ran (environment), what it made (artifacts, the model version) and how it ended.
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY REFERENCES jobs (id),
            experiment TEXT NOT NULL REFERENCES experiments (name),
            params TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '[]',
            environment TEXT,
            final_metrics TEXT,
            artifacts TEXT NOT NULL DEFAULT '[]',
            base_version_id TEXT REFERENCES model_versions (id),
            dataset_version_id TEXT REFERENCES dataset_versions (id),
            model_version_id TEXT REFERENCES model_versions (id),
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX runs_experiment ON runs (experiment, created_at)",
        # A version made by a fine-tuning run: a LoRA adapter (format 'gguf-lora') served on
        # its base version (base_id), and where it came from (lineage, JSON).
        "ALTER TABLE model_versions ADD COLUMN base_id TEXT REFERENCES model_versions (id)",
        "ALTER TABLE model_versions ADD COLUMN lineage TEXT",
    ),
    (
        # A fine-tuning job's checkpoints (services/worker/training.py): each an archive in the
        # object store's checkpoints bucket; the job resumes from its last.
        """CREATE TABLE job_checkpoints (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            step INTEGER NOT NULL,
            at REAL NOT NULL,
            key TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (job_id, step)
        )""",
    ),
    (
        # An evaluation job's samples (appliance/evaluation.py): what was asked, expected and
        # answered, each metric's score, and the judge's own words where one judged.
        """CREATE TABLE eval_samples (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            idx INTEGER NOT NULL,
            row INTEGER NOT NULL,
            input TEXT NOT NULL,
            reference TEXT NOT NULL,
            answer TEXT,
            scores TEXT NOT NULL DEFAULT '{}',
            judge_output TEXT,
            error TEXT,
            latency_s REAL,
            PRIMARY KEY (job_id, idx)
        )""",
    ),
    (
        # Quality gates (appliance/gates.py): a rule per model, and each version's verdict.
        """CREATE TABLE model_gates (
            model TEXT PRIMARY KEY REFERENCES registered_models (name),
            rule TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT,
            updated_at REAL NOT NULL
        )""",
        "ALTER TABLE model_versions ADD COLUMN gate TEXT",
    ),
    (
        # Prompt templates (appliance/prompts.py): versions never change; `ab` splits requests
        # between them. A request's template version goes into its usage row.
        """CREATE TABLE prompt_templates (
            name TEXT PRIMARY KEY,
            ab TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            created_by TEXT,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE prompt_template_versions (
            name TEXT NOT NULL REFERENCES prompt_templates (name),
            version INTEGER NOT NULL,
            system TEXT,
            user TEXT,
            variables TEXT NOT NULL DEFAULT '[]',
            description TEXT,
            created_at REAL NOT NULL,
            created_by TEXT,
            PRIMARY KEY (name, version)
        )""",
        "ALTER TABLE usage ADD COLUMN template TEXT",
    ),
    (
        # Tools the gateway runs for a model (appliance/tools.py): a sandboxed command or an MCP server's.
        """CREATE TABLE tools (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT,
            updated_at REAL NOT NULL
        )""",
    ),
    (
        # Observability. Usage analytics (appliance/analytics.py): the route a request named, and
        # rollups per hour, day and month (UTC), and by team alone per hour and day, that the usage
        # writer keeps up to date in the transaction that adds the rows; the key's columns are ''
        # rather than NULL so that an upsert finds its row.
        "ALTER TABLE usage ADD COLUMN route TEXT",
        # Requests and answers of the teams that log them (services/gateway/request_logs.py),
        # masked by the caller's PII policy.
        """CREATE TABLE request_logs (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL UNIQUE,
            key_id TEXT,
            user_id TEXT,
            team_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            status INTEGER NOT NULL,
            latency_ms REAL,
            request TEXT NOT NULL,
            response TEXT
        )""",
        "CREATE INDEX request_logs_ts ON request_logs (ts)",
        "CREATE INDEX job_logs_at ON job_logs (at)",
        # Alerts (appliance/alerts.py): rules and channels stored through the admin API, and every
        # alert raised, with where it was sent.
        "CREATE TABLE alert_rules (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL)",
        "CREATE TABLE alert_channels (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL NOT NULL)",
        """CREATE TABLE alerts (
            id INTEGER PRIMARY KEY,
            rule TEXT NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            labels TEXT NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL,
            value REAL,
            threshold REAL,
            summary TEXT NOT NULL,
            started_at REAL NOT NULL,
            fired_at REAL,
            resolved_at REAL,
            updated_at REAL NOT NULL,
            notified_at REAL,
            deliveries TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX alerts_open ON alerts (rule, subject) WHERE state != 'resolved'",
        "CREATE INDEX alerts_started ON alerts (started_at)",
        *_rollup_17("usage_hourly", ALL_GROUPINGS_17, "CAST(ts / 3600 AS INTEGER) * 3600"),
        *_rollup_17("usage_daily", ALL_GROUPINGS_17, "CAST(ts / 86400 AS INTEGER) * 86400"),
        *_rollup_17("usage_monthly", ALL_GROUPINGS_17,
                    "CAST(strftime('%s', ts, 'unixepoch', 'start of month') AS INTEGER)"),
        *_rollup_17("usage_hourly_teams", TEAM_GROUPINGS_17, "CAST(ts / 3600 AS INTEGER) * 3600"),
        *_rollup_17("usage_daily_teams", TEAM_GROUPINGS_17, "CAST(ts / 86400 AS INTEGER) * 86400"),
    ),
]


def open_db(path: Path, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (creating if needed) the state database and bring its schema up to date."""
    import sqlite_utils  # here, not at import: it loads numpy, which only commands that open a database need

    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA busy_timeout = 10000")
    db.enable_wal()
    conn.execute("PRAGMA synchronous = NORMAL")
    if migrate:
        apply_migrations(db)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def apply_migrations(db: sqlite_utils.Database) -> int:
    """Run pending migrations; returns the resulting schema version."""
    current = schema_version(db)
    if current > len(MIGRATIONS):
        raise StateError(
            f"state database schema version {current} is newer than this appliance knows "
            f"({len(MIGRATIONS)}); upgrade the appliance"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) >= version:  # another process migrated meanwhile
                db.execute("COMMIT")
                continue
            for statement in MIGRATIONS[version - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return schema_version(db)


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (connections are in autocommit mode)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
