"""A job's log on the shared stack: the real worker writes what a job did, line by line, and
GET /admin/jobs/{id}/log and `appliance jobs logs [--follow]` page through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from appliance.objectstore import S3Settings
from tests.conftest import BIN, default_gguf
from tests.gateway.test_model_registry import api, cli
from tests.services.test_worker import submit, wait_job, worker_pid

pytestmark = pytest.mark.stack


def log_of(stack, job_id: str, **params) -> dict:
    answer = api(stack).get(f"/admin/jobs/{job_id}/log", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_job_run_by_the_worker_logs_what_it_did_in_order(stack, stack_store: S3Settings):
    gguf = default_gguf()
    job = wait_job(stack, submit(stack, "model.import", name="smol-logged", path=str(gguf)).json()["id"])
    assert job["state"] == "succeeded", job
    page = log_of(stack, job["id"])
    assert page["job"] == api(stack).get(f"/admin/jobs/{job['id']}").json()
    result = job["result"]
    assert [line["text"] for line in page["lines"]] == [
        f"queued by {job['created_by']['key_name']}",
        f"started model.import: name=smol-logged, path={gguf}",
        f"reading the model card of {gguf} ({gguf.stat().st_size} bytes), then hashing and uploading it "
        f"to the object store at {stack_store.endpoint}",
        f"registered model smol-logged version 1, sha256 {result['sha256']}",
        f"succeeded: model=smol-logged, version=1, sha256={result['sha256']}, size={result['size']}",
    ]
    assert [line["seq"] for line in page["lines"]] == [1, 2, 3, 4, 5] and page["next"] == 5
    times = [line["at"] for line in page["lines"]]
    assert job["created_at"] <= times[0] and times == sorted(times) and abs(times[-1] - job["finished_at"]) < 1

    middle = log_of(stack, job["id"], after=2, limit=2)
    assert [line["seq"] for line in middle["lines"]] == [3, 4] and middle["next"] == 4
    rest = log_of(stack, job["id"], after=middle["next"])
    assert [line["seq"] for line in rest["lines"]] == [5] and rest["next"] == 5
    assert log_of(stack, job["id"], after=5) == {**rest, "lines": []}  # `next` stays where it was


def test_a_failed_and_a_cancelled_job_say_why_in_their_logs(stack, tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not weights")
    failed = wait_job(stack, submit(stack, "model.import", name="logged-not-a-model", path=str(not_a_model)).json()["id"])
    lines = [line["text"] for line in log_of(stack, failed["id"])["lines"]]
    assert lines[-1] == f"failed: {failed['message']}" and "unknown model format" in lines[-1]
    assert lines[-2].startswith(f"reading the model card of {not_a_model} (11 bytes)")

    pid = worker_pid(stack)
    os.kill(pid, signal.SIGSTOP)  # the worker takes nothing from the queue while stopped
    try:
        queued = submit(stack, "dataset.import", name="never-logged", path=str(not_a_model)).json()
        assert api(stack).post(f"/admin/jobs/{queued['id']}/cancel").status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    by = queued["created_by"]["key_name"]
    assert [line["text"] for line in log_of(stack, queued["id"])["lines"]] == [f"queued by {by}", f"cancelled by {by}"]


def test_bad_log_requests_name_the_parameter(stack, tmp_path):
    missing = api(stack).get("/admin/jobs/job_000000000000/log")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id", missing.text
    job_id = submit(stack, "model.import", name="logged-absent", path=str(tmp_path / "absent.gguf")).json()["id"]
    for params, param in [({"after": -1}, "after"), ({"after": "x"}, "after"), ({"after": 2**63}, "after"),
                          ({"limit": 0}, "limit"), ({"limit": 10_001}, "limit")]:
        answer = api(stack).get(f"/admin/jobs/{job_id}/log", params=params)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (params, answer.text)


def follow(stack, job_id: str, *args: str) -> subprocess.Popen:
    """`appliance jobs logs JOB --follow` in the background, its output unbuffered, with Ctrl-C's
    SIGINT as a terminal delivers it: a pytest started in the background of a non-interactive
    shell ignores SIGINT, and its children would inherit that (Python then never installs its
    KeyboardInterrupt handler)."""
    env = {**os.environ, "APPLIANCE_URL": stack.root, "APPLIANCE_KEY": stack.admin_key, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(BIN / "appliance"), "jobs", "logs", job_id, "--follow", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"`jobs logs --follow` printed nothing; it exited with {proc.poll()}: {proc.stderr.read()}"
    return line


def test_the_cli_prints_the_log_and_follows_a_job_until_it_ends(stack, tmp_path):
    data = tmp_path / "followed.csv"
    data.write_text("id,text\n1,hello\n")
    pid = worker_pid(stack)
    os.kill(pid, signal.SIGSTOP)
    try:
        job = submit(stack, "dataset.import", name="followed", path=str(data)).json()
        followed = follow(stack, job["id"])
        interrupted = follow(stack, job["id"], "--json")
        assert first_line(followed).endswith(f"  queued by {job['created_by']['key_name']}\n")
        assert json.loads(first_line(interrupted))["seq"] == 1
        interrupted.send_signal(signal.SIGINT)  # Ctrl-C ends --follow quietly
        out, err = interrupted.communicate(timeout=30)
        assert interrupted.returncode == 0 and out == "" and err == "", err
        assert followed.poll() is None  # still following the queued job
    finally:
        os.kill(pid, signal.SIGCONT)
    out, err = followed.communicate(timeout=60)  # it ends once the job has
    assert followed.returncode == 0, err
    assert out.splitlines()[-1].endswith("  succeeded: dataset=followed, version=1, sha256="
                                         f"{wait_job(stack, job['id'])['result']['sha256']}, rows=1")

    printed = cli(stack, "jobs", "logs", job["id"]).stdout.splitlines()
    texts = [line["text"] for line in log_of(stack, job["id"])["lines"]]
    assert [line.split("  ", 1)[1] for line in printed] == texts and len(texts) == 5
    assert all(time.strptime(line.split("  ")[0], "%Y-%m-%d %H:%M:%S") for line in printed)
    old_name = cli(stack, "jobs", "log", job["id"], "--json").stdout.splitlines()  # `log`: still accepted
    as_json = [json.loads(line) for line in old_name]
    assert as_json == log_of(stack, job["id"])["lines"]
    unknown = cli(stack, "jobs", "logs", "job_000000000000", check=False)
    assert unknown.returncode == 1 and "no job 'job_000000000000'" in unknown.stderr
