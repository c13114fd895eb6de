"""Experiment tracking (appliance/experiments.py) on a real state database: runs of real job
rows, searched by nested parameter and tag, compared, exported as CSV and JSON, and the
client's mistakes refused with the parameter named."""

from __future__ import annotations

import copy
import csv
import io
import json

import pytest

from appliance import experiments, jobs
from appliance.audit import Actor
from appliance.db import open_db
from appliance.errors import Conflict, InvalidRequest, NotFound

ACTOR = Actor("key_test", "ml engineer", "developer")
PARAMS = {"base": {"model": "smollm2", "version": 1}, "dataset": {"name": "chat", "version": 2, "split": None},
          "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
          "learning_rate": 0.0002, "steps": 20, "epochs": None, "batch_size": 2, "sequence_length": 256, "seed": 0}
ENVIRONMENT = {"python": "3.11.9", "torch": "2.5.1", "device": "cpu", "host": "edge-1"}


@pytest.fixture
def db(tmp_path):
    database = open_db(tmp_path / "state.db")
    yield database
    database.conn.close()


def params(**changes) -> dict:
    """PARAMS with dotted keys changed: params(**{"lora.rank": 16})."""
    out = copy.deepcopy(PARAMS)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = out
        for name in parents:
            node = node[name]
        node[last] = value
    return out


def new_job(db, state: str = "succeeded") -> str:
    job = jobs.create(db, "finetune", {"base": "smollm2", "dataset": "chat"}, ACTOR)
    if state != "queued":
        jobs.claim(db, job["id"])
    if state in ("succeeded", "failed"):
        jobs.finish(db, job["id"], result={"model": "smollm2-ft"} if state == "succeeded" else None,
                    error="diverged" if state == "failed" else None)
    return job["id"]


def a_run(db, experiment="lora-sweep", state="succeeded", losses=(2.0, 1.5, 1.2), tags=(), **changes) -> str:
    """A run as the fine-tuning worker records it: started, a step's metrics at a time, finished."""
    job_id = new_job(db, state)
    experiments.start_run(db, job_id, experiment, params(**changes), created_by=ACTOR.key_id,
                          environment=ENVIRONMENT, tags=tags)
    for step, loss in enumerate(losses, 1):
        experiments.record_metrics(db, job_id, step, {"loss": loss, "learning_rate": 0.0002, "tokens_per_s": 800.0 + step,
                                                      "step_time_s": 0.5, "epoch": step / len(losses)})
    if state == "succeeded":
        experiments.finish_run(db, job_id, final_metrics={"loss": losses[-1], "tokens_per_s": 812.5},
                               artifacts=[{"name": "adapter.gguf", "key": "sha256/ab", "size": 123}])
    return job_id


def test_a_run_records_params_environment_metrics_artifacts_and_its_job(db):
    run_id = a_run(db, tags=["baseline"])
    run = experiments.get_run(db, run_id)
    assert run["id"] == run_id and run["experiment"] == "lora-sweep" and run["state"] == "succeeded"
    assert run["params"] == PARAMS and run["environment"] == ENVIRONMENT and run["tags"] == ["baseline"]
    assert run["final_metrics"] == {"loss": 1.2, "tokens_per_s": 812.5}
    assert run["artifacts"] == [{"name": "adapter.gguf", "key": "sha256/ab", "size": 123}]
    assert run["job"]["kind"] == "finetune" and run["job"]["created_by"] == "ml engineer"
    assert run["links"] == {"job": run_id, "base_version": None, "dataset_version": None, "model_version": None}
    assert run["steps"] == 3 and run["last_metrics"]["step"] == 3 and run["last_metrics"]["metrics"]["loss"] == 1.2
    assert [e["name"] for e in experiments.list_experiments(db)] == ["lora-sweep"]
    experiment = experiments.list_experiments(db)[0]
    assert experiment["runs"] == 1 and experiment["created_by"] == "key_test"


def test_a_resumed_job_writes_a_step_again_and_it_is_replaced(db):
    run_id = a_run(db, state="running", losses=(2.0, 1.6, 1.4))
    experiments.start_run(db, run_id, "lora-sweep", PARAMS, created_by=ACTOR.key_id, tags=["resumed"])
    experiments.record_metrics(db, run_id, 3, {"loss": 1.3})  # resumed from the checkpoint of step 2
    experiments.record_metrics(db, run_id, 4, {"loss": 1.1, "diverged": float("nan")})
    steps = experiments.metrics(db, run_id)
    assert [(s["step"], s["metrics"]["loss"]) for s in steps] == [(1, 2.0), (2, 1.6), (3, 1.3), (4, 1.1)]
    assert steps[2]["metrics"] == {"loss": 1.3} and steps[3]["metrics"]["diverged"] is None
    assert [s["step"] for s in experiments.metrics(db, run_id, after_step=2, limit=1)] == [3]
    assert experiments.get_run(db, run_id)["tags"] == ["resumed"]  # start_run again keeps the run, adds tags
    with pytest.raises(Conflict) as moved:
        experiments.start_run(db, run_id, "other", PARAMS, created_by=None)
    assert moved.value.param == "experiment"


def test_runs_are_searched_by_nested_param_as_json_values_and_by_tag(db):
    rank8 = a_run(db, tags=["baseline"])
    rank16 = a_run(db, **{"lora.rank": 16, "learning_rate": 0.0001})
    other_data = a_run(db, experiment="other-data", tags=["baseline"], **{"dataset.name": "support", "seed": 1})

    def found(**kwargs) -> list[str]:
        return sorted(r["id"] for r in experiments.list_runs(db, **kwargs))

    assert found(where={"lora.rank": "8"}) == sorted([rank8, other_data])
    assert found(where={"lora.rank": "8.0"}) == sorted([rank8, other_data])  # numbers compare as numbers
    assert found(where={"lora.rank": '"8"'}) == []  # the string "8" is not the number 8
    assert found(where={"lora.rank": "16", "learning_rate": "0.0001"}) == [rank16]
    assert found(where={"learning_rate": "2e-4"}) == sorted([rank8, other_data])
    assert found(where={"dataset.name": "support"}) == [other_data]  # not JSON: a string
    assert found(where={"dataset.name": '"chat"'}) == sorted([rank8, rank16])
    assert found(where={"dataset.split": "null"}) == sorted([rank8, rank16, other_data])
    assert found(where={"epochs": "null", "seed": "1"}) == [other_data]
    assert found(where={"lora.target_modules": '["q_proj","v_proj"]'}) == sorted([rank8, rank16, other_data])
    assert found(where={"lora.target_modules.1": "v_proj"}) == sorted([rank8, rank16, other_data])
    assert found(where={"lora": '{"rank": 8}'}) == []
    assert found(where={"no.such.param": "1"}) == []
    assert found(experiment="lora-sweep", tag="baseline") == [rank8]
    assert found(tag="baseline") == sorted([rank8, other_data])
    assert found(experiment="lora-sweep", where={"lora.rank": "8"}) == [rank8]
    listed = experiments.list_runs(db, experiment="lora-sweep")
    assert [r["id"] for r in listed] == [rank16, rank8]  # newest first
    assert listed[0]["state"] == "succeeded" and listed[0]["params"]["lora"]["rank"] == 16


def test_bad_filters_and_unknown_names_are_refused_naming_the_parameter(db):
    run_id = a_run(db)
    for path in ("", "lora..rank", "lora.rank$", "a b", "lora.rank'"):
        with pytest.raises(InvalidRequest) as bad:
            experiments.list_runs(db, where={path: "8"})
        assert bad.value.status == 400 and bad.value.param == f"param.{path}", path
    with pytest.raises(InvalidRequest) as infinite:
        experiments.list_runs(db, where={"learning_rate": "1e999"})
    assert infinite.value.param == "param.learning_rate"
    for call, param in [(lambda: experiments.list_runs(db, experiment="nope"), "experiment"),
                        (lambda: experiments.get_run(db, "job_000000000000"), "run_id"),
                        (lambda: experiments.tag_run(db, "job_000000000000", add=["x"]), "run_id"),
                        (lambda: experiments.compare(db, [run_id, "job_000000000000"]), "ids"),
                        (lambda: experiments.export(db, "nope", "csv"), "experiment"),
                        (lambda: experiments.export(db, ["job_000000000000"], "json"), "ids"),
                        (lambda: experiments.metrics(db, "job_000000000000"), "job_id"),
                        (lambda: experiments.record_metrics(db, "job_000000000000", 1, {"loss": 1}), "job_id"),
                        (lambda: experiments.start_run(db, "job_000000000000", "x", {}, created_by=None), "job_id"),
                        (lambda: experiments.finish_run(db, new_job(db), final_metrics={}, artifacts=[]), "run_id"),
                        (lambda: experiments.start_run(db, new_job(db), "x", {}, created_by=None,
                                                       dataset_version_id="dv_000000000000"), "dataset_version_id")]:
        with pytest.raises(NotFound) as missing:
            call()
        assert missing.value.status == 404 and missing.value.param == param, param
    for call, param in [(lambda: experiments.start_run(db, run_id, "bad name!", {}, created_by=None), "experiment"),
                        (lambda: experiments.start_run(db, run_id, "lora-sweep", [1], created_by=None), "params"),
                        (lambda: experiments.start_run(db, run_id, "lora-sweep", {}, created_by=None, tags=["a b"]), "tags"),
                        (lambda: experiments.record_metrics(db, run_id, 0, {"loss": 1}), "step"),
                        (lambda: experiments.record_metrics(db, run_id, 1, {"loss": "low"}), "metrics.loss"),
                        (lambda: experiments.tag_run(db, run_id, add=["a,b"]), "add_tags"),
                        (lambda: experiments.tag_run(db, run_id, remove=[""]), "remove_tags"),
                        (lambda: experiments.compare(db, []), "ids"),
                        (lambda: experiments.compare(db, [run_id] * 1 + [f"job_{i}" for i in range(11)]), "ids"),
                        (lambda: experiments.export(db, [run_id], "xlsx"), "format")]:
        with pytest.raises(InvalidRequest) as bad:
            call()
        assert bad.value.status == 400 and bad.value.param == param, param
    assert experiments.get_run(db, run_id)["experiment"] == "lora-sweep"  # nothing refused changed the run


def test_tags_are_added_and_removed(db):
    run_id = a_run(db, tags=["baseline"])
    assert experiments.tag_run(db, run_id, add=["best", "보고서"], remove=["baseline"])["tags"] == ["best", "보고서"]
    assert experiments.tag_run(db, run_id, add=["best"], remove=["never-there"])["tags"] == ["best", "보고서"]
    assert [r["id"] for r in experiments.list_runs(db, tag="보고서")] == [run_id]
    assert experiments.list_runs(db, tag="baseline") == []


def test_compare_marks_only_the_params_that_differ_and_aligns_steps(db):
    a = a_run(db, losses=(2.0, 1.5, 1.2))
    b = a_run(db, losses=(2.1, 1.4), **{"lora.rank": 16, "learning_rate": 0.0001})
    c = a_run(db, losses=(1.9, 1.6, 1.0, 0.9), **{"lora.rank": 8.0, "lora.target_modules": ["q_proj"]})
    result = experiments.compare(db, [a, b, c])
    assert [r["id"] for r in result["runs"]] == [a, b, c]
    differing = {p["param"]: p["values"] for p in result["params"] if p["differs"]}
    assert differing == {"lora.rank": [8, 16, 8.0], "learning_rate": [0.0002, 0.0001, 0.0002],
                         "lora.target_modules": [["q_proj", "v_proj"], ["q_proj", "v_proj"], ["q_proj"]]}
    same = {p["param"] for p in result["params"] if not p["differs"]}
    assert same == {"base.model", "base.version", "dataset.name", "dataset.version", "dataset.split", "lora.alpha",
                    "lora.dropout", "steps", "epochs", "batch_size", "sequence_length", "seed"}
    assert [p["param"] for p in result["params"]][:3] == ["base.model", "base.version", "dataset.name"]  # params' order
    pair = experiments.compare(db, [a, c])
    assert {p["param"] for p in pair["params"] if p["differs"]} == {"lora.target_modules"}  # 8 and 8.0 are the same
    finals = {m["metric"]: m["values"] for m in result["final_metrics"]}
    assert finals == {"loss": [1.2, 1.4, 0.9], "tokens_per_s": [812.5, 812.5, 812.5]}
    assert result["steps"] == [1, 2, 3, 4]
    assert result["series"]["loss"] == {a: [2.0, 1.5, 1.2, None], b: [2.1, 1.4, None, None], c: [1.9, 1.6, 1.0, 0.9]}
    assert set(result["series"]) == {"loss", "learning_rate", "tokens_per_s", "step_time_s", "epoch"}


def test_a_param_one_run_lacks_differs_from_a_null_one(db):
    a = a_run(db)
    b = new_job(db)
    without_epochs = params()
    del without_epochs["epochs"]
    experiments.start_run(db, b, "lora-sweep", without_epochs, created_by=None)
    epochs = next(p for p in experiments.compare(db, [a, b])["params"] if p["param"] == "epochs")
    assert epochs == {"param": "epochs", "values": [None, None], "differs": True}


def test_csv_export_has_a_row_per_run_with_flattened_params_and_final_metrics(db):
    a = a_run(db, tags=["baseline", "best"])
    b = a_run(db, state="failed", **{"lora.rank": 16})
    text = experiments.export(db, "lora-sweep", "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "experiment", "state", "tags", "param.base.model", "param.base.version",
                       "param.dataset.name", "param.dataset.version", "param.dataset.split", "param.lora.rank",
                       "param.lora.alpha", "param.lora.dropout", "param.lora.target_modules", "param.learning_rate",
                       "param.steps", "param.epochs", "param.batch_size", "param.sequence_length", "param.seed",
                       "metric.loss", "metric.tokens_per_s"]
    by_id = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert [row[0] for row in rows[1:]] == [a, b]  # oldest first
    assert by_id[a] == {"id": a, "experiment": "lora-sweep", "state": "succeeded", "tags": "baseline best",
                        "param.base.model": "smollm2", "param.base.version": "1", "param.dataset.name": "chat",
                        "param.dataset.version": "2", "param.dataset.split": "", "param.lora.rank": "8",
                        "param.lora.alpha": "16", "param.lora.dropout": "0.05",
                        "param.lora.target_modules": '["q_proj", "v_proj"]', "param.learning_rate": "0.0002",
                        "param.steps": "20", "param.epochs": "", "param.batch_size": "2", "param.sequence_length": "256",
                        "param.seed": "0", "metric.loss": "1.2", "metric.tokens_per_s": "812.5"}
    assert by_id[b]["state"] == "failed" and by_id[b]["param.lora.rank"] == "16"
    assert by_id[b]["metric.loss"] == "" and by_id[b]["tags"] == ""  # a failed run has no final metrics
    assert experiments.export(db, [b, a], "csv").splitlines()[1].startswith(b)  # named runs: in the order named


def test_json_export_has_the_full_runs_with_their_steps(db):
    a = a_run(db, losses=(2.0, 1.0))
    b = a_run(db, experiment="elsewhere", losses=(3.0,))
    exported = json.loads(experiments.export(db, [a, b], "json"))
    assert [r["id"] for r in exported["runs"]] == [a, b]
    first = exported["runs"][0]
    assert first["params"] == PARAMS and first["environment"] == ENVIRONMENT and first["state"] == "succeeded"
    assert first["links"]["job"] == a and first["final_metrics"]["loss"] == 1.0
    assert [(m["step"], m["metrics"]["loss"]) for m in first["metrics"]] == [(1, 2.0), (2, 1.0)]
    assert [m["step"] for m in exported["runs"][1]["metrics"]] == [1]
    assert [r["id"] for r in json.loads(experiments.export(db, "elsewhere", "json"))["runs"]] == [b]
