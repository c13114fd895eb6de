"""Fine-tuning on the job queue, on the real stack: the default model (GGUF) trained with a
LoRA adapter by the worker (torch, transformers, peft on the CPU), registered as a version
served by llama.cpp on its base, deployed and answering through the openai SDK; a job
refused before it is queued; a worker killed midway that resumes from its checkpoint; a
running job cancelled; and the served template checked against the training's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from appliance import model_registry
from appliance.config import ModelConfig
from tests.conftest import DEFAULT_MODEL, default_gguf, running_engine
from tests.gateway.test_model_registry import api

pytestmark = pytest.mark.stack

SYSTEM = "You are a helpful assistant."
PAIRS = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
         ("What colour is the sky?", "Blue."), ("Name a fruit.", "An apple."),
         ("What is the opposite of hot?", "Cold."), ("How many legs has a cat?", "Four.")]
JOB_S = 600  # a generous bound: a job loads the model (seconds) and trains a few steps of 0.3 s


def chat_rows() -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in PAIRS]


def register(stack, tmp_path: Path, name: str, rows: list[dict]) -> dict:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer = api(stack).post(f"/admin/datasets/{name}/versions", json={"path": str(path)})
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def base(stack) -> dict:
    """The profile's default model: the first fine-tune naming it registers its GGUF file as
    version 1 (here one refused for its dataset, which still registers the base), once."""
    assert api(stack).get(f"/admin/models/{DEFAULT_MODEL}").status_code == 404
    for _ in range(2):
        refused = submit(stack, base=DEFAULT_MODEL, dataset="ft-none")
        assert refused.json()["error"]["param"] == "params.dataset", refused.text
    [version] = api(stack).get(f"/admin/models/{DEFAULT_MODEL}").json()["versions"]
    assert version["version"] == 1 and version["source"] == f"the profile's model {DEFAULT_MODEL}"
    assert version["sha256"] == hashlib.sha256(default_gguf().read_bytes()).hexdigest()
    registered = api(stack).get("/admin/audit", params={"action": "model.register",
                                                        "target": f"model/{DEFAULT_MODEL}"}).json()
    assert len(registered) == 1, registered
    return api(stack).get(f"/admin/models/{DEFAULT_MODEL}/versions/1").json()


def submit(stack, **params) -> httpx.Response:
    return api(stack).post("/admin/jobs", json={"kind": "finetune", "params": params})


def wait_job(stack, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = JOB_S) -> dict:
    deadline = time.monotonic() + timeout
    while (job := api(stack).get(f"/admin/jobs/{job_id}").json())["state"] not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {log(stack, job_id)[-5:]}"
        time.sleep(0.5)
    return job


def log(stack, job_id: str) -> list[str]:
    return [line["text"] for line in api(stack).get(f"/admin/jobs/{job_id}/log").json()["lines"]]


def wait_log(stack, job_id: str, pattern: str, timeout: float = JOB_S) -> str:
    deadline = time.monotonic() + timeout
    while not (found := next((t for t in log(stack, job_id) if re.search(pattern, t)), None)):
        assert time.monotonic() < deadline, f"no log line like {pattern!r}: {log(stack, job_id)[-5:]}"
        time.sleep(0.3)
    return found


def losses(lines: list[str]) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for t in lines if (m := re.match(r"step (\d+)/\d+ loss ([0-9.]+)", t))}


def test_bad_requests_are_refused_before_anything_is_queued(stack, base, tmp_path):
    register(stack, tmp_path, "ft-chat", chat_rows())
    register(stack, tmp_path, "ft-plain", [{"id": 1, "text": "no instruction here"}])
    register(stack, tmp_path, "ft-pii", [{"instruction": "Who to mail?", "response": "Write to kim@example.com."}])
    before = len(api(stack).get("/admin/jobs", params={"limit": 10_000}).json())
    cases = [
        ({"base": "nope", "dataset": "ft-chat"}, "params.base", "no registered model"),
        ({"base": DEFAULT_MODEL, "base_version": 9, "dataset": "ft-chat"}, "params.base_version", "no version 9"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-plain"}, "params.dataset", "'messages' column"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-pii"}, "params.allow_pii", "unmasked PII (1 email)"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-chat", "split": "ds_nope"}, "params.split", "no split"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-chat", "steps": 3, "epochs": 1}, "params", "not both"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-chat", "lora": {"rank": 0}}, "params.lora.rank", ">= 1"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-chat", "learning_rate": "fast"}, "params.learning_rate", "float"),
        ({"base": DEFAULT_MODEL, "dataset": "ft-chat", "name": "bad name!"}, "params.name", "not valid"),
    ]
    for params, param, words in cases:
        answer = submit(stack, **params)
        assert answer.status_code == 400, (params, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"], (params, error)
    assert len(api(stack).get("/admin/jobs", params={"limit": 10_000}).json()) == before
    # A role below developer may not start one.
    viewer = api(stack).post("/admin/keys", json={"name": "ft-viewer", "role": "viewer"}).json()["key"]
    assert api(stack, viewer).post("/admin/jobs", json={"kind": "finetune", "params": {
        "base": DEFAULT_MODEL, "dataset": "ft-chat"}}).status_code == 403


def test_a_job_trains_registers_a_served_version_and_the_template_is_the_trainings(stack, stack_store, base,
                                                                                    tmp_path):
    register(stack, tmp_path, "ft-train", chat_rows())
    answer = submit(stack, base=DEFAULT_MODEL, dataset="ft-train", name="ft-tuned", steps=8, batch_size=2,
                    learning_rate=1e-3, checkpoint_every=4, sequence_length=128, experiment="ft-tests")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["params"]["base_version"] == 1 and job["params"]["shape"]["kind"] == "chat"
    # Followed live as server-sent events, from the queue to the end.
    events: list[tuple[str, dict]] = []
    with api(stack) as client, connect_sse(client, "GET", f"/admin/jobs/{job['id']}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            events.append((event.event, event.json()))
            if event.event == "end":
                break
    done = events[-1][1]
    lines = log(stack, job["id"])
    assert done["state"] == "succeeded", lines[-5:]
    assert [e["text"] for kind, e in events if kind == "log"] == lines
    metrics = {e["step"]: e["metrics"] for kind, e in events if kind == "metrics"}
    loss = losses(lines)
    assert sorted(metrics) == sorted(loss) == list(range(1, 9)) and loss[8] < loss[1], loss  # it learned
    assert all(metrics[s]["loss"] == pytest.approx(loss[s], abs=1e-4) and metrics[s]["tokens_per_s"] > 0
               for s in metrics)
    assert any("checkpoint at step 4" in t for t in lines)

    version = api(stack).get(f"/admin/models/ft-tuned/versions/{done['result']['version']}").json()
    assert version["format"] == "gguf-lora" and version["base_id"] == base["id"]
    lineage = version["lineage"]
    assert lineage["job"] == job["id"] and lineage["base"]["sha256"] == base["sha256"]
    assert lineage["dataset"]["name"] == "ft-train" and lineage["params"]["lora"]["rank"] == 8
    assert lineage["metrics"]["loss"] == pytest.approx(loss[8], rel=1e-4)
    assert {"torch", "transformers", "peft"} <= set(lineage["environment"]["packages"])
    assert version["card"]["base_model"] == f"{DEFAULT_MODEL} v1" and version["card"]["fine_tuned_from"]["job"] == job["id"]

    # The adapter on its base, in llama.cpp's own server: the prompt it renders for a chat is
    # the one training rendered, byte for byte (the same GGUF file carries the template).
    from transformers import AutoTokenizer

    adapter = model_registry.materialize(stack_store.open(), version, tmp_path / "cache")
    gguf = default_gguf()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PAIRS[0][0]}]
    trained = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    model = ModelConfig(name="ft-direct", engine="llamacpp", path=str(gguf), context_length=512,
                        extra_args=["--lora", str(adapter)])
    with running_engine(model, tmp_path) as (command, _):
        root = command.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {command.api_key}"}
        served = httpx.post(f"{root}/apply-template", json={"messages": messages}, headers=headers, timeout=30)
        assert served.json()["prompt"] == trained
        assert [a["path"] for a in httpx.get(f"{root}/lora-adapters", headers=headers).json()] == [str(adapter)]

    # Deployed like any version, it answers through the gateway.
    deployed = api(stack).post("/admin/deployments", json={"model": "ft-tuned", "version": version["version"],
                                                          "name": "ft-served", "context_length": 512})
    assert deployed.status_code in (201, 202), deployed.text
    try:
        deadline = time.monotonic() + 180
        while "ft-served" not in [m["id"] for m in api(stack).get("/v1/models").json()["data"]]:
            state = api(stack).get("/admin/deployments/ft-served").json()
            assert state["state"] != "failed" and time.monotonic() < deadline, state
            time.sleep(0.5)
        reply = stack.client().chat.completions.create(model="ft-served", max_tokens=16, temperature=0,
                                                       messages=messages)
        assert reply.choices[0].message.content.strip()
    finally:
        api(stack).delete("/admin/deployments/ft-served")

    # The base and the fine-tuned version evaluated on the training questions, every metric
    # and a judge (the default model), then compared: the tuned one learnt the short answers.
    register(stack, tmp_path, "ft-eval", [{"question": q, "answer": a} for q, a in PAIRS])
    evaluations = []
    for model, version in ((DEFAULT_MODEL, None), ("ft-tuned", version["version"])):
        answer = api(stack).post("/admin/jobs", json={"kind": "eval", "params": {
            "model": model, "model_version": version, "dataset": "ft-eval", "system": SYSTEM, "max_tokens": 24,
            "judge": {"model": DEFAULT_MODEL, "max_tokens": 48}, "experiment": "ft-tests"}})
        assert answer.status_code == 202, answer.text
        evaluations.append(wait_job(stack, answer.json()["id"]))
    assert [e["state"] for e in evaluations] == ["succeeded", "succeeded"], [log(stack, e["id"])[-3:] for e in evaluations]
    finals = [api(stack).get(f"/admin/runs/{e['id']}").json()["final_metrics"] for e in evaluations]
    assert all({"exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL", "judge"} <= set(f) for f in finals)
    report = api(stack).get("/admin/evaluations/compare",
                            params={"ids": ",".join(e["id"] for e in evaluations), "metric": "token_f1"}).json()
    assert report["runs"][1]["model"]["name"] == "ft-tuned" and report["samples_compared"] == len(PAIRS)
    assert finals[1]["token_f1"] > finals[0]["token_f1"], finals  # "Paris." rather than a sentence about Paris


def test_a_worker_killed_midway_resumes_from_its_last_checkpoint(stack, base, tmp_path):
    register(stack, tmp_path, "ft-resume", chat_rows())
    job = submit(stack, base=DEFAULT_MODEL, dataset="ft-resume", name="ft-resumed", steps=12, checkpoint_every=3,
                 sequence_length=96, learning_rate=1e-3).json()
    wait_log(stack, job["id"], r"^checkpoint at step 3 ")
    [worker] = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
                if "worker" in p.cmdline()[3:5]]
    os.kill(worker.pid, signal.SIGKILL)
    resumed = wait_log(stack, job["id"], r"^resuming from the checkpoint at step \d+")
    done = wait_job(stack, job["id"])
    lines = log(stack, job["id"])
    assert done["state"] == "succeeded", lines[-5:]
    step = int(resumed.rsplit(" ", 1)[1])
    assert step in (3, 6, 9)
    starts = [t for t in lines if t.startswith("training steps")]
    assert len(starts) == 2 and starts[0].startswith("training steps 1-12 of 12") and \
        starts[1].startswith(f"training steps {step + 1}-12 of 12")  # the second start is not from step 1
    assert any("queued again, to resume from its last checkpoint" in t for t in lines)
    assert sorted(losses(lines)) == list(range(1, 13))  # every step, the ones after the checkpoint twice


def test_a_running_job_is_cancelled_within_seconds_and_keeps_its_checkpoint(stack, base, tmp_path):
    register(stack, tmp_path, "ft-cancel", chat_rows())
    job = submit(stack, base=DEFAULT_MODEL, dataset="ft-cancel", name="ft-cancelled", steps=5000, checkpoint_every=5000,
                 sequence_length=64).json()
    wait_log(stack, job["id"], r"^step 2/5000 ")
    asked = api(stack).post(f"/admin/jobs/{job['id']}/cancel")
    assert asked.status_code == 200 and asked.json()["cancel_requested_at"], asked.text
    started = time.monotonic()
    done = wait_job(stack, job["id"], timeout=60)
    assert done["state"] == "cancelled" and time.monotonic() - started < 30
    lines = log(stack, job["id"])
    assert any(re.match(r"checkpoint at step \d+ ", t) for t in lines) and "stopped at step" in done["message"]
    again = api(stack).post(f"/admin/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["param"] == "job_id"
