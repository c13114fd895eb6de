"""Engines that fail say why, on the real llama.cpp engine and default model with real
signals: the signal and its meaning in the engine's log, `appliance up`'s output and
/readyz; an engine answers a one-token warm-up before it counts as ready; one that crashes
once ready is restarted at once, however often (one client's request may be the cause);
one that keeps crashing at start is marked failed, and requests to its model get a 503
that carries the reason."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import msgspec
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_MODEL, default_gguf, engine_tasks, readiness, s3_env, start_stack, write_profile

pytestmark = pytest.mark.stack

MAX_CRASHES = 3
CRASH_WINDOW_S = 300
DEPLOYED = "fragile-deployed"
SIGILL_MEANING = "illegal instruction: this llama.cpp build uses CPU instructions this machine cannot run"


@pytest.fixture(scope="module")
def fragile(tmp_path_factory, s3_server):
    """A stack of its own that these tests break for good: the default model allows MAX_CRASHES crashes."""
    tmp = tmp_path_factory.mktemp("fragile")
    store = msgspec.structs.replace(s3_server, bucket_prefix="fragile-")
    weights = shutil.copyfile(default_gguf(), tmp / "fragile.gguf")  # broken by the last test
    profile = write_profile(tmp / "profile.yaml", None, storage=store,
                            model_keys={"path": weights, "max_crashes": MAX_CRASHES, "crash_window_s": CRASH_WINDOW_S})
    running = start_stack(tmp, profile, env=s3_env(store))
    yield running
    if running.proc.poll() is None:
        running.stop()


def engine_log(stack, model: str = DEFAULT_MODEL) -> str:
    return (stack.home / "logs" / f"engine-{model}-0.log").read_text()


def engine_state(stack, model: str = DEFAULT_MODEL) -> dict:
    """What the supervisor and the health check say of the replica, from its entry in /readyz."""
    entry = readiness(stack.root)["models"][model]["engines"][0]
    return {k: v for k, v in entry.items() if k not in ("base_url", "breaker", "in_flight")}


def wait_for(condition, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def crash(stack, model: str, signum: int) -> None:
    """Send `signum` to the model's engine; wait until it is ready again or marked failed.
    (The restart is too quick for a poll of /readyz to be sure to see it down.)"""
    [pid] = stack.engine_pids(model)
    restarts = engine_state(stack, model)["restarts"]
    os.kill(pid, signum)

    def back_or_failed() -> bool:
        state = engine_state(stack, model)
        back = state["restarts"] > restarts and state["state"] == "ready"
        return state["state"] == "failed" or (back and stack.engine_pids(model) not in ([], [pid]))

    wait_for(back_or_failed, f"{model} to come back after {signal.Signals(signum).name}")


def break_weights(stack, model: str) -> None:
    """Replace the weights the model's engine was started with by garbage: the running engine
    keeps the old file, every start after it fails."""
    [pid] = stack.engine_pids(model)
    argv = psutil.Process(pid).cmdline()
    path = Path(argv[argv.index("--model") + 1])
    garbage = path.with_name(path.name + ".garbage")
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    os.replace(garbage, path)


def admin(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=120)


def chat_error(stack, model: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as refused:
        stack.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    return refused.value


def test_an_engine_is_ready_once_it_answered_a_one_token_warm_up(fragile):
    # No client has asked anything yet: the one generation is the supervisor's warm-up.
    assert engine_tasks(engine_log(fragile)) == (1, 0)
    assert f"engine {DEFAULT_MODEL}#0 is ready (warm-up: one token in " in fragile.output.read_text()
    assert engine_state(fragile) == {"healthy": True, "replica": 0, "state": "ready", "restarts": 0}


def test_a_ready_engine_that_crashes_is_restarted_at_once_and_never_marked_failed(fragile):
    crash(fragile, DEFAULT_MODEL, signal.SIGILL)
    expected = f"killed by SIGILL ({SIGILL_MEANING})"
    assert f"engine {DEFAULT_MODEL}#0 died: {expected}; restarted at once (pid " in fragile.output.read_text()
    assert expected in engine_log(fragile)
    back = engine_state(fragile)
    assert (back["state"], back["restarts"], back["last_exit"]) == ("ready", 1, expected)
    # As a client repeating a request that crashes the engine would: more crashes than
    # max_crashes, each answered by a prompt restart, none counted against the model.
    for signum in [signal.SIGSEGV] * MAX_CRASHES:
        crash(fragile, DEFAULT_MODEL, signum)
    back = engine_state(fragile)
    assert (back["state"], back["restarts"]) == ("ready", 1 + MAX_CRASHES)
    assert "restarting in" not in fragile.output.read_text()  # no backoff was waited
    assert fragile.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3).choices


def test_a_deployed_engine_warms_up_then_fails_after_repeated_crashes_at_start(fragile):
    api = admin(fragile)
    with default_gguf().open("rb") as weights:
        registered = api.post("/admin/models/fragile/upload", params={"filename": default_gguf().name}, content=weights)
    assert registered.status_code == 201, registered.text
    deployed = api.post("/admin/deployments", json={"model": "fragile", "version": 1, "name": DEPLOYED, "context_length": 512})
    assert deployed.status_code < 300, deployed.text
    try:
        wait_for(lambda: api.get(f"/admin/deployments/{DEPLOYED}").json()["state"] == "running", "the deployment")
        assert engine_tasks(engine_log(fragile, DEPLOYED)) == (1, 0)
        assert f"engine {DEPLOYED}#0 is ready (warm-up: one token in " in fragile.output.read_text()
        wait_for(lambda: DEPLOYED in readiness(fragile.root)["models"], "the gateway to serve the deployment")
        break_weights(fragile, DEPLOYED)
        [pid] = fragile.engine_pids(DEPLOYED)
        os.kill(pid, signal.SIGKILL)  # restarted at once; every start then fails, with a growing backoff
        deployment = wait_for(lambda: (d := api.get(f"/admin/deployments/{DEPLOYED}").json())["state"] == "failed" and d,
                              "the deployment to be marked failed")
        # a deployment's replicas allow the default of 5 crashes at start in 600 s
        assert deployment["message"].startswith(f"every replica failed: engine {DEPLOYED}#0: 5 crashes within 600 s, "
                                                "the last: exited with code "), deployment["message"]
        assert f"engine {DEPLOYED}#0 died: killed by SIGKILL" in fragile.output.read_text()
        wait_for(lambda: readiness(fragile.root)["models"][DEPLOYED]["failed"] == 1, "/readyz to show the failure")
        refused = chat_error(fragile, DEPLOYED)
        assert refused.status_code == 503 and "every replica failed" in refused.message and "5 crashes" in refused.message
    finally:
        api.delete(f"/admin/deployments/{DEPLOYED}")
        wait_for(lambda: DEPLOYED not in readiness(fragile.root)["models"], "the undeploy")
    assert readiness(fragile.root)["status"] == "ready"


def test_repeated_crashes_at_start_mark_the_replica_failed_with_its_reason(fragile):
    break_weights(fragile, DEFAULT_MODEL)
    [pid] = fragile.engine_pids()
    os.kill(pid, signal.SIGSEGV)
    wait_for(lambda: engine_state(fragile)["state"] == "failed", "the replica to be marked failed")
    output = fragile.output.read_text()
    assert "restarting in 1 s" in output and "restarting in 2 s" in output  # the backoff doubles at start
    reason = f"{MAX_CRASHES} crashes within {CRASH_WINDOW_S} s, the last: exited with code "
    assert f"engine {DEFAULT_MODEL}#0 failed: {reason}" in output
    assert f"marked failed: {reason}" in engine_log(fragile)

    ready = wait_for(lambda: (r := readiness(fragile.root))["models"][DEFAULT_MODEL]["failed"] == 1 and r,
                     "/readyz to show the failure")
    assert ready["status"] == "not ready" and ready["waiting_for"] == [DEFAULT_MODEL]
    [replica] = ready["models"][DEFAULT_MODEL]["engines"]
    assert replica["state"] == "failed" and replica["reason"].startswith(reason) and not replica["healthy"]

    samples = [s for family in text_string_to_metric_families(httpx.get(fragile.root + "/metrics").text)
               for s in family.samples if s.name == "appliance_replicas_failed"]
    assert [(s.labels["model"], s.value) for s in samples if s.labels["model"] == DEFAULT_MODEL] == [(DEFAULT_MODEL, 1.0)]

    refused = chat_error(fragile, DEFAULT_MODEL)
    assert refused.status_code == 503
    assert f"every replica failed (replica #0: {reason}" in refused.message

    time.sleep(2.5)  # past the next backoff: nothing restarts it
    assert fragile.engine_pids() == []
