"""Quality gates on the real stack: a gated model's new versions are evaluated when they are
registered, against the version deployed; one as good passes, a worse one (the same
weights with a broken chat template) is refused deployment with the reason, unless forced."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import BIN, default_gguf
from tests.gateway.test_evaluation import QA, SYSTEM
from tests.gateway.test_finetune import log, register, wait_job
from tests.gateway.test_model_registry import api, cli

pytestmark = pytest.mark.stack

MODEL = "gated"
BROKEN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no turns, no answer prompt


def gguf_copy(tmp_path, name: str, *options: str):
    """The default model's file with other metadata (so another SHA-256), by gguf-py's own tool."""
    out = tmp_path / f"{name}.gguf"
    subprocess.run([str(BIN / "gguf-new-metadata"), *options, str(default_gguf()), str(out)], check=True,
                   capture_output=True)
    return out


def register_version(stack, path) -> dict:
    answer = api(stack).post(f"/admin/models/{MODEL}/versions", json={"path": str(path)})
    assert answer.status_code == 201, answer.text
    return answer.json()


def gate_of(stack, version: int) -> dict:
    row = api(stack).get(f"/admin/models/{MODEL}/versions/{version}").json()
    wait_job(stack, row["gate"]["job"], timeout=300)
    return api(stack).get(f"/admin/models/{MODEL}/versions/{version}").json()["gate"]


def test_a_worse_version_is_refused_deployment_and_an_equal_one_passes(stack, tmp_path):
    register(stack, tmp_path, "gate-qa", [{"question": q, "answer": a} for q, a in QA])
    first = register_version(stack, default_gguf())
    assert first["gate"] is None  # no gate yet: deployable as it is
    deployed = api(stack).post("/admin/deployments", json={"model": MODEL, "version": 1, "name": "gated-served",
                                                          "context_length": 512})
    assert deployed.status_code == 201, deployed.text
    deadline = time.monotonic() + 120
    while (state := api(stack).get("/admin/deployments/gated-served").json()["state"]) != "running":
        assert state not in ("failed",) and time.monotonic() < deadline, state
        time.sleep(0.5)
    try:
        # A gate that cannot work is refused, naming what is wrong.
        for body, param in [({"dataset": "gate-qa", "metric": "f1", "max_drop": 1}, "metric"),
                            ({"dataset": "gate-qa", "metric": "token_f1"}, "max_drop"),
                            ({"dataset": "nope", "metric": "token_f1", "max_drop": 1}, "dataset"),
                            ({"dataset": "gate-qa", "metric": "judge", "max_drop": 1}, "judge")]:
            refused = api(stack).put(f"/admin/models/{MODEL}/gate", json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)
        out = cli(stack, "models", "gate", "set", MODEL, "--dataset", "gate-qa", "--metric", "token_f1",
                  "--max-drop", "5", "--system", SYSTEM, "--max-tokens", "16").stdout
        assert out.startswith(f"gate set: {MODEL}: at most 5 points below the deployed version") and "gate-qa v1" in out

        # The same weights under another name: as good as the deployed version.
        same = register_version(stack, gguf_copy(tmp_path, "same", "--general-name", "same weights"))
        assert same["gate"]["state"] == "pending"
        verdict = gate_of(stack, same["version"])
        assert verdict["state"] == "passed" and "against deployed version 1's" in verdict["reason"], verdict
        assert verdict["baseline_version"] == 1 and verdict["evaluation"] != verdict["baseline_evaluation"]

        # A broken chat template: the answers are worse, and deployment is refused with why.
        broken = register_version(stack, gguf_copy(tmp_path, "broken", "--chat-template", BROKEN_TEMPLATE))
        verdict = gate_of(stack, broken["version"])
        assert verdict["state"] == "failed" and "points below deployed version 1's" in verdict["reason"], verdict
        lines = log(stack, broken["gate"]["job"])
        assert any(f"from evaluation {verdict['baseline_evaluation']}" in t for t in lines)  # the baseline's, reused
        refused = api(stack).post("/admin/deployments", json={"model": MODEL, "version": broken["version"],
                                                             "name": "gated-broken"})
        assert refused.status_code == 409 and refused.json()["error"]["param"] == "version"
        assert "has not passed its quality gate: failed: token_f1" in refused.json()["error"]["message"]
        shown = cli(stack, "models", "show", f"{MODEL}:{broken['version']}").stdout
        assert "quality gate: failed: token_f1" in shown
        forced = api(stack).post("/admin/deployments", json={"model": MODEL, "version": broken["version"],
                                                            "name": "gated-broken", "force": True})
        assert forced.status_code == 201, forced.text
        audited = api(stack).get("/admin/audit", params={"action": "deployment.create",
                                                         "target": "deployment/gated-broken"}).json()
        assert audited[0]["detail"]["forced_past_gate"] is True
        api(stack).delete("/admin/deployments/gated-broken")

        # A version the worker registers (an import job here; a fine-tune the same way) queues its check too.
        imported = api(stack).post("/admin/jobs", json={"kind": "model.import", "params": {
            "name": MODEL, "path": str(gguf_copy(tmp_path, "imported", "--general-name", "imported weights"))}})
        assert imported.status_code == 202, imported.text
        done = wait_job(stack, imported.json()["id"], timeout=120)
        assert done["state"] == "succeeded" and any("has a quality gate" in t for t in log(stack, done["id"]))
        assert gate_of(stack, done["result"]["version"])["state"] == "passed"

        # Checked again on asking; the gate cleared, any version deploys.
        again = api(stack).post(f"/admin/models/{MODEL}/versions/{same['version']}/gate")
        assert again.status_code == 202 and gate_of(stack, same["version"])["state"] == "passed"
        assert cli(stack, "models", "gate", "clear", MODEL).stdout.strip() == f"{MODEL} has no quality gate now"
        assert api(stack).get(f"/admin/models/{MODEL}/gate").status_code == 404
        # A check goes through the gate's own route (which marks the version pending), not /admin/jobs.
        direct = api(stack).post("/admin/jobs", json={"kind": "gate", "params": {"model": MODEL, "version": 1}})
        assert direct.status_code == 400 and direct.json()["error"]["param"] == "kind"
    finally:
        api(stack).delete("/admin/deployments/gated-served")
