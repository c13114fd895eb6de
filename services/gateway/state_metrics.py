"""Metrics read at scrape time from the appliance's state rather than counted per request:
the GPUs (NVML: memory, utilisation, temperature, power, and the memory of each engine
process), the engine replicas' restarts, jobs by state, the backup's lag, and each
budget's spend and limit.

Before /metrics answers, `refresh()` takes the readings off the event loop, each kept a
few seconds (the GPUs and the backup through /admin/system's readings,
services/gateway/system.py), so a scrape every second costs little; `collect()` then
turns the last readings into metric families. With several gateway workers these come
from the one worker that answers the scrape: they describe the machine, not the worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import budgets, keys, teams
from appliance.db import open_db
from appliance.limits import KEY_SUBJECT, TEAM_SUBJECT
from services.gateway.system import Reading

if TYPE_CHECKING:
    from services.gateway.app import Gateway

STATE_READING_S = 5.0  # how long the jobs' and budgets' readings are kept

GPU_LABELS = ["gpu", "name", "uuid"]
# name -> (type, help, labels): every family collect() may yield, for describe() and the docs
FAMILIES = {
    "appliance_gpu_memory_used_bytes": ("gauge", "GPU memory in use (NVML).", GPU_LABELS),
    "appliance_gpu_memory_total_bytes": ("gauge", "GPU memory in all (NVML).", GPU_LABELS),
    "appliance_gpu_utilization_ratio": ("gauge", "Share of the last sample period the GPU was busy, 0 to 1.",
                                        GPU_LABELS),
    "appliance_gpu_temperature_celsius": ("gauge", "GPU core temperature.", GPU_LABELS),
    "appliance_gpu_power_watts": ("gauge", "GPU power draw.", GPU_LABELS),
    "appliance_gpu_process_memory_bytes": (
        "gauge", "GPU memory of each compute process NVML lists, with the engine replica it is when the gateway "
        "knows its pid (model and replica empty otherwise: a training job, another program).",
        ["gpu", "pid", "model", "replica"]),
    "appliance_engine_restarts": ("counter", "Restarts of an engine replica by its supervisor since it started.",
                                  ["model", "replica"]),
    "appliance_jobs": ("gauge", "Jobs by kind and state.", ["kind", "state"]),
    "appliance_jobs_oldest_queued_seconds": ("gauge", "How long the oldest queued job has waited.", []),
    "appliance_backup_lag_seconds": ("gauge", "How far a replicated database's replica is behind.", ["database"]),
    "appliance_budget_spent_tokens": ("gauge", "Tokens a key's or team's budget has spent this period.",
                                      ["scope", "name", "period"]),
    "appliance_budget_tokens": ("gauge", "A key's or team's token budget for the period.", ["scope", "name", "period"]),
    "appliance_budget_spent_cost": ("gauge", "What a key's or team's budget has spent this period, in the "
                                    "profile's currency.", ["scope", "name", "period", "currency"]),
    "appliance_budget_cost": ("gauge", "A key's or team's cost budget for the period.",
                              ["scope", "name", "period", "currency"]),
}


def _family(name: str) -> Metric:
    kind, documentation, labels = FAMILIES[name]
    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return family(name, documentation, labels=labels)


def read_jobs(db_path) -> dict:
    db = open_db(db_path, migrate=False)
    try:
        counts = db.execute("SELECT kind, state, count(*) FROM jobs GROUP BY 1, 2").fetchall()
        oldest = db.execute("SELECT min(created_at) FROM jobs WHERE state = 'queued'").fetchone()[0]
    finally:
        db.conn.close()
    return {"counts": counts, "oldest_queued_at": oldest}


def read_budgets(db_path, gateway: Gateway) -> list[tuple[str, str, budgets.Spend]]:
    """(scope, name, spend) of every active key and team with a budget."""
    db = open_db(db_path, migrate=False)
    try:
        owners = [("key", k.name, KEY_SUBJECT + k.id, k.limits) for k in keys.list_keys(db, include_revoked=False)]
        owners += [("team", t.name, TEAM_SUBJECT + t.id, t.limits) for t in teams.list_teams(db)]
    finally:
        db.conn.close()
    owners = [o for o in owners if budgets.budgeted(o[3])]
    if not owners or gateway.governor is None:
        return []
    spent = budgets.spending(gateway.governor, [(subject, limits) for _, _, subject, limits in owners],
                             gateway.runtime.costs.currency)
    return [(scope, name, spend) for (scope, name, _, _), spend in zip(owners, spent)]


class StateCollector(Collector):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.jobs = Reading(partial(read_jobs, gateway.db_path), STATE_READING_S)
        self.budgets = Reading(partial(read_budgets, gateway.db_path, gateway), STATE_READING_S)
        self.system: dict = {}
        self.job_counts: dict = {"counts": [], "oldest_queued_at": None}
        self.spend: list = []

    async def refresh(self) -> None:
        self.system = await self.gateway.system.snapshot()
        self.job_counts = await self.jobs.get()
        self.spend = await self.budgets.get()

    def describe(self) -> Iterator[Metric]:
        return (_family(name) for name in FAMILIES)

    def collect(self) -> Iterator[Metric]:
        families = {name: _family(name) for name in FAMILIES}
        self._gpus(families)
        for pool in self.gateway.pools.values():
            for replica in pool.replicas:
                if replica.status is not None:
                    families["appliance_engine_restarts"].add_metric(
                        [pool.served.name, str(replica.status.replica)], replica.status.restarts)
        for kind, state, count in self.job_counts["counts"]:
            families["appliance_jobs"].add_metric([kind, state], count)
        oldest = self.job_counts["oldest_queued_at"]
        families["appliance_jobs_oldest_queued_seconds"].add_metric([], time.time() - oldest if oldest else 0.0)
        for database in self.system.get("backup") or []:
            if database["lag_s"] is not None:
                families["appliance_backup_lag_seconds"].add_metric([database["name"]], database["lag_s"])
        for scope, name, spend in self.spend:
            labels = [scope, name, spend.period]
            if spend.budget_tokens is not None:
                families["appliance_budget_spent_tokens"].add_metric(labels, spend.tokens)
                families["appliance_budget_tokens"].add_metric(labels, spend.budget_tokens)
            if spend.budget_cost is not None:
                families["appliance_budget_spent_cost"].add_metric([*labels, spend.currency], spend.cost)
                families["appliance_budget_cost"].add_metric([*labels, spend.currency], spend.budget_cost)
        return iter(families.values())

    def _gpus(self, families: dict[str, Metric]) -> None:
        engines = {replica.status.pid: (pool.served.name, str(replica.status.replica))
                   for pool in self.gateway.pools.values() for replica in pool.replicas
                   if replica.status is not None and replica.status.pid}
        for gpu in self.system.get("gpus") or []:
            labels = [str(gpu["index"]), gpu["name"], gpu.get("uuid", "")]
            families["appliance_gpu_memory_used_bytes"].add_metric(labels, gpu["memory_used_bytes"])
            families["appliance_gpu_memory_total_bytes"].add_metric(labels, gpu["memory_total_bytes"])
            for name, value, scale in (("appliance_gpu_utilization_ratio", gpu.get("utilization_percent"), 0.01),
                                       ("appliance_gpu_temperature_celsius", gpu.get("temperature_c"), 1),
                                       ("appliance_gpu_power_watts", gpu.get("power_watts"), 1)):
                if value is not None:
                    families[name].add_metric(labels, value * scale)
            for process in gpu.get("processes") or []:
                if process["memory_bytes"] is not None:
                    model, replica = engines.get(process["pid"], ("", ""))
                    families["appliance_gpu_process_memory_bytes"].add_metric(
                        [str(gpu["index"]), str(process["pid"]), model, replica], process["memory_bytes"])
