"""`appliance jobs ...`: background jobs through the admin API, run by the worker."""

from __future__ import annotations

import json
import time

import click

from appliance.admin_client import AdminApiError, AdminClient, make_client
from appliance.cli_format import emit, table, when
from appliance.cli_options import client_options, json_option
from appliance.jobs import FINISHED, STATES

LOG_PAGE = 1000  # log lines asked for at once
FOLLOW_POLL_S = 1.0


def submit(client: AdminClient, kind: str, params: dict, as_json: bool) -> None:
    """Queue a job and say how to follow it."""
    job = client.post("/admin/jobs", {"kind": kind, "params": params})
    emit(job, as_json, lambda j: f"queued {j['kind']} as {j['id']}; follow it with `appliance jobs logs -f {j['id']}`")


def wait_for(client: AdminClient, job_id: str, timeout: float) -> dict:
    """The job once it has finished; an error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    job = client.get(f"/admin/jobs/{job_id}")
    while job["state"] not in FINISHED:
        if time.monotonic() > deadline:
            raise AdminApiError(f"job {job_id} is still {job['state']} after {timeout:g} s")
        time.sleep(0.5)
        job = client.get(f"/admin/jobs/{job_id}")
    return job


def _summary(job: dict) -> str:
    line = f"{job['id']}  {job['kind']}  {job['state']}"
    if job["result"]:
        line += "  " + ", ".join(f"{k}={v}" for k, v in job["result"].items() if k != "sha256")
    if job["message"]:
        line += f"  ({job['message']})"
    return line


@click.group()
def jobs() -> None:
    """Background jobs (imports and fine-tuning): list, show, follow the log of, wait for, cancel."""


@jobs.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@client_options
@json_option()
def jobs_list(state, limit, url, key, home, as_json):
    """Jobs, newest first."""
    rows = make_client(url, key, home).get("/admin/jobs", state=state, limit=limit)
    emit(rows, as_json, lambda rs: table(
        [{**r, "created": when(r["created_at"]), "by": r["created_by"]["key_name"], "name": r["params"].get("name"),
          "message": r["message"]} for r in rs],
        ["id", "kind", "name", "state", "created", "by", "message"]))


@jobs.command("show")
@click.argument("job_id")
@client_options
@json_option()
def jobs_show(job_id, url, key, home, as_json):
    """One job: its parameters, state and result."""
    emit(make_client(url, key, home).get(f"/admin/jobs/{job_id}"), as_json, _summary)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines, about once a second, until the job has "
                                                   "finished (Ctrl-C stops).")
@client_options
@json_option("Print each line as a JSON object (seq, at, text), one per line.")
def jobs_log(job_id, follow, url, key, home, as_json):
    """A job's log: when it was queued and started, what it did, and how it ended."""
    client = make_client(url, key, home)
    after = 0
    try:
        while True:
            page = client.get(f"/admin/jobs/{job_id}/log", after=after, limit=LOG_PAGE)
            for line in page["lines"]:
                click.echo(json.dumps(line) if as_json else f"{when(line['at'])}  {line['text']}")
            after = page["next"]
            if len(page["lines"]) < LOG_PAGE:  # nothing more for now
                if not follow or page["job"]["state"] in FINISHED:
                    return
                time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:  # how --follow is stopped before the job ends
        return


# `jobs log`, the name before `logs`: still accepted, not listed.
jobs.add_command(click.Command("log", callback=jobs_log.callback, params=jobs_log.params, help=jobs_log.help,
                               hidden=True))


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds to wait.")
@client_options
@json_option()
def jobs_wait(job_id, timeout, url, key, home, as_json):
    """Wait until a job has finished; exits non-zero unless it succeeded."""
    job = wait_for(make_client(url, key, home), job_id, timeout)
    emit(job, as_json, _summary)
    if job["state"] != "succeeded":
        raise SystemExit(1)


@jobs.command("cancel")
@click.argument("job_id")
@client_options
def jobs_cancel(job_id, url, key, home):
    """Cancel a queued job, or stop a running fine-tuning job at its next step (its checkpoints are kept)."""
    job = make_client(url, key, home).post(f"/admin/jobs/{job_id}/cancel")
    click.echo(f"cancelled {job_id}" if job["state"] == "cancelled" else f"{job_id} stops at its next step")
