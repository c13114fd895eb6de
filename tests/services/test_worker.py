"""The job worker on the shared stack: imports queued through /admin/jobs run in the worker
(a child of `appliance up`), land in the registries with an audit trail, and bad jobs,
cancelled jobs and a killed worker end in states that say what happened."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import appliance, default_gguf
from tests.gateway.test_model_registry import api, cli

pytestmark = pytest.mark.stack


def worker_pid(stack) -> int:
    for proc in stack.descendants():
        try:
            cmdline = proc.cmdline()
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
        if "appliance.cli" in cmdline and "worker" in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            return proc.pid
    raise AssertionError("no worker process under the stack")


def wait_job(stack, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api(stack).get(f"/admin/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is still {job['state']} after {timeout} s")


def submit(stack, kind: str, key=None, **params) -> httpx.Response:
    return api(stack, key).post("/admin/jobs", json={"kind": kind, "params": params})


def test_a_queued_model_import_is_registered_by_the_worker_and_audited(stack):
    gguf = default_gguf()
    queued = submit(stack, "model.import", name="smol-job", path=str(gguf))
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert job["state"] == "queued" and job["created_by"]["role"] == "admin"
    done = wait_job(stack, job["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["model"] == "smol-job" and done["result"]["version"] == 1
    assert done["result"]["size"] == gguf.stat().st_size
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    versions = api(stack).get("/admin/models/smol-job").json()["versions"]
    assert [(v["version"], v["sha256"]) for v in versions] == [(1, done["result"]["sha256"])]
    audit = api(stack).get("/admin/audit", params={"target": "model/smol-job"}).json()
    assert audit[0]["action"] == "model.register" and audit[0]["outcome"] == "ok"
    assert audit[0]["request_id"] == job["id"] and audit[0]["key_name"] == done["created_by"]["key_name"]
    submitted = api(stack).get("/admin/audit", params={"action": "job.submit"}).json()
    assert any(e["detail"]["id"] == job["id"] for e in submitted)


def test_the_cli_queues_an_import_and_waits_for_it(stack, tmp_path):
    data = tmp_path / "tickets.csv"
    data.write_text("id,text\n1,hello\n2,world\n")
    out = cli(stack, "datasets", "upload", "tickets-job", str(data), "--server-path", "--background", "--json").stdout
    job = json.loads(out)
    waited = cli(stack, "jobs", "wait", job["id"]).stdout
    assert f"{job['id']}  dataset.import  succeeded" in waited and "rows=2" in waited
    listed = cli(stack, "jobs", "list", "--state", "succeeded").stdout
    assert job["id"] in listed and "tickets-job" in listed
    usage = cli(stack, "models", "register", "x", str(data), "--background", check=False)
    assert usage.returncode == 2 and "--background needs --server-path" in usage.stderr


def test_bad_jobs_are_refused_before_anything_is_queued(stack):
    before = api(stack).get("/admin/jobs").json()
    cases = [
        ({"kind": "model.train", "params": {}}, "kind", "unknown job kind 'model.train'"),
        ({"kind": "model.import", "params": {"name": "x"}}, "params.path", "Missing required parameter 'params.path'"),
        ({"kind": "model.import", "params": {"name": "x", "path": "relative/model.gguf"}}, "params.path", "must be absolute"),
        ({"kind": "model.import", "params": {"name": "x", "path": "/m.gguf", "colour": "red"}}, "params",
         "unknown field `colour`"),
        ({"kind": "dataset.import", "params": {"name": "x", "path": "/d.csv", "format": "xlsx"}}, "params.format",
         "Invalid value for 'params.format'"),
        ({"params": {}}, "kind", "Missing required parameter 'kind'"),
    ]
    for body, param, message in cases:
        answer = api(stack).post("/admin/jobs", json=body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert message in error["message"] and (param is None or error["param"] == param), (body, error)
    developer = json.loads(appliance("keys", "create", "dev-jobs", "--role", "developer", "--json", home=stack.home).stdout)["key"]
    deadline = time.monotonic() + 10  # the gateway reloads keys every second
    while (denied := submit(stack, "model.import", developer, name="x", path="/m.gguf")).status_code == 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # a developer submits jobs, but an import reads a file on the server: operators and admins only
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "params.path", denied.text
    assert api(stack).get("/admin/jobs").json() == before
    missing = api(stack).get("/admin/jobs/job_000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id"
    assert api(stack).get("/admin/jobs", params={"state": "done"}).json()["error"]["param"] == "state"


def test_a_job_whose_file_is_not_a_model_fails_with_the_reason(stack, tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not weights")
    job = wait_job(stack, submit(stack, "model.import", name="smol-bad", path=str(not_a_model)).json()["id"])
    assert job["state"] == "failed" and "unknown model format" in job["message"] and job["result"] is None
    gone = wait_job(stack, submit(stack, "model.import", name="smol-bad", path=str(tmp_path / "absent.gguf")).json()["id"])
    assert gone["state"] == "failed" and "no such file or directory" in gone["message"]
    audit = api(stack).get("/admin/audit", params={"target": "model/smol-bad"}).json()
    assert [e["outcome"].split(":")[0] for e in audit] == ["refused", "refused"]
    assert api(stack).get("/admin/models/smol-bad").status_code == 404


def test_a_cancelled_job_never_runs(stack, tmp_path):
    data = tmp_path / "never.csv"
    data.write_text("a\n1\n")
    pid = worker_pid(stack)
    os.kill(pid, signal.SIGSTOP)  # the worker takes nothing from the queue while stopped
    try:
        job = submit(stack, "dataset.import", name="never-imported", path=str(data)).json()
        cancelled = api(stack).post(f"/admin/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        again = api(stack).post(f"/admin/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and "only a queued job or a running fine-tuning job can be cancelled" in \
            again.json()["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    marker = submit(stack, "dataset.import", name="after-cancel", path=str(data)).json()
    assert wait_job(stack, marker["id"])["state"] == "succeeded"  # the queue moved past the cancelled job
    assert api(stack).get(f"/admin/jobs/{job['id']}").json()["state"] == "cancelled"
    assert api(stack).get("/admin/datasets/never-imported").status_code == 404


def test_a_job_cut_off_by_a_killed_worker_is_marked_interrupted_and_the_worker_comes_back(stack, tmp_path):
    fifo = tmp_path / "blocked.gguf"
    os.mkfifo(fifo)  # reading it blocks until a writer comes: the job stays running
    job = submit(stack, "model.import", name="smol-cut", path=str(fifo)).json()
    wait_job(stack, job["id"], states=("running",))
    pid = worker_pid(stack)
    os.kill(pid, signal.SIGKILL)
    interrupted = wait_job(stack, job["id"], states=("failed",), timeout=30)
    assert "interrupted" in interrupted["message"]
    assert worker_pid(stack) != pid
    data = tmp_path / "after.csv"
    data.write_text("a\n1\n")
    after = submit(stack, "dataset.import", name="after-restart", path=str(data)).json()
    assert wait_job(stack, after["id"])["state"] == "succeeded"


def test_the_worker_names_a_health_address_it_cannot_use(tmp_path):
    import socket

    runtime = tmp_path / "gateway.json"
    runtime.write_text(json.dumps({"home": str(tmp_path / "home"), "profile": "t", "gateway": {}, "models": []}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = appliance("worker", "--runtime", str(runtime), "--health", f"127.0.0.1:{port}", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot answer health checks on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
