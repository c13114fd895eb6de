"""Experiment tracking through the admin API and the CLI on the shared stack: runs of real jobs
(dataset imports the worker ran), recorded in the stack's state database as the fine-tuning
worker records them, then searched, shown, compared, tagged and exported over HTTP."""

from __future__ import annotations

import csv
import io
import json
import secrets

import pytest

from appliance import experiments
from appliance.db import open_db
from appliance.home import state_db_path
from tests.gateway.test_admin_keys import create, wait_status
from tests.gateway.test_model_registry import api, cli
from tests.services.test_worker import submit, wait_job

pytestmark = pytest.mark.stack

BASE_PARAMS = {"base": {"model": "smollm2", "version": 1}, "dataset": {"name": "chat", "version": 1, "split": None},
               "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
               "learning_rate": 0.0002, "steps": 3, "epochs": None, "batch_size": 2, "sequence_length": 256, "seed": 0}


def with_lora(rank: int, learning_rate: float) -> dict:
    return {**BASE_PARAMS, "lora": {**BASE_PARAMS["lora"], "rank": rank}, "learning_rate": learning_rate}


@pytest.fixture(scope="module")
def tracked(stack, tmp_path_factory) -> dict:
    """An experiment of three runs: each a dataset import the worker ran (its dataset version linked),
    with its params, three steps of metrics and final metrics."""
    tmp = tmp_path_factory.mktemp("experiments")
    name = f"sweep-{secrets.token_hex(3)}"
    runs = []
    db = open_db(state_db_path(stack.home), migrate=False)
    try:
        for i, (rank, lr) in enumerate([(8, 0.0002), (16, 0.0002), (8, 0.0001)]):
            data = tmp / f"chat{i}.csv"
            data.write_text(f"instruction,response\nsay {i},{i}\n")
            job = wait_job(stack, submit(stack, "dataset.import", name=f"{name}-data{i}", path=str(data)).json()["id"])
            assert job["state"] == "succeeded", job
            version = api(stack).get(f"/admin/datasets/{name}-data{i}/versions/1").json()
            experiments.start_run(db, job["id"], name, with_lora(rank, lr), created_by="key_worker",
                                  dataset_version_id=version["id"], environment={"device": "cpu"},
                                  tags=["baseline"] if i == 0 else ())
            for step in (1, 2, 3):
                experiments.record_metrics(db, job["id"], step, {"loss": 3.0 - step * (i + 1) / 4,
                                                                  "tokens_per_s": 100.0 * step})
            experiments.finish_run(db, job["id"], final_metrics={"loss": 3.0 - 3 * (i + 1) / 4},
                                   artifacts=[{"name": "adapter.gguf"}])
            runs.append(job["id"])
    finally:
        db.conn.close()
    return {"experiment": name, "runs": runs, "dataset": f"{name}-data0"}


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def test_runs_are_listed_searched_by_param_and_tag_and_shown_with_their_links(stack, tracked):
    name, (a, b, c) = tracked["experiment"], tracked["runs"]
    listed = ok(api(stack).get("/admin/experiments"))
    assert {"name": name, "runs": 3} == {k: v for k, v in next(e for e in listed if e["name"] == name).items()
                                          if k in ("name", "runs")}
    assert [r["id"] for r in ok(api(stack).get("/admin/runs", params={"experiment": name}))] == [c, b, a]
    rank8 = ok(api(stack).get("/admin/runs", params={"experiment": name, "param.lora.rank": "8"}))
    assert sorted(r["id"] for r in rank8) == sorted([a, c])
    both = ok(api(stack).get("/admin/runs", params={"experiment": name, "param.lora.rank": "8",
                                                    "param.learning_rate": "0.0001"}))
    assert [r["id"] for r in both] == [c]
    assert [r["id"] for r in ok(api(stack).get("/admin/runs", params={"experiment": name, "tag": "baseline"}))] == [a]

    run = ok(api(stack).get(f"/admin/runs/{a}"))
    assert run["state"] == "succeeded" and run["job"]["kind"] == "dataset.import" and run["steps"] == 3
    assert run["links"]["dataset_version"] == {"id": run["dataset_version_id"], "dataset": tracked["dataset"],
                                               "version": 1}
    assert run["last_metrics"]["step"] == 3 and run["params"]["lora"]["rank"] == 8

    page = ok(api(stack).get(f"/admin/runs/{a}/metrics", params={"after": 1, "limit": 1}))
    assert [m["step"] for m in page["metrics"]] == [2] and page["next"] == 2
    rest = ok(api(stack).get(f"/admin/runs/{a}/metrics", params={"after": page["next"]}))
    assert [m["step"] for m in rest["metrics"]] == [3] and rest["metrics"][0]["metrics"]["tokens_per_s"] == 300.0


def test_bad_requests_name_the_parameter(stack, tracked):
    a = tracked["runs"][0]
    for path, params, status, param in [
        ("/admin/runs", {"experiment": "no-such-experiment"}, 404, "experiment"),
        ("/admin/runs", {"param.lora..rank": "8"}, 400, "param.lora..rank"),
        ("/admin/runs", {"limit": 0}, 400, "limit"),
        ("/admin/runs/job_000000000000", {}, 404, "run_id"),
        ("/admin/runs/job_000000000000/metrics", {}, 404, "run_id"),
        (f"/admin/runs/{a}/metrics", {"after": -1}, 400, "after"),
        ("/admin/runs/compare", {"ids": f"{a},job_000000000000"}, 404, "ids"),
        ("/admin/runs/compare", {"ids": f"{a},,"}, 400, "ids"),
        ("/admin/runs/compare", {}, 400, "ids"),
        ("/admin/runs/export", {"format": "xlsx", "ids": a}, 400, "format"),
        ("/admin/runs/export", {"format": "csv"}, 400, "experiment"),
        ("/admin/runs/export", {"format": "csv", "experiment": "no-such-experiment"}, 404, "experiment"),
    ]:
        answer = api(stack).get(path, params=params)
        assert answer.status_code == status and answer.json()["error"]["param"] == param, (path, params, answer.text)
    refused = api(stack).patch(f"/admin/runs/{a}", json={"add_tags": ["no spaces"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "add_tags", refused.text


def test_a_viewer_is_refused_and_a_developer_tags_runs_audited(stack, tracked, unique):
    a = tracked["runs"][0]
    viewer = create(stack, unique("runs viewer"), role="viewer")["key"]
    developer = create(stack, unique("runs developer"), role="developer")["key"]
    assert wait_status(stack, viewer, 200).status_code == 200 and wait_status(stack, developer, 200).status_code == 200
    for method, path in [("GET", "/admin/experiments"), ("GET", "/admin/runs"), ("GET", f"/admin/runs/{a}"),
                         ("GET", f"/admin/runs/compare?ids={a}"), ("GET", f"/admin/runs/export?format=csv&ids={a}"),
                         ("PATCH", f"/admin/runs/{a}")]:
        denied = api(stack, viewer).request(method, path, json={"add_tags": ["x"]} if method == "PATCH" else None)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_role", (path, denied.text)
        assert "experiments." in denied.json()["error"]["message"]
    tagged = api(stack, developer).patch(f"/admin/runs/{a}",
                                         json={"add_tags": ["best", "보고서"], "remove_tags": ["baseline"]})
    assert tagged.status_code == 200 and tagged.json()["tags"] == ["best", "보고서"], tagged.text
    assert [r["id"] for r in ok(api(stack, developer).get("/admin/runs", params={"tag": "보고서"}))] == [a]
    entry = ok(api(stack).get("/admin/audit", params={"action": "run.tag", "target": f"run/{a}"}))[0]
    assert entry["outcome"] == "ok" and entry["key_name"] == unique("runs developer")
    assert entry["detail"]["tags"] == ["best", "보고서"]
    untagged = cli(stack, "runs", "tag", a, "--remove", "best", "--remove", "보고서", "--add", "baseline").stdout
    assert untagged.strip() == f"{a}: tags baseline"


def test_compare_over_the_api_and_the_cli(stack, tracked):
    a, b, c = tracked["runs"]
    result = ok(api(stack).get("/admin/runs/compare", params={"ids": f"{a},{b},{c}"}))
    assert {p["param"] for p in result["params"] if p["differs"]} == {"lora.rank", "learning_rate"}
    assert result["steps"] == [1, 2, 3] and result["series"]["loss"][b] == [2.5, 2.0, 1.5]

    out = cli(stack, "runs", "compare", a, b, c).stdout
    tables = out.split("\n\n")
    assert tables[0].splitlines() == [
        f"PARAM          {a}  {b}  {c}  DIFFERS",
        f"lora.rank      {'8'.ljust(len(a))}  {'16'.ljust(len(b))}  {'8'.ljust(len(c))}  *",
        f"learning_rate  {'0.0002'.ljust(len(a))}  {'0.0002'.ljust(len(b))}  {'0.0001'.ljust(len(c))}  *",
    ]
    assert tables[1].splitlines()[1].split() == ["loss", "2.25", "1.5", "0.75"]
    assert tables[2].strip() == "3 steps of loss, tokens_per_s metrics: --json has them aligned by step"
    assert json.loads(cli(stack, "runs", "compare", a, b, "--json").stdout)["series"]["loss"][a] == [2.75, 2.5, 2.25]
    refused = cli(stack, "runs", "compare", a, "job_000000000000", check=False)
    assert refused.returncode == 1 and "no run 'job_000000000000'" in refused.stderr and "parameter ids" in refused.stderr


def test_export_csv_and_json_over_the_api_and_the_cli(stack, tracked, tmp_path):
    name, (a, b, c) = tracked["experiment"], tracked["runs"]
    answer = api(stack).get("/admin/runs/export", params={"format": "csv", "experiment": name})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv"), answer.text
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [r["id"] for r in rows] == [a, b, c]
    assert [(r["param.lora.rank"], r["param.learning_rate"], r["metric.loss"]) for r in rows] == [
        ("8", "0.0002", "2.25"), ("16", "0.0002", "1.5"), ("8", "0.0001", "0.75")]
    assert {r["experiment"] for r in rows} == {name} and {r["state"] for r in rows} == {"succeeded"}
    assert list(rows[0])[:5] == ["id", "experiment", "state", "tags", "param.base.model"]

    printed = cli(stack, "runs", "export", "--experiment", name, "--format", "csv").stdout
    assert printed == answer.text
    target = tmp_path / "two.csv"
    cli(stack, "runs", "export", c, a, "--format", "csv", "-o", str(target))
    assert [r["id"] for r in csv.DictReader(target.open())] == [c, a]

    exported = json.loads(cli(stack, "runs", "export", b, "--format", "json").stdout)
    assert [r["id"] for r in exported["runs"]] == [b]
    assert [m["metrics"]["loss"] for m in exported["runs"][0]["metrics"]] == [2.5, 2.0, 1.5]
    assert exported["runs"][0]["links"]["dataset_version"]["version"] == 1
    both = cli(stack, "runs", "export", a, "--experiment", name, "--format", "csv", check=False)
    assert both.returncode == 2 and "not both" in both.stderr


def test_the_cli_lists_and_shows_runs(stack, tracked):
    name, (a, b, c) = tracked["experiment"], tracked["runs"]
    listed = cli(stack, "runs", "list", "--experiment", name, "--param", "lora.rank=16").stdout.splitlines()
    assert listed[0].split() == ["ID", "EXPERIMENT", "STATE", "TAGS", "CREATED", "FINAL"] and len(listed) == 2
    assert listed[1].startswith(f"{b}  {name}  succeeded")
    as_json = json.loads(cli(stack, "runs", "list", "--experiment", name, "--param", "lora.rank=8", "--json").stdout)
    assert sorted(r["id"] for r in as_json) == sorted([a, c])
    bad = cli(stack, "runs", "list", "--param", "lora.rank", check=False)
    assert bad.returncode == 2 and "PATH=VALUE" in bad.stderr
    shown = cli(stack, "runs", "show", c).stdout
    assert f"experiment  {name}" in shown and "  lora.rank = 8" in shown and "  learning_rate = 0.0001" in shown
    assert f"dataset     {name}-data2 version 1" in shown and "last step   3: loss=0.75 tokens_per_s=300" in shown
    experiments_listed = cli(stack, "experiments", "list").stdout
    assert any(line.split()[:2] == [name, "3"] for line in experiments_listed.splitlines())
