"""Fine-tuning in the console against the real stack and its real worker (torch on the CPU,
the default model's GGUF file as the base): the jobs view's fine-tuning form (the API's
refusal keeps it open; a job it starts opens its log, whose metrics and loss grow step by
step, and `c` stops it), and the runs view over two real runs: listed, one shown in full,
both compared side by side (the learning rate marked as differing) and one tagged."""

from __future__ import annotations

import io
import json
import re
import secrets
import time
from types import SimpleNamespace

import httpx
import pytest
from rich.console import Console
from textual.widgets import Log, Sparkline

from tests.conftest import default_gguf
from tests.tui.conftest import column, fill, notes, select_row, until
from tui.modals import ConfirmScreen, DetailScreen, FormScreen
from tui.views.experiments import RunsView
from tui.views.jobs import JobLogScreen, JobsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

EXPERIMENT = "console-tests"
JOB_S = 600  # a generous bound: a job loads the model (seconds), trains two steps and converts the adapter
SYSTEM = "You are a helpful assistant."
PAIRS = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
         ("What colour is the sky?", "Blue."), ("Name a fruit.", "An apple.")]


def admin(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=120)


def wait_job(stack, job_id: str, timeout: float = JOB_S) -> dict:
    deadline = time.monotonic() + timeout
    with admin(stack) as api:
        while (job := api.get(f"/admin/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
            time.sleep(0.5)
    return job


@pytest.fixture(scope="module")
def registered(stack, tmp_path_factory) -> SimpleNamespace:
    """The default model's GGUF file as a model, and a small chat dataset, both registered by path."""
    suffix = secrets.token_hex(3)
    base, dataset = f"console-base-{suffix}", f"console-chats-{suffix}"
    rows = tmp_path_factory.mktemp("console-finetune") / "chats.jsonl"
    rows.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        + "\n" for q, a in PAIRS))
    with admin(stack) as api:
        answer = api.post(f"/admin/models/{base}/versions", json={"path": str(default_gguf())})
        assert answer.status_code == 201, answer.text
        answer = api.post(f"/admin/datasets/{dataset}/versions", json={"path": str(rows)})
        assert answer.status_code == 201, answer.text
    return SimpleNamespace(base=base, dataset=dataset)


@pytest.fixture(scope="module")
def runs(stack, registered) -> list[str]:
    """Two finished runs of EXPERIMENT, alike but for the learning rate: their ids, oldest first."""
    ids = []
    with admin(stack) as api:
        for learning_rate in (0.001, 0.002):
            answer = api.post("/admin/jobs", json={"kind": "finetune", "params": {
                "base": registered.base, "dataset": registered.dataset, "steps": 2, "sequence_length": 64,
                "experiment": EXPERIMENT, "learning_rate": learning_rate}})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    for job_id in ids:
        job = wait_job(stack, job_id)
        assert job["state"] == "succeeded", job
    return ids


def heading(pilot) -> str:
    return str(pilot.app.screen.query_one("#heading").render())


def shown(renderable) -> str:
    """A rich renderable (a detail page's body) as the text it draws."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def detail(pilot) -> str:
    return shown(pilot.app.screen.body)


async def test_fine_tune_from_the_jobs_view_follow_its_metrics_and_stop_it(console, stack, registered):
    async with console("jobs") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, JobsView), "the jobs")
        await pilot.press("f")
        form = await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen) and pilot.app.screen, "the form")
        assert form.title_text == "Fine-tune a model"
        await fill(pilot, {"base": registered.base, "dataset": "console-missing", "steps": "5000",
                           "learning_rate": "0.001", "sequence_length": "64", "experiment": "console-stop"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("no registered dataset named 'console-missing'" in n for n in notes(pilot)),
                    "the API's refusal")
        assert pilot.app.screen is form and form.values()["steps"] == "5000"  # kept open, with what was typed

        await fill(pilot, {"dataset": registered.dataset})
        await pilot.press("ctrl+s")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, JobLogScreen) and pilot.app.screen,
                             "the new job's log")
        with admin(stack) as api:
            params = api.get(f"/admin/jobs/{screen.job_id}").json()["params"]
        assert (params["steps"], params["learning_rate"], params["sequence_length"], params["experiment"]) == \
            (5000, 0.001, 64, "console-stop")
        assert params["allow_pii"] is False and params["lora"]["rank"] == 8  # not filled in: the API's defaults

        # Its metrics grow as it trains: the latest step's, and the loss of every step so far.
        metrics = screen.query_one("#metrics")
        await until(pilot, lambda: (found := re.match(r"step (\d+)/5000 ", str(metrics.render()))) and int(found[1]) >= 3,
                    "three steps", timeout=JOB_S)
        line = str(metrics.render())
        assert re.fullmatch(r"step \d+/5000  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  \d+ tok/s  \d+\.\d\d s/step", line), line
        assert len(screen.query_one("#loss", Sparkline).data) >= 3
        assert any(re.search(r"  step 1/5000 loss ", text) for text in screen.query_one(Log).lines)

        await pilot.press("c")
        question = await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen) and pilot.app.screen,
                               "the confirmation")
        assert question.question.startswith(f"Stop job {screen.job_id} (finetune") and "next step" in question.question
        await pilot.press("y")
        await until(pilot, lambda: any(f"Asked job {screen.job_id}" in n for n in notes(pilot)), "the request said")
        await until(pilot, lambda: "cancelled" in heading(pilot), "the job stopped", timeout=60)
        assert any("stopped at step" in text for text in screen.query_one(Log).lines)
    with admin(stack) as api:
        job = api.get(f"/admin/jobs/{screen.job_id}").json()
    assert job["state"] == "cancelled" and job["cancel_requested_at"]


async def test_runs_are_listed_shown_compared_and_tagged(console, stack, runs):
    older, newer = runs
    async with console(f"exp {EXPERIMENT}") as pilot:  # an alias, and its text filters the runs
        await until(pilot, lambda: isinstance(pilot.app.screen, RunsView) and set(runs) <= set(column(pilot, "id")),
                    "both runs")
        ids = column(pilot, "id")
        assert ids.index(newer) < ids.index(older)  # newest first
        assert set(column(pilot, "experiment")) == {EXPERIMENT}
        row = dict(zip(ids, zip(column(pilot, "learning_rate"), column(pilot, "state"), column(pilot, "steps"),
                                column(pilot, "final_loss"), column(pilot, "lora_rank"))))
        assert row[older][:3] == ("0.001", "succeeded", "2") and row[newer][:3] == ("0.002", "succeeded", "2")
        assert all(re.fullmatch(r"\d+\.\d+", row[i][3]) and row[i][4] == "8" for i in runs), row

        # enter: the run in full.
        await select_row(pilot, older)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the run")
        page = detail(pilot)
        assert f"id: {older}" in page and "learning_rate: 0.001" in page and "model_version:" in page
        await pilot.press("escape")

        # space marks one, c on the other compares them.
        await until(pilot, lambda: isinstance(pilot.app.screen, RunsView), "the runs again")
        await select_row(pilot, older)
        await pilot.press("space")
        await until(pilot, lambda: "●" in column(pilot, "marked")[column(pilot, "id").index(older)], "the mark")
        await select_row(pilot, newer)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the comparison")
        page = detail(pilot)
        assert pilot.app.screen.title_text == f"run {older} and run {newer}"
        lines: dict[str, list[str]] = {}  # by its first word, the first line (params come before final metrics)
        for line in page.splitlines():
            if line.strip():
                lines.setdefault(line.split()[0], line.split())
        assert lines["learning_rate"] == ["learning_rate", "0.001", "0.002", "*"]  # marked as differing
        assert lines["lora.rank"] == ["lora.rank", "8", "8"] and lines["steps"] == ["steps", "2", "2"]
        assert "1 of " in page and "params differ" in page and "LOSS PER STEP" in page
        assert lines["loss"][0] == "loss" and len(lines["loss"]) == 3  # the final loss of each
        assert [lines[str(step)][0] for step in (1, 2)] == ["1", "2"]  # the loss per step
        assert lines[older][:3] == [older, EXPERIMENT, "succeeded"] and lines[newer][:3] == [newer, EXPERIMENT, "succeeded"]
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(pilot.app.screen, RunsView), "the runs again")
        assert "●" not in column(pilot, "marked")  # the mark is spent

        # t: tags added, then one removed.
        await select_row(pilot, newer)
        await pilot.press("t")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the tags form")
        await fill(pilot, {"add": "best, lr-sweep"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any(f"Run {newer}: tags best, lr-sweep" in n for n in notes(pilot)), "the tags")
        with admin(stack) as api:
            assert api.get(f"/admin/runs/{newer}").json()["tags"] == ["best", "lr-sweep"]
        await until(pilot, lambda: column(pilot, "tags")[column(pilot, "id").index(newer)] == "best, lr-sweep",
                    "the tags listed")
        await pilot.press("t")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the tags form")
        await fill(pilot, {"remove": "lr-sweep"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: column(pilot, "tags")[column(pilot, "id").index(newer)] == "best", "one removed")
        with admin(stack) as api:
            assert api.get(f"/admin/runs/{newer}").json()["tags"] == ["best"]
