"""The jobs view against the real gateway and its real worker: submit an import and follow its
log until it ends, cancel a queued job after a confirmation, and the API's refusals (a bad
path, cancelling a running job) as notifications."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from textual.widgets import Log

from tests.services.test_worker import wait_job, worker_pid
from tests.tui.conftest import cells, fill, notes, select_row, until
from tui.modals import ConfirmScreen, FormScreen
from tui.views.jobs import JobLogScreen, JobsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


def admin(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def submit(stack, kind: str, **params) -> dict:
    with admin(stack) as api:
        answer = api.post("/admin/jobs", json={"kind": kind, "params": params})
    assert answer.status_code == 202, answer.text
    return answer.json()


def log_lines(pilot) -> list[str]:
    return list(pilot.app.screen.query_one(Log).lines)


def heading(pilot) -> str:
    return str(pilot.app.screen.query_one("#heading").render())


def state_of(pilot, job_id: str) -> str | None:
    return next((row[3] for row in cells(pilot) if row[0] == job_id), None)


async def test_submit_an_import_and_follow_its_log_until_it_succeeds(console, stack, unique, tmp_path):
    name = unique("console-import")
    data = tmp_path / "tickets.csv"
    data.write_text("id,text\n1,hello\n2,world\n")
    async with console("jobs") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, JobsView), "the jobs")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the form")
        await fill(pilot, {"kind": "dataset.import", "name": name, "path": "tickets.csv"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("`path` must be absolute" in n for n in notes(pilot)), "the API's refusal")
        assert isinstance(pilot.app.screen, FormScreen)
        await fill(pilot, {"path": str(data)})
        await pilot.press("ctrl+s")

        screen = await until(pilot, lambda: isinstance(pilot.app.screen, JobLogScreen) and pilot.app.screen, "the log")
        await until(pilot, lambda: "succeeded" in heading(pilot), "the job's end in the heading")
        lines = [line.split("  ", 1)[1] for line in log_lines(pilot)]
        assert lines[0].startswith("queued by ") and lines[1] == f"started dataset.import: name={name}, path={data}"
        assert lines[-1].startswith(f"succeeded: dataset={name}, version=1, sha256=") and lines[-1].endswith("rows=2")
        await pilot.pause(1.5)  # later: no line shown twice
        assert [line.split("  ", 1)[1] for line in log_lines(pilot)] == lines
        with admin(stack) as api:
            assert [v["rows"] for v in api.get(f"/admin/datasets/{name}").json()["versions"]] == [2]

        await pilot.press("escape")
        await until(pilot, lambda: state_of(pilot, screen.job_id) == "succeeded", "the job listed")
        row = next(r for r in cells(pilot) if r[0] == screen.job_id)
        assert row[1:3] == ["dataset.import", name] and row[7] == f"dataset={name}, version=1, rows=2"


async def test_cancel_a_queued_job_after_a_confirmation(console, stack, unique, tmp_path):
    data = tmp_path / "never.csv"
    data.write_text("a\n1\n")
    pid = worker_pid(stack)
    os.kill(pid, signal.SIGSTOP)  # the worker takes nothing from the queue while stopped
    try:
        job = submit(stack, "dataset.import", name=unique("console-never"), path=str(data))
        async with console("jobs") as pilot:
            await select_row(pilot, job["id"])
            assert state_of(pilot, job["id"]) == "queued"
            await pilot.press("c")
            await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("n")  # declined: nothing happens
            await pilot.pause(0.3)
            with admin(stack) as api:
                assert api.get(f"/admin/jobs/{job['id']}").json()["state"] == "queued"
            await pilot.press("ctrl+d")
            await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: state_of(pilot, job["id"]) == "cancelled", "the job cancelled")
            assert any(f"Cancelled job {job['id']}" in n for n in notes(pilot))
            await pilot.press("c")  # finished: nothing to ask
            await until(pilot, lambda: any("nothing to cancel" in n for n in notes(pilot)), "the warning")
            assert not isinstance(pilot.app.screen, ConfirmScreen)
    finally:
        os.kill(pid, signal.SIGCONT)
    with admin(stack) as api:
        assert api.get(f"/admin/jobs/{job['id']}").json()["state"] == "cancelled"


async def test_a_running_job_is_followed_live_and_cancelling_it_is_refused(console, stack, unique, tmp_path):
    fifo = tmp_path / "blocked.gguf"
    os.mkfifo(fifo)  # the worker's read of it blocks until a writer comes: the job stays running
    job = submit(stack, "model.import", name=unique("console-blocked"), path=str(fifo))
    wait_job(stack, job["id"], states=("running",))
    try:
        async with console(f"jobs {job['id']}") as pilot:  # `:jobs JOB_ID` opens its log
            await until(pilot, lambda: isinstance(pilot.app.screen, JobLogScreen) and "running" in heading(pilot),
                        "the running job's log")
            await until(pilot, lambda: any("reading the model card" in line for line in log_lines(pilot)), "its lines")
            await pilot.press("c")
            await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: any("only a queued job or a running fine-tuning job can be cancelled" in n
                                              for n in notes(pilot)),
                        "the API's refusal")

            # Let the import read its file: the log shows how it ends, without a refresh key.
            threading.Thread(target=lambda: fifo.write_bytes(b"not a model"), daemon=True).start()
            await until(pilot, lambda: "failed" in heading(pilot), "the job's end")
            assert log_lines(pilot)[-1].split("  ", 1)[1].startswith("failed: ")
    finally:
        if wait_job(stack, job["id"], states=("running", "failed"))["state"] == "running":
            threading.Thread(target=lambda: fifo.write_bytes(b""), daemon=True).start()
