"""Background jobs (imports and fine-tuning the worker runs): the list, refreshed as they move,
a job's log followed live (a fine-tuning job's metrics and loss too), cancelling a queued job or
stopping a running fine-tuning job, and submitting an import or a fine-tuning job."""

from __future__ import annotations

import re
import time

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Log, Sparkline, Static

from appliance.admin_client import AdminApiError
from appliance.jobs import FINISHED, STATES
from tui import format as fmt
from tui.modals import Field, FormScreen
from tui.views.datasets import FORMATS
from tui.views.models import whole
from tui.view import TableView, View
from tui.widgets import Column

STATE_STYLES = {"queued": "yellow", "running": "bold cyan", "succeeded": "green", "failed": "bold red",
                "cancelled": "dim"}
LOG_POLL_S = 1.0
LOG_PAGE = 1000  # lines asked for at once
METRICS_PAGE = 1000  # training steps asked for at once
FINETUNE = "finetune"
EVAL = "eval"
IMPORTS = ("dataset.import", "model.import")
TOTAL_LINE = re.compile(r"^training steps \d+-\d+ of (\d+)")  # the worker's line as training starts
RESUMED_LINE = re.compile(r"^resuming from the checkpoint at step (\d+)")  # the steps after it are trained again


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def duration(job: dict) -> str:
    """How long it ran (so far, while running)."""
    return "-" if job["started_at"] is None else fmt.age(job["started_at"], now=job["finished_at"] or time.time())


def stopping(job: dict) -> bool:
    """A running fine-tuning job asked to stop: it does at its next step."""
    return job["state"] == "running" and bool(job.get("cancel_requested_at"))


def outcome(job: dict) -> str:
    """Why it failed or was cancelled, else what it made (name, version, rows…)."""
    if job["message"]:
        return job["message"]
    if stopping(job):
        return "asked to stop: stopping at its next step"
    return ", ".join(f"{k}={v}" for k, v in (job["result"] or {}).items() if k != "sha256")


def describe(job: dict) -> str:
    what = " ".join(filter(None, (job["kind"], job["params"].get("name"))))
    return f"job {job['id']} ({what})"


async def cancel(view: View, job: dict) -> bool:
    """Cancel a queued `job`, or ask a running fine-tuning job to stop, after a confirmation;
    the API refuses a running job of another kind (it cannot stop midway) and a finished one."""
    if job["state"] in FINISHED:
        view.notify(f"{describe(job)} has finished ({job['state']}): nothing to cancel.", severity="warning")
        return False
    if stopping(job):
        view.notify(f"{describe(job)} was already asked to stop: it stops at its next step.", severity="warning")
        return False
    if job["state"] == "running" and job["kind"] == FINETUNE:
        question = (f"Stop {describe(job)}? It stops at its next step, within seconds, keeps a checkpoint "
                    "and ends as cancelled; it registers no model version.")
        done = f"Asked {describe(job)} to stop: it stops at its next step."
    elif job["state"] == "running":
        question = (f"Cancel {describe(job)}? It already runs: only a queued job, or a running fine-tuning job, "
                    "can be cancelled, so the gateway will likely refuse.")
        done = f"Cancelled {describe(job)}."
    else:
        question = f"Cancel {describe(job)}? The worker skips a queued job."
        done = f"Cancelled {describe(job)}."
    if not await view.confirm(question):
        return False
    return await view.attempt(view.api.post(f"/admin/jobs/{job['id']}/cancel"), done=done) is not None


def finetune_params(values: dict[str, str]) -> dict:
    """The fine-tuning form's fields as the job's params: only those filled in (the API's
    defaults for the rest); ValueError naming a field that is not a number."""
    params: dict = {k: values[k] for k in ("base", "dataset", "name", "experiment") if values[k]}
    for name in ("steps", "batch_size", "sequence_length"):
        if (number := whole(name, values[name], low=1)) is not None:
            params[name] = number
    if (rank := whole("lora.rank", values["lora_rank"], low=1)) is not None:
        params["lora"] = {"rank": rank}
    if values["learning_rate"]:
        try:
            params["learning_rate"] = float(values["learning_rate"])
        except ValueError:
            raise ValueError(f"learning_rate: {values['learning_rate']!r} is not a number (e.g. 2e-4)") from None
    if values["allow_pii"] == "yes":  # "no" is the API's default
        params["allow_pii"] = True
    return params


def finetune_fields(like: dict | None) -> list[Field]:
    """The fine-tuning form; `like` (a fine-tuning job's params) fills in its base, dataset and experiment."""
    like = like or {}
    return [Field("base", "Base model (a registered GGUF model, or one the profile serves; its latest version)",
                  like.get("base", "")),
            Field("dataset", "Dataset (chat 'messages', or instruction and response columns; its latest version)",
                  like.get("dataset", "")),
            Field("name", "Name of the model it registers", placeholder="<base>-ft"),
            Field("steps", "Steps", placeholder="one epoch"),
            Field("learning_rate", "Learning rate", placeholder="2e-4"),
            Field("lora_rank", "LoRA rank", placeholder="8"),
            Field("batch_size", "Batch size (examples per step)", placeholder="2"),
            Field("sequence_length", "Sequence length (tokens per example)", placeholder="512"),
            Field("experiment", "Experiment (the run's; :runs compares them)", like.get("experiment", ""),
                  placeholder="default"),
            Field("allow_pii", "Allow PII (train on a dataset with unmasked PII findings)", "no",
                  choices=("no", "yes"))]


class JobsView(TableView):
    """Jobs, newest first, refreshed every REFRESH_S; enter follows a job's log, c cancels a
    queued one or stops a running fine-tuning job, n submits an import, f starts a fine-tuning
    job, e an evaluation. `:jobs STATE` lists the jobs in that state only, `:jobs JOB_ID` opens that job's log."""

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
        Binding("f", "finetune", "Fine-tune"),
        Binding("e", "evaluate", "Evaluate"),
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

        fields = [Field("kind", "Kind", "dataset.import", choices=IMPORTS), Field("name", "Name in the registry"),
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

    @work(group="action")
    async def action_finetune(self) -> None:
        await self.start(FINETUNE, "Fine-tune a model", finetune_fields(self.like(FINETUNE)), finetune_params,
                         "its log shows the loss step by step")

    @work(group="action")
    async def action_evaluate(self) -> None:
        await self.start(EVAL, "Evaluate a model", eval_fields(self.like(EVAL)), eval_params,
                         ":runs shows its scores and samples once it ends")

    def like(self, kind: str) -> dict | None:
        """The selected job's params, where it is of `kind`: a new one's form starts from them."""
        row = self.selected
        return row["params"] if row is not None and row["kind"] == kind else None

    async def start(self, kind: str, title: str, fields: list[Field], params_of, note: str) -> None:
        """A job of `kind` from a form (the API's refusal keeps it open); its log opens."""
        async def submit(values: dict[str, str]) -> dict:
            return await self.api.post("/admin/jobs", {"kind": kind, "params": params_of(values)})

        job = await self.app.push_screen_wait(FormScreen(title, fields, submit))
        if job is not None:
            self.notify(f"Queued {describe(job)}: {note}.")
            self.reload()
            await self.app.push_screen(JobLogScreen(job["id"]))


def eval_fields(like: dict | None) -> list[Field]:
    """The evaluation form; `like` (an evaluation job's params) fills in what it evaluated and how."""
    like = like or {}
    model = like.get("model", "") + (f":{like['model_version']}" if like.get("model_version") else "")
    dataset = like.get("dataset", "")
    return [Field("model", "Model: a served model, or NAME:VERSION of a registered one", model),
            Field("dataset", "Dataset: NAME or NAME:VERSION (an input column and a reference column)", dataset),
            Field("judge", "Judge: a served model that scores each answer (empty: no judge)",
                  (like.get("judge") or {}).get("model", "")),
            Field("metrics", "Metrics, comma-separated (empty: all; judge with a judge)",
                  placeholder="exact_match,token_f1,bleu,rouge1,rouge2,rougeL"),
            Field("sample", "Rows to evaluate (empty: all; quick mode)", placeholder="all"),
            Field("system", "System prompt for every sample", like.get("system") or ""),
            Field("experiment", "Experiment (the run's; :runs compares them)", like.get("experiment", ""),
                  placeholder="default")]


def eval_params(values: dict[str, str]) -> dict:
    """The evaluation form's fields as the job's params; ValueError naming a field that is wrong."""
    params: dict = {}
    for field, key in (("model", "model_version"), ("dataset", "dataset_version")):
        name, _, version = values[field].partition(":")
        if not name:
            raise ValueError(f"{field}: required")
        params[field] = name
        if version:
            params[key] = whole(field + " version", version, low=1)
    if values["judge"]:
        params["judge"] = {"model": values["judge"]}
    if values["metrics"]:
        params["metrics"] = [m.strip() for m in values["metrics"].split(",") if m.strip()]
    if (sample := whole("sample", values["sample"], low=1)) is not None:
        params["sample"] = sample
    for key in ("system", "experiment"):
        if values[key]:
            params[key] = values[key]
    return params


class TrainingPanel(Horizontal):
    """A fine-tuning job's latest metrics and its loss so far, as a sparkline."""

    DEFAULT_CSS = """
    TrainingPanel { height: 3; display: none; border: round $secondary; padding: 0 1; }
    TrainingPanel #metrics { width: auto; margin-right: 2; }
    TrainingPanel #loss { width: 1fr; height: 1; }
    """

    def compose(self):
        yield Static("waiting for the first step", id="metrics")
        yield Sparkline([], id="loss")

    def show(self, text: str, losses: list[float]) -> None:
        self.display = True
        self.query_one("#metrics", Static).update(text)
        self.query_one("#loss", Sparkline).data = losses


def metrics_line(step: dict | None, total: int | None) -> str:
    """'step 5/12  loss 2.3456  lr 2.00e-04  812 tok/s  0.51 s/step'."""
    if step is None:
        return "waiting for the first step"
    m = step["metrics"]

    def shown(name: str, form: str) -> str:
        return "-" if m.get(name) is None else format(m[name], form)

    return (f"step {step['step']}/{total or '?'}  loss {shown('loss', '.4f')}  lr {shown('learning_rate', '.2e')}  "
            f"{shown('tokens_per_s', '.0f')} tok/s  {shown('step_time_s', '.2f')} s/step")


class JobLogScreen(View):
    """One job's log, followed: new lines about once a second until the job has finished; a
    fine-tuning job's latest metrics (step, loss, learning rate, tokens per second, seconds
    per step) and its loss as a sparkline above it."""

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
        self.steps: dict[int, dict] = {}  # a fine-tuning job's metrics by step
        self.total: int | None = None  # its steps in all, once training has started
        self.metrics_denied = False  # the key may read jobs but not runs (experiments.read)

    def body(self):
        yield TrainingPanel()
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
            self.read_training_lines(page["lines"])
            if len(page["lines"]) < LOG_PAGE:
                break
        job = self.job
        if job["kind"] == FINETUNE:
            await self.load_metrics()
        self.set_heading(Text.assemble(f"{describe(job)}: ", state_text(job["state"]),
                                       " (stopping)" if stopping(job) else "", f"  {duration(job)}"))
        if job["state"] in FINISHED:  # every line is in: the API reads the job before its lines (and metrics)
            self.poller.stop()

    def read_training_lines(self, lines: list[dict]) -> None:
        """What a fine-tuning job's log says of its steps: how many in all, and a resume (the
        steps after its checkpoint are trained, and recorded, again)."""
        for line in lines:
            if found := TOTAL_LINE.match(line["text"]):
                self.total = int(found[1])
            elif found := RESUMED_LINE.match(line["text"]):
                resumed = int(found[1])
                self.steps = {n: s for n, s in self.steps.items() if n <= resumed}

    async def load_metrics(self) -> None:
        """The steps recorded since the last look (GET /admin/runs/{id}/metrics?after=N)."""
        if self.metrics_denied:
            return
        while True:
            after = max(self.steps, default=0)
            try:
                page = await self.api.get(f"/admin/runs/{self.job_id}/metrics", after=after, limit=METRICS_PAGE)
            except AdminApiError as exc:
                if exc.status == 404:  # not a run yet: the worker records it once the base is loaded
                    break
                if exc.status == 403:
                    self.metrics_denied = True
                    self.query_one(TrainingPanel).show(f"metrics: {exc}", [])
                    return
                raise
            self.steps.update((s["step"], s) for s in page["metrics"])
            if len(page["metrics"]) < METRICS_PAGE:
                break
        total = self.total or self.job["params"].get("steps")
        latest = self.steps[max(self.steps)] if self.steps else None
        losses = [s["metrics"]["loss"] for _, s in sorted(self.steps.items()) if s["metrics"].get("loss") is not None]
        self.query_one(TrainingPanel).show(metrics_line(latest, total), losses)

    @work(group="action")
    async def action_cancel(self) -> None:
        if self.job is not None and await cancel(self, self.job):
            self.reload()
