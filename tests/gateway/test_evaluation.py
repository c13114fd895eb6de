"""Evaluation jobs on the real stack: the default model (llama.cpp) answers a small dataset,
English and Korean, and is scored on every metric with itself as the judge; a judge that
does not answer in form is counted, not guessed; quick mode picks rows by its seed; a
registered version is served on a temporary engine; bad jobs are refused before they are
queued."""

from __future__ import annotations

import contextlib
import json
import statistics

import psutil
import pytest

from appliance.eval_metrics import RULE_METRICS
from tests.conftest import DEFAULT_MODEL, default_gguf
from tests.gateway.test_finetune import log, register, wait_job
from tests.gateway.test_model_registry import api, cli

pytestmark = pytest.mark.stack

SYSTEM = "You are a helpful assistant. Answer in a few words."
QA = [("What is the capital of France?", "Paris"), ("What is the opposite of hot?", "Cold"),
      ("대한민국의 수도는 어디입니까?", "서울입니다"), ("Say pong.", "pong"), ("What is two plus two?", "Four"),
      ("Name a fruit.", "An apple")]


@pytest.fixture(scope="module")
def qa(stack, tmp_path_factory) -> str:
    register(stack, tmp_path_factory.mktemp("eval"), "eval-qa", [{"question": q, "answer": a} for q, a in QA])
    return "eval-qa"


def evaluate(stack, **params) -> dict:
    answer = api(stack).post("/admin/jobs", json={"kind": "eval", "params": params})
    assert answer.status_code == 202, answer.text
    job = wait_job(stack, answer.json()["id"], timeout=300)
    assert job["state"] == "succeeded", log(stack, job["id"])[-5:]
    return job


def samples(stack, run_id: str) -> list[dict]:
    page = api(stack).get(f"/admin/runs/{run_id}/samples", params={"limit": 2}).json()
    rest = api(stack).get(f"/admin/runs/{run_id}/samples", params={"after": page["next"]}).json()
    return page["samples"] + rest["samples"]


def test_bad_jobs_are_refused_before_anything_is_queued(stack, qa, tmp_path):
    register(stack, tmp_path, "eval-numbers", [{"question": "one", "answer": 1}])
    before = len(api(stack).get("/admin/jobs", params={"limit": 10_000}).json())
    cases = [
        ({"model": "nope", "dataset": qa}, "params.model", "is not served"),
        ({"model": "nope", "model_version": 1, "dataset": qa}, "params.model_version", "'nope' has no version 1"),
        ({"model": DEFAULT_MODEL, "dataset": "nope"}, "params.dataset", "no registered dataset"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "metrics": ["accuracy"]}, "params.metrics", "unknown metric 'accuracy'"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "metrics": ["judge"]}, "params.judge", "needs a judge"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "judge": {"model": "nope"}}, "params.judge.model", "not served"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "judge": {"model": DEFAULT_MODEL, "rubric": "Rate {answr}"}},
         "params.judge.rubric", "KeyError"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "input_column": "prompt"}, "params.input_column",
         "no column 'prompt' (its columns: question, answer)"),
        ({"model": DEFAULT_MODEL, "dataset": "eval-numbers"}, "params.reference_column", "'answer' is int64, not text"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "split": "ds_nope"}, "params.split", "no split 'ds_nope'"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "sample": 0}, "params.sample", ">= 1"),
        ({"model": DEFAULT_MODEL, "dataset": qa, "temperature": 3}, "params.temperature", "<= 2"),
    ]
    for params, param, words in cases:
        answer = api(stack).post("/admin/jobs", json={"kind": "eval", "params": params})
        assert answer.status_code == 400, (params, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"], (params, error)
    assert len(api(stack).get("/admin/jobs", params={"limit": 10_000}).json()) == before


def test_the_default_model_is_scored_on_every_metric_with_itself_as_the_judge(stack, qa):
    job = evaluate(stack, model=DEFAULT_MODEL, dataset=qa, system=SYSTEM, max_tokens=32, experiment="eval-tests",
                   judge={"model": DEFAULT_MODEL, "max_tokens": 64})
    assert job["params"]["input_column"] == "question" and job["params"]["reference_column"] == "answer"
    assert job["params"]["metrics"] == [*RULE_METRICS, "judge"]
    rows = samples(stack, job["id"])
    assert [s["idx"] for s in rows] == list(range(len(QA))) and [s["input"] for s in rows] == [q for q, _ in QA]
    for sample in rows:
        assert sample["error"] is None and sample["answer"].strip() and sample["latency_s"] > 0
        assert set(sample["scores"]) == {*RULE_METRICS, "judge"}  # the grammar holds the judge to JSON
        assert all(0 <= v <= 1 for v in sample["scores"].values())
        verdict = json.loads(sample["judge_output"])
        assert sample["scores"]["judge"] == pytest.approx((verdict["score"] - 1) / 4)
    run = api(stack).get(f"/admin/runs/{job['id']}").json()
    final = run["final_metrics"]
    assert final["samples"] == len(QA) and final["errors"] == 0 and final["judge_unparsed"] == 0
    for metric in ("exact_match", "token_f1", "rougeL", "judge"):
        assert final[metric] == pytest.approx(statistics.fmean(s["scores"][metric] for s in rows))
    assert 0 <= final["bleu"] <= 1
    assert run["experiment"] == "eval-tests" and run["params"]["dataset"] == {"name": qa, "version": 1, "split": None}
    # The CLI shows the scores and the samples, Korean included.
    shown = cli(stack, "eval", "show", job["id"]).stdout
    assert f"{job['id']}  {DEFAULT_MODEL} on {qa} v1  succeeded" in shown and "  judge_unparsed  0" in shown
    assert "대한민국의 수도는 어디입니까?" in shown


def test_a_judge_that_does_not_answer_in_form_is_counted_and_quick_mode_picks_rows_by_seed(stack, qa):
    # remote-ok answers "pong" to everything: right once, and never a score.
    job = evaluate(stack, model="remote-ok", dataset=qa, judge={"model": "remote-ok"}, sample=4, seed=7)
    rows = samples(stack, job["id"])
    assert len(rows) == 4 and all(s["answer"] == "pong" and s["judge_output"] == "pong" for s in rows)
    assert all("judge" not in s["scores"] for s in rows)
    final = api(stack).get(f"/admin/runs/{job['id']}").json()["final_metrics"]
    assert final["judge_unparsed"] == 4 and "judge" not in final and final["samples"] == 4
    pong = [s for s in rows if s["reference"] == "pong"]
    assert all(s["scores"]["exact_match"] == 1 for s in pong)
    assert final["exact_match"] == pytest.approx(len(pong) / 4)
    again = evaluate(stack, model="remote-ok", dataset=qa, metrics=["exact_match"], sample=4, seed=7)
    assert [s["row"] for s in samples(stack, again["id"])] == [s["row"] for s in rows]  # the seed picks the rows
    other = evaluate(stack, model="remote-ok", dataset=qa, metrics=["exact_match"], sample=4, seed=8)
    assert [s["row"] for s in samples(stack, other["id"])] != [s["row"] for s in rows]


def test_a_sample_with_several_references_takes_its_best_score(stack, tmp_path):
    register(stack, tmp_path, "eval-multi", [{"prompt": "Say a word.", "expected": ["ping", "pong"]},
                                             {"prompt": "Say another.", "expected": ["ping", "pang"]}])
    job = evaluate(stack, model="remote-ok", dataset="eval-multi", metrics=["exact_match", "token_f1"])
    assert job["params"]["input_column"] == "prompt" and job["params"]["reference_column"] == "expected"
    rows = samples(stack, job["id"])
    assert [s["reference"] for s in rows] == [["ping", "pong"], ["ping", "pang"]]
    assert [s["scores"] for s in rows] == [{"exact_match": 1.0, "token_f1": 1.0}, {"exact_match": 0.0, "token_f1": 0.0}]


def llama_servers(stack) -> set[int]:
    """The stack's own llama.cpp engines (its worker's temporary ones included)."""
    found = set()
    for process in stack.descendants():
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.name() == "llama-server":
                found.add(process.pid)
    return found


def test_a_registered_version_is_served_on_a_temporary_engine(stack, qa):
    answer = api(stack).post("/admin/models/eval-base/versions", json={"path": str(default_gguf())})
    assert answer.status_code == 201, answer.text
    before = llama_servers(stack)
    out = cli(stack, "eval", "run", "eval-base:1", "--dataset", f"{qa}:1", "--sample", "2", "--system", SYSTEM,
              "--max-tokens", "16", "--metrics", "token_f1,rougeL", "--wait").stdout
    run_id = out.split()[0]
    assert out.startswith(f"{run_id}  eval-base:1 on {qa} v1  succeeded") and "  samples         2" in out
    lines = log(stack, run_id)
    assert any(t == "starting a temporary llama.cpp engine for eval-base:1" for t in lines)
    assert any(t.startswith("temporary engine ready") for t in lines)
    assert llama_servers(stack) == before  # stopped at the end
    run = api(stack).get(f"/admin/runs/{run_id}").json()
    assert run["params"]["model"]["name"] == "eval-base" and run["params"]["model"]["version"] == 1
    assert run["links"]["base_version"]["model"] == "eval-base"


def test_two_evaluations_are_compared_metric_by_metric_with_the_samples_that_changed(stack, qa, tmp_path):
    base = evaluate(stack, model="remote-ok", dataset=qa, metrics=["exact_match", "token_f1"])
    other = evaluate(stack, model=DEFAULT_MODEL, dataset=qa, metrics=["exact_match", "token_f1"], system=SYSTEM,
                     max_tokens=16)
    ids = f"{base['id']},{other['id']}"
    report = api(stack).get("/admin/evaluations/compare", params={"ids": ids, "metric": "token_f1"}).json()
    assert [r["id"] for r in report["runs"]] == [base["id"], other["id"]]
    assert report["runs"][0]["model"]["name"] == "remote-ok" and report["dataset"] == {"name": qa, "version": 1,
                                                                                      "split": None}
    finals = [api(stack).get(f"/admin/runs/{i}").json()["final_metrics"] for i in (base["id"], other["id"])]
    assert {m["metric"]: m["values"] for m in report["metrics"]}["token_f1"] == [f["token_f1"] for f in finals]
    by_row = [{s["row"]: s["scores"]["token_f1"] for s in samples(stack, i)} for i in (base["id"], other["id"])]
    differ = {row for row in by_row[0] if abs(by_row[0][row] - by_row[1][row]) > 1e-9}
    assert {c["row"] for c in report["changed"]} == differ and report["changed_total"] == len(differ)
    spreads = [c["spread"] for c in report["changed"]]
    assert spreads == sorted(spreads, reverse=True)
    assert report["improved"] == sum(by_row[1][r] > by_row[0][r] for r in differ)
    assert report["improved"] + report["regressed"] + report["same"] == report["samples_compared"] == len(QA)
    for change in report["changed"]:
        assert change["runs"][0]["answer"] == "pong" and change["runs"][1]["score"] == by_row[1][change["row"]]
    out = cli(stack, "eval", "compare", base["id"], other["id"], "--metric", "token_f1").stdout
    assert out.startswith(f"on {qa} v1") and f"{other['id']} against {base['id']}: {report['improved']} improved" in out
    # What cannot be compared is refused, naming why.
    register(stack, tmp_path, "eval-qa-2", [{"question": "Say pong.", "answer": "pong"}])
    elsewhere = evaluate(stack, model="remote-ok", dataset="eval-qa-2", metrics=["exact_match"])
    for params, param, words in [({"ids": base["id"]}, "ids", "two or more"),
                                 ({"ids": f"{base['id']},{elsewhere['id']}"}, "ids", "different datasets"),
                                 ({"ids": ids, "metric": "judge"}, "metric", "not every run measured 'judge'")]:
        refused = api(stack).get("/admin/evaluations/compare", params=params)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        assert words in refused.json()["error"]["message"]
