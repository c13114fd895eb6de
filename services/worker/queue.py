"""The job queue: Huey on its own SQLite file, $APPLIANCE_HOME/jobs.db (Litestream replicates it).

The gateway enqueues a job's id; the worker's consumer runs it. Job state lives in the
state database (appliance/jobs.py), so the queue holds nothing but ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from huey import SqliteHuey

from appliance.home import jobs_db_path


class JobQueue:
    """One task, `run_job(job_id)`. `execute` runs it; only the worker gives one."""

    def __init__(self, home: Path, execute: Callable[[str], None] | None = None):
        self.huey = SqliteHuey("appliance", filename=str(jobs_db_path(home)), results=False, timeout=10)
        self._execute = execute
        self.run_job = self.huey.task(name="run_job")(self._run)

    def _run(self, job_id: str) -> None:
        if self._execute is None:
            raise RuntimeError("this job queue only enqueues; the worker runs the jobs")
        self._execute(job_id)

    def enqueue(self, job_id: str) -> None:
        self.run_job(job_id)

    def enqueue_later(self, job_id: str, delay_s: float) -> None:
        self.run_job.schedule(args=(job_id,), delay=delay_s)

    def pending(self) -> int:
        return self.huey.pending_count()
