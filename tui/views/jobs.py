"""Background jobs (imports the worker runs): the list, refreshed as they move, a job's log
followed live, cancelling a queued job, and submitting an import."""

from __future__ import annotations

import time

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.widgets import Log

from appliance.admin_client import AdminApiError
from appliance.jobs import FINISHED, KINDS, STATES
from tui import format as fmt
from tui.modals import Field, FormScreen
from tui.views.datasets import FORMATS
from tui.view import TableView, View
from tui.widgets import Column

STATE_STYLES = {"queued": "yellow", "running": "bold cyan", "succeeded": "green", "failed": "bold red",
                "cancelled": "dim"}
LOG_POLL_S = 1.0
LOG_PAGE = 1000  # lines asked for at once


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def duration(job: dict) -> str:
    """How long it ran (so far, while running)."""
    return "-" if job["started_at"] is None else fmt.age(job["started_at"], now=job["finished_at"] or time.time())


def outcome(job: dict) -> str:
    """Why it failed or was cancelled, else what it made (name, version, rows…)."""
    if job["message"]:
        return job["message"]
    return ", ".join(f"{k}={v}" for k, v in (job["result"] or {}).items() if k != "sha256")


def describe(job: dict) -> str:
    what = " ".join(filter(None, (job["kind"], job["params"].get("name"))))
    return f"job {job['id']} ({what})"


async def cancel(view: View, job: dict) -> bool:
    """Cancel `job` after a confirmation; a job that runs or has finished is refused by the API."""
    if job["state"] in FINISHED:
        view.notify(f"{describe(job)} has finished ({job['state']}): nothing to cancel.", severity="warning")
        return False
    if not await view.confirm(f"Cancel {describe(job)}? A queued job is skipped by the worker; "
                              "one that already runs cannot be cancelled."):
        return False
    return await view.attempt(view.api.post(f"/admin/jobs/{job['id']}/cancel"),
                              done=f"Cancelled {describe(job)}.") is not None


class JobsView(TableView):
    """Jobs, newest first, refreshed every REFRESH_S; enter follows a job's log, c cancels a
    queued one, n submits an import. `:jobs STATE` lists the jobs in that state only, `:jobs
    JOB_ID` opens that job's log."""

    TITLE = "jobs"
    REFRESH_S = 2.0
    COLUMNS = (
        Column("id", "ID"), Column("kind", "KIND"), Column("name", "NAME", lambda r: fmt.text(r["params"].get("name"))),
        Column("state", "STATE", lambda r: state_text(r["state"])),
        Column("by", "BY", lambda r: r["created_by"]["key_name"]),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
        Column("duration", "DURATION", duration), Column("message", "MESSAGE", outcome),
    )
    BINDINGS = [
        Binding("n", "submit", "New import"),
        Binding("c", "cancel", "Cancel job"),
        Binding("ctrl+d", "cancel", "Cancel job", show=False),
    ]

    def __init__(self, argument: str = "") -> None:
        super().__init__()
        self.state = argument if argument in STATES else None
        self.job_id = argument if argument and argument not in STATES else None

    def heading(self) -> str:
        return f"jobs ({self.state})" if self.state else "jobs"

    def on_mount(self) -> None:  # after View's (Textual calls each class's handler)
        if self.job_id:
            self.app.push_screen(JobLogScreen(self.job_id))

    async def fetch(self) -> list[dict]:
        return await self.api.get("/admin/jobs", state=self.state)

    async def open(self, row: dict) -> None:
        await self.app.push_screen(JobLogScreen(row["id"]))

    @work(group="action")
    async def action_cancel(self) -> None:
        row = self.selected
        if row is not None and await cancel(self, row):
            self.reload()

    @work(group="action")
    async def action_submit(self) -> None:
        async def submit(values: dict[str, str]) -> dict:
            if not values["kind"]:
                raise ValueError("kind: model.import or dataset.import")
            if values["format"] and values["kind"] != "dataset.import":
                raise ValueError("format: only a dataset import has one")
            params = {k: values[k] for k in ("name", "path", "format", "sha256") if values[k]}
            return await self.api.post("/admin/jobs", {"kind": values["kind"], "params": params})

        fields = [Field("kind", "Kind", "dataset.import", choices=tuple(KINDS)), Field("name", "Name in the registry"),
                  Field("path", "Path on the worker's machine (absolute: a GGUF file or HF folder, a CSV, JSONL "
                                "or Parquet file)"),
                  Field("format", "Dataset format (empty: from the file's extension, else its content)",
                        choices=FORMATS),
                  Field("sha256", "Expected SHA-256 (optional: a mismatch registers nothing)")]
        job = await self.app.push_screen_wait(FormScreen("Submit an import job", fields, submit))
        if job is not None:
            self.notify(f"Queued {describe(job)}.")
            self.reload()
            await self.app.push_screen(JobLogScreen(job["id"]))


class JobLogScreen(View):
    """One job's log, followed: new lines about once a second until the job has finished."""

    TITLE = "job log"
    AUTO_FOCUS = "#log"
    BINDINGS = [
        Binding("c", "cancel", "Cancel job"),
        Binding("ctrl+d", "cancel", "Cancel job", show=False),
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.job: dict | None = None
        self.next = 0  # the last line shown

    def body(self):
        yield Log(id="log", highlight=False)

    def heading(self) -> str:
        return f"job {self.job_id}"

    def on_mount(self) -> None:  # after View's (Textual calls each class's handler)
        self.poller = self.set_interval(LOG_POLL_S, self.reload)

    def focus_main(self) -> None:
        self.query_one(Log).focus()

    async def load(self) -> None:
        log = self.query_one(Log)
        while True:
            try:
                page = await self.api.get(f"/admin/jobs/{self.job_id}/log", after=self.next, limit=LOG_PAGE)
            except AdminApiError as exc:
                if exc.status == 404:  # no such job: asking again will not help
                    self.poller.stop()
                raise
            self.job = page["job"]
            log.write_lines(f"{fmt.when(line['at'])}  {line['text']}" for line in page["lines"])
            self.next = page["next"]
            if len(page["lines"]) < LOG_PAGE:
                break
        job = self.job
        self.set_heading(Text.assemble(f"{describe(job)}: ", state_text(job["state"]), f"  {duration(job)}"))
        if job["state"] in FINISHED:  # every line is in: the API reads the job before its lines
            self.poller.stop()

    @work(group="action")
    async def action_cancel(self) -> None:
        if self.job is not None and await cancel(self, self.job):
            self.reload()
