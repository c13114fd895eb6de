"""A `gate` job's work: evaluate a new version as its model's quality gate asks, and the
deployed version too unless it has an evaluation with the very same settings already,
then record the verdict on the new version (appliance/gates.py). Each evaluation is an
`eval` job and run of its own (experiment `gate-<model>`), run here, in this job."""

from __future__ import annotations

import msgspec

from appliance import deployments, evaluation, gates, jobs, model_registry
from appliance.gates import Check, Gate
from services.worker.evaluation import evaluate
from services.worker.runner import Work


def check(work: Work) -> tuple[dict, dict]:
    asked = msgspec.convert(work.params, Check)
    version = model_registry.get_version(work.db, asked.model, asked.version)
    gate = gates.rule(work.db, asked.model)
    if gate is None:
        gates.record(work.db, version["id"], "passed", "the model has no quality gate any more", job=work.job["id"])
        return {"state": "passed"}, {"state": "passed"}
    try:
        score, evaluated = _score(work, gate, asked.model, asked.version)
        baseline = gates.deployed_version(work.db, asked.model)
        base = None
        if baseline is not None and baseline["version"] != asked.version and gate.max_drop is not None:
            work.note(f"the deployed version is {asked.model} version {baseline['version']}")
            base_score, base_job = _score(work, gate, asked.model, baseline["version"])
            base = (baseline["version"], base_score)
        state, reason = gates.verdict(gate, score, base)
    except Exception as exc:
        reason = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}: {exc}"
        gates.record(work.db, version["id"], "error", f"the evaluation failed: {reason}", job=work.job["id"])
        raise
    detail = {"state": state, "reason": reason, gate.metric: score, "evaluation": evaluated}
    if base is not None:
        detail |= {"baseline_version": base[0], "baseline_score": base[1], "baseline_evaluation": base_job}
    gates.record(work.db, version["id"], state, reason, job=work.job["id"], **{k: v for k, v in detail.items()
                                                                              if k not in ("state", "reason")})
    work.note(f"{asked.model} version {asked.version} {state} its quality gate: {reason}")
    return {"model": asked.model, "version": asked.version, **detail}, detail


def _score(work: Work, gate: Gate, model: str, version: int) -> tuple[float, str]:
    """The gate's metric for one version (0..1), and the evaluation job it comes from: an
    earlier one with the same settings, else one run now."""
    served = {m.name for m in work.served} | {d["name"] for d in deployments.running(work.db)}
    asked = evaluation.resolve(work.db, gates.evaluation_of(gate, model, version, gates.experiment_of(model)), served)
    wanted = msgspec.to_builtins(asked)
    for job in jobs.list_jobs(work.db, state="succeeded", limit=10_000):
        if job["kind"] == "eval" and job["params"] == wanted and gate.metric in (job["result"] or {}):
            work.note(f"{model} version {version}: {gate.metric} from evaluation {job['id']}")
            return job["result"][gate.metric], job["id"]
    job = jobs.create(work.db, "eval", asked, jobs.actor_of(work.job))
    work.note(f"evaluating {model} version {version} as job {job['id']}")
    claimed = jobs.claim(work.db, job["id"])
    try:
        result, _ = evaluate(Work(work.db, work.store, claimed, work.home, work.served, work.enqueue))
    except Exception as exc:
        jobs.finish(work.db, job["id"], error=exc.message if hasattr(exc, "message") else f"{type(exc).__name__}: {exc}")
        raise
    jobs.finish(work.db, job["id"], result=result)
    if gate.metric not in result:
        raise gates.GateError(f"evaluation {job['id']} has no {gate.metric} score (no sample could be scored on it)")
    return result[gate.metric], job["id"]

