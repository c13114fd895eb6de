"""Evaluations in the console against the real stack and worker: the jobs view's evaluation
form (the API's refusal keeps it open; a job it starts opens its log), and the runs view over
two evaluations: each one's score listed, one shown with its samples, both compared with the
samples that changed."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.conftest import DEFAULT_MODEL
from tests.tui.conftest import column, fill, notes, select_row, until
from tests.tui.test_experiments import admin, detail, wait_job
from tui.modals import DetailScreen, FormScreen
from tui.views.experiments import RunsView
from tui.views.jobs import JobLogScreen, JobsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

QA = [("Say pong.", "pong"), ("What is the capital of France?", "Paris"), ("대한민국의 수도는?", "서울")]


@pytest.fixture(scope="module")
def dataset(stack, tmp_path_factory) -> str:
    name = f"console-qa-{secrets.token_hex(3)}"
    rows = tmp_path_factory.mktemp("console-eval") / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in QA))
    with admin(stack) as api:
        answer = api.post(f"/admin/datasets/{name}/versions", json={"path": str(rows)})
        assert answer.status_code == 201, answer.text
    return name


async def test_evaluate_from_the_jobs_view_then_show_and_compare_the_runs(console, stack, dataset):
    experiment = f"console-eval-{secrets.token_hex(3)}"
    async with console("jobs") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, JobsView), "the jobs")
        await pilot.press("e")
        form = await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen) and pilot.app.screen, "the form")
        assert form.title_text == "Evaluate a model"
        await fill(pilot, {"model": "nope", "dataset": dataset, "metrics": "exact_match,token_f1",
                           "experiment": experiment})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("model 'nope' is not served" in n for n in notes(pilot)), "the API's refusal")
        assert pilot.app.screen is form and form.values()["dataset"] == dataset  # kept open, with what was typed
        await fill(pilot, {"model": "remote-ok"})
        await pilot.press("ctrl+s")
        screen = await until(pilot, lambda: isinstance(pilot.app.screen, JobLogScreen) and pilot.app.screen,
                             "the new job's log")
    first = wait_job(stack, screen.job_id, timeout=120)
    assert first["state"] == "succeeded" and first["params"]["metrics"] == ["exact_match", "token_f1"]
    with admin(stack) as api:
        answer = api.post("/admin/jobs", json={"kind": "eval", "params": {
            "model": DEFAULT_MODEL, "dataset": dataset, "metrics": ["exact_match", "token_f1"], "max_tokens": 12,
            "system": "Answer in one word.", "experiment": experiment}})
        assert answer.status_code == 202, answer.text
    second = wait_job(stack, answer.json()["id"], timeout=120)
    assert second["state"] == "succeeded"

    async with console(f"runs {experiment}") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, RunsView)
                    and {first["id"], second["id"]} <= set(column(pilot, "id")), "both runs")
        scores = dict(zip(column(pilot, "id"), column(pilot, "score")))
        assert scores[first["id"]] == f"token_f1 {1 / 3:.3f}"  # "pong" is right once in three
        assert dict(zip(column(pilot, "id"), column(pilot, "model")))[first["id"]] == "remote-ok"

        await select_row(pilot, first["id"])
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the run")
        page = detail(pilot)
        assert "INPUT" in page and "ANSWER" in page and "TOKEN_F1" in page and "대한민국의 수도는?" in page
        assert page.count("pong") >= 4  # the answer to every sample, and a reference
        await pilot.press("escape")

        await until(pilot, lambda: isinstance(pilot.app.screen, RunsView), "the runs again")
        await select_row(pilot, first["id"])
        await pilot.press("space")
        await select_row(pilot, second["id"])
        await pilot.press("c")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the comparison")
        page = detail(pilot)
    with admin(stack) as api:
        report = api.get("/admin/evaluations/compare", params={"ids": f"{first['id']},{second['id']}"}).json()
    assert (f"token_f1 on 3 samples, {second['id']} against {first['id']}: {report['improved']} improved, "
            f"{report['regressed']} regressed, {report['same']} the same") in page
    assert all(c["input"] in page for c in report["changed"])
    assert "No sample changed." in page if not report["changed"] else "ROW" in page
