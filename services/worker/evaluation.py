"""An evaluation job's work: the model answers each sample's input, the answers are scored
(appliance/eval_metrics.py; a judge model where asked), and every sample and the run's
aggregates are recorded (appliance/evaluation.py, appliance/experiments.py).

A served model is called at its engines' own endpoints, as the gateway calls them; a
registered version is served for the job on a temporary llama.cpp engine, planned like a
deployment, and stopped at the end. Answers are asked for `concurrency` at a time; the
samples are written in order as they finish, with a log line every PROGRESS_EVERY.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import msgspec

from appliance import __version__, dataset_registry, deployments, evaluation, experiments, model_registry, prompts
from appliance.errors import ApplianceError, InvalidRequest
from appliance.eval_metrics import RULE_METRICS, corpus_bleu, judge_score, score
from appliance.evaluation import Evaluate
from appliance.home import cache_dir
from appliance.config import Profile
from appliance.planning.engine_builds import check_engine_builds
from appliance.planning.planner import make_plan
from appliance.planning.probe import probe
from services.engines.deployments import version_model
from services.engines.launch import replica_process
from services.worker.runner import Work

PROGRESS_EVERY = 10  # samples between progress lines in the job's log
TEMPORARY_CONTEXT = 4096  # the temporary engine's context, tokens
REQUEST_TIMEOUT_S = 300.0


class EvaluationError(ApplianceError):
    status = 400


@dataclass(frozen=True)
class Endpoint:
    """Where a model answers: an OpenAI API root, its key, and the model name it expects."""

    base_url: str
    api_key: str | None
    model: str

    def chat(self, client: httpx.Client, messages: list[dict], *, max_tokens: int, temperature: float,
             seed: int, response_format: dict | None = None) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "seed": seed, **({"response_format": response_format} if response_format else {})}
        answer = client.post(f"{self.base_url}/chat/completions", headers=headers, timeout=REQUEST_TIMEOUT_S,
                             json=body)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code} from the engine: {answer.text[:300]}")
        return answer.json()["choices"][0]["message"]["content"] or ""


def evaluate(work: Work) -> tuple[dict, dict]:
    job = msgspec.convert(work.params, Evaluate)
    job_id = work.job["id"]
    data = dataset_registry.get_version(work.db, job.dataset, job.dataset_version)
    rows = dataset_registry.rows(work.db, work.store, data, cache_dir(work.home, "datasets"), split=job.split,
                                 part="test")
    picked = _pick(len(rows), job)
    version = (model_registry.get_version(work.db, job.model, job.model_version)
               if job.model_version is not None else None)
    experiments.start_run(work.db, job_id, job.experiment, _recorded(job, version, data),
                          created_by=work.job["created_by"]["key_id"],
                          base_version_id=version["id"] if version else None, dataset_version_id=data["id"],
                          environment={"appliance": __version__})
    work.note(f"evaluating {job.name} on {len(picked)} of {len(rows)} rows of {job.dataset} v{data['version']}"
              + (f" (split {job.split}, test part)" if job.split else "")
              + (f" with prompt template {job.prompt.name} v{job.prompt.version}" if job.prompt else "")
              + f": {', '.join(job.metrics)}")
    judge = _served_endpoint(work, job.judge.model, "params.judge.model") if job.judge else None
    with _target(work, job, version) as target, httpx.Client() as client:
        samples = _answer_and_score(work, job, rows, picked, target, judge, client)
    final = _aggregates(job, samples)
    experiments.finish_run(work.db, job_id, final_metrics=final, artifacts=[])
    work.note("scores: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return {"model": job.name, "samples": len(samples), **final}, {"samples": len(samples), **final}


def _pick(count: int, job: Evaluate) -> list[int]:
    """The rows evaluated, in order: all, or `sample` of them chosen by the seed (quick mode)."""
    if job.sample is None or job.sample >= count:
        return list(range(count))
    return sorted(random.Random(job.seed).sample(range(count), job.sample))


def _recorded(job: Evaluate, version: dict | None, data: dict) -> dict:
    params = msgspec.to_builtins(job)
    params["model"] = {"name": job.model, "version": job.model_version, "sha256": version["sha256"] if version else None}
    params["dataset"] = {"name": job.dataset, "version": data["version"], "split": job.split}
    for key in ("model_version", "dataset_version", "split", "experiment", "name"):
        params.pop(key, None)
    return params


def _served_endpoint(work: Work, name: str, param: str) -> Endpoint:
    """A served model's first replica: a profile model (the worker's runtime) or a deployment."""
    for served in work.served:
        if served.name == name and served.replicas:
            replica = served.replicas[0]
            return Endpoint(replica.base_url, replica.resolved_key(), served.upstream_model or name)
    for row in deployments.running(work.db):
        if row["name"] == name and row["endpoints"]:
            endpoint = row["endpoints"][0]
            return Endpoint(endpoint["base_url"], endpoint.get("api_key"), name)
    raise InvalidRequest(f"model {name!r} is not served any more", param=param)


@contextlib.contextmanager
def _target(work: Work, job: Evaluate, version: dict | None) -> Iterator[Endpoint]:
    """The evaluated model's endpoint: served, or a temporary engine on a registered version."""
    if version is None:
        yield _served_endpoint(work, job.model, "params.model")
        return
    name = f"eval-{work.job['id']}"
    model = version_model(work.db, work.store, work.home, version["id"], name=name, engine="llamacpp", replicas=1,
                          context_length=TEMPORARY_CONTEXT)
    machine = probe(work.home)
    plan = make_plan(Profile(name=name, models=[model]), [machine])
    check_engine_builds(plan, machine)
    planned = plan.model(name)
    child, endpoint = replica_process(model, planned, planned.replicas[0], 0, work.home)
    work.note(f"starting a temporary llama.cpp engine for {job.name}")
    child.start()
    try:
        child.wait_ready()
        work.note(f"temporary engine ready ({child.ready_note})")
        yield Endpoint(endpoint.base_url, endpoint.api_key, name)
    finally:
        child.stop()


def _messages(job: Evaluate, row: dict, template: prompts.Template | None) -> list[dict]:
    """A sample's chat: the prompt template's rendering (its variables from the row's columns),
    else the system prompt; then the input, where the template has no user part."""
    system, user = row.get("system") or job.system, None
    if template is not None:
        declared = {v["name"] for v in template.versions[job.prompt.version][0]["variables"]}
        parts = template.render(job.prompt.version, {k: v for k, v in row.items() if k in declared})
        system, user = parts.get("system", system), parts.get("user")
    return [*([{"role": "system", "content": str(system)}] if system else []),
            {"role": "user", "content": user if user is not None else str(row[job.input_column])}]


def _answer_and_score(work: Work, job: Evaluate, rows: list[dict], picked: list[int], target: Endpoint,
                      judge: Endpoint | None, client: httpx.Client) -> list[dict]:
    rules = [m for m in job.metrics if m in RULE_METRICS]
    template = prompts.load(work.db, job.prompt.name) if job.prompt else None

    def one(position: int) -> dict:
        index = picked[position]
        row = rows[index]
        reference = row[job.reference_column]
        sample = {"idx": position, "row": index, "input": str(row[job.input_column]), "reference": reference,
                  "answer": None, "scores": {}, "judge_output": None, "error": None, "latency_s": None}
        try:
            messages = _messages(job, row, template)
        except InvalidRequest as exc:  # this row's values do not fit the template
            sample["error"] = f"the prompt template could not be rendered: {exc.message}"
            return sample
        sample["input"] = messages[-1]["content"]  # what the model was asked, as a template rendered it
        started = time.monotonic()
        try:
            sample["answer"] = target.chat(client, messages, max_tokens=job.max_tokens,
                                           temperature=job.temperature, seed=job.seed)
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
            sample["error"] = f"the model did not answer: {exc}"
            return sample
        sample["latency_s"] = round(time.monotonic() - started, 4)
        sample["scores"] = score(sample["answer"], reference, rules) if rules else {}
        if judge is not None:
            _judge(job, judge, client, sample)
        return sample

    samples: list[dict] = []
    with ThreadPoolExecutor(max_workers=job.concurrency) as pool:
        for sample in pool.map(one, range(len(picked))):
            samples.append(sample)
            if len(samples) % PROGRESS_EVERY == 0 or len(samples) == len(picked):
                unwritten = (len(samples) - 1) // PROGRESS_EVERY * PROGRESS_EVERY
                evaluation.record_samples(work.db, work.job["id"], samples[unwritten:])
                work.note(f"sample {len(samples)}/{len(picked)}")
    return samples


def _judge(job: Evaluate, judge: Endpoint, client: httpx.Client, sample: dict) -> None:
    reference = sample["reference"] if isinstance(sample["reference"], str) else " | ".join(sample["reference"])
    prompt = job.judge.rubric.format(input=sample["input"], reference=reference, answer=sample["answer"],
                                     scale=job.judge.scale)
    try:
        said = judge.chat(client, [{"role": "user", "content": prompt}], max_tokens=job.judge.max_tokens,
                          temperature=0.0, seed=job.seed,
                          response_format=_verdict_format(job.judge.scale) if job.judge.structured else None)
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        sample["judge_output"] = f"(the judge did not answer: {exc})"
        return
    sample["judge_output"] = said
    value = judge_score(said, job.judge.scale)
    if value is not None:
        sample["scores"]["judge"] = (value - 1) / (job.judge.scale - 1)  # 0..1, like the others


def _verdict_format(scale: int) -> dict:
    """JSON with a score in 1..scale and a reason: the engine's grammar holds the judge to it."""
    return {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["score", "reason"],
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": scale}, "reason": {"type": "string"}}}}}


def _aggregates(job: Evaluate, samples: list[dict]) -> dict:
    """Means over the answered samples (BLEU: corpus BLEU), and the counts of what went wrong."""
    answered = [s for s in samples if s["error"] is None]
    out: dict[str, float] = {}
    for metric in job.metrics:
        values = [s["scores"][metric] for s in answered if metric in s["scores"]]
        if metric == "bleu" and answered:
            out["bleu"] = corpus_bleu([s["answer"] for s in answered], [s["reference"] for s in answered])
        elif values:
            out[metric] = statistics.fmean(values)
    if "judge" in job.metrics:
        out["judge_unparsed"] = sum(1 for s in answered if "judge" not in s["scores"])
    out["samples"] = len(samples)
    out["errors"] = len(samples) - len(answered)
    if answered:
        out["latency_s"] = statistics.fmean(s["latency_s"] for s in answered)
    return out
