"""The appliance's own alerting: the rules of appliance/alerts.py evaluated every
alerts.interval_s, and their alerts sent to the rules' channels (services/gateway/notify.py).

One gateway worker evaluates: the one that holds the lock on home/run/alerter.lock (the
others try again at each interval, so another takes over when it stops). It reads the
gateway's own metrics as a scrape would (every worker's, summed), keeps the scrapes of the
longest rule window, and measures each rule's kind over them the way the shipped
Prometheus rules do (deploy/prometheus/appliance-rules.yml); token_surge reads the usage
rollups instead. A condition that holds opens a pending alert, which fires once it has held
for the rule's for_s: the FIRING message goes out then, again every alerts.repeat_s while it
fires, and a RESOLVED message once the condition no longer holds. Until the scrapes span a
rule's window (just after a start), that rule's alerts can fire but not resolve. A message
a channel did not take is tried again at the next evaluations, for RETRY_S.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import generate_latest

from appliance import alerts
from appliance.analytics import summarize
from appliance.config import AlertChannelSpec, AlertRuleSpec
from appliance.db import open_db
from appliance.errors import DeliveryFailed
from appliance.home import run_dir
from appliance.scrapes import Scrape, increases, quantile
from services.gateway.notify import deliver

if TYPE_CHECKING:
    from services.gateway.app import Gateway

log = logging.getLogger("appliance.alerts")

RETRY_S = 600.0  # a message not taken is tried again at each evaluation for this long
LATENCY_QUANTILE = 0.95


class Finding(NamedTuple):
    """A subject whose condition holds: its labels, the value measured, and what it means."""

    labels: dict[str, str]
    value: float
    summary: str


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m" if seconds >= 60 else f"{seconds:g}s"


class Scrapes:
    """The last scrapes, enough for the longest window."""

    def __init__(self) -> None:
        self.history: deque[Scrape] = deque()

    def add(self, scrape: Scrape, keep_s: float) -> None:
        self.history.append(scrape)
        while len(self.history) > 2 and scrape.at - self.history[1].at >= keep_s:
            self.history.popleft()

    def pair(self, window_s: float) -> tuple[Scrape, Scrape, bool] | None:
        """The newest scrape, the newest one at least `window_s` older (else the oldest), and
        whether the scrapes span the window."""
        if len(self.history) < 2:
            return None
        new = self.history[-1]
        old = next((s for s in reversed(self.history) if new.at - s.at >= window_s), self.history[0])
        return new, old, new.at - old.at >= window_s

    @property
    def latest(self) -> Scrape | None:
        return self.history[-1] if self.history else None


def _increase_by(new: Scrape, old: Scrape, name: str, label: str,
                 keep: Callable[[dict[str, str]], bool] = lambda _: True) -> dict[str, float]:
    """increase(name[window]) summed by `label`, over the series `keep` keeps."""
    sums: dict[str, float] = {}
    for labels, value in increases(new.select(name, None), old.select(name, None)).items():
        named = dict(labels)
        if label in named and keep(named):
            sums[named[label]] = sums.get(named[label], 0.0) + value
    return sums


class Measured(NamedTuple):
    findings: dict[str, Finding]  # subject -> finding, where the condition holds
    complete: bool  # the data spans the rule's window: a subject not found has recovered


def measure(rule: AlertRuleSpec, scrapes: Scrapes) -> Measured | None:
    """The subjects of `rule` (any kind but token_surge, which reads the usage rollups) whose
    condition holds now; None when it cannot be measured yet."""
    threshold, window = alerts.threshold_of(rule), alerts.window_of(rule)
    wanted = (lambda labels: rule.model in (labels.get("model"), labels.get("gen_ai_request_model"))) \
        if rule.model else (lambda _: True)
    if window is None:
        latest = scrapes.latest
        if latest is None:
            return None
        return Measured(_now(rule.kind, latest, threshold), True)
    pair = scrapes.pair(window)
    if pair is None:
        return None
    new, old, complete = pair
    found: dict[str, Finding] = {}
    if rule.kind == "error_rate":
        answered = _increase_by(new, old, "appliance_requests_total", "model", wanted)
        failed = _increase_by(new, old, "appliance_requests_total", "model",
                              lambda labels: wanted(labels) and labels["status"].startswith("5"))
        for model, count in answered.items():
            share = failed.get(model, 0.0) / count if count else 0.0
            if count >= alerts.MIN_REQUESTS and share > threshold:
                found[model] = Finding({"model": model}, share, f"{model}: {share:.1%} of {count:.0f} answers were "
                                       f"server errors (5xx) in the last {_span(window)}")
    elif rule.kind == "latency":
        buckets: dict[str, dict[float, float]] = {}
        name = "gen_ai_server_request_duration_seconds_bucket"
        for labels, count in increases(new.select(name, None), old.select(name, None)).items():
            named = dict(labels)
            if wanted(named):
                model = buckets.setdefault(named["gen_ai_request_model"], {})
                model[float(named["le"])] = model.get(float(named["le"]), 0.0) + count
        for model, counts in buckets.items():
            p95 = quantile(LATENCY_QUANTILE, counts)
            if p95 is not None and p95 > threshold:
                found[model] = Finding({"model": model}, p95, f"{model}: p95 latency {p95:.2f} s over the last "
                                       f"{_span(window)} (threshold {threshold:g} s)")
    elif rule.kind == "engine_crash_loop":
        restarts = _increase_by(new, old, "appliance_engine_restarts_total", "model", wanted)
        failed = {m: v for m, v in new.by("appliance_replicas_failed", "model", wanted).items() if v > 0}
        for model in sorted(set(restarts) | set(failed)):
            count = restarts.get(model, 0.0)
            if count >= threshold or model in failed:
                what = [f"{count:.0f} engine restarts in the last {_span(window)}"] if count else []
                what += [f"{failed[model]:.0f} replica(s) marked failed after repeated crashes"] if model in failed else []
                found[model] = Finding({"model": model}, max(count, threshold if model in failed else 0.0),
                                       f"{model}: {' and '.join(what)}")
    return Measured(found, complete)


def _now(kind: str, latest: Scrape, threshold: float) -> dict[str, Finding]:
    """The kinds that read the state now: GPUs and budgets."""
    found: dict[str, Finding] = {}
    if kind in ("gpu_memory", "gpu_temperature"):
        total = latest.by("appliance_gpu_memory_total_bytes", "gpu")
        for gpu, value in latest.by("appliance_gpu_memory_used_bytes" if kind == "gpu_memory"
                                    else "appliance_gpu_temperature_celsius", "gpu").items():
            if kind == "gpu_memory" and total.get(gpu):
                share = value / total[gpu]
                if share > threshold:
                    found[f"gpu {gpu}"] = Finding({"gpu": gpu}, share, f"GPU {gpu}: {share:.1%} of its memory in use "
                                                  f"({value / 2**30:.1f} of {total[gpu] / 2**30:.1f} GiB)")
            elif kind == "gpu_temperature" and value > threshold:
                found[f"gpu {gpu}"] = Finding({"gpu": gpu}, value, f"GPU {gpu}: {value:.0f} °C (threshold {threshold:g} °C)")
    elif kind == "budget":
        for unit in ("tokens", "cost"):
            spent = latest.select(f"appliance_budget_spent_{unit}", None)
            for labels, limit in latest.select(f"appliance_budget_{unit}", None).items():
                named = dict(labels)
                share = spent.get(labels, 0.0) / limit if limit else 1.0
                subject = f"{named['scope']} {named['name']}"
                if share >= threshold and share > found.get(subject, Finding({}, -1.0, "")).value:
                    found[subject] = Finding(
                        {"scope": named["scope"], "name": named["name"], "period": named["period"]}, share,
                        f"{named['scope']} {named['name']}: {share:.0%} of its {named['period']}ly {unit} budget spent "
                        f"({spent.get(labels, 0.0):g} of {limit:g})")
    return found


class Alerter:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.config = gateway.runtime.alerts
        self.scrapes = Scrapes()
        self.lock_path = run_dir(Path(gateway.runtime.home)) / "alerter.lock"
        self._lock_fd: int | None = None

    def leading(self) -> bool:
        """This worker holds the alerter's lock (taking it if no other worker does)."""
        if self._lock_fd is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                if self.leading():
                    await self.evaluate()
            except Exception:
                log.exception("evaluating the alert rules failed; trying again in %g s", self.config.interval_s)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def scrape(self) -> Scrape:
        await self.gateway.state_metrics.refresh()
        text = await asyncio.to_thread(generate_latest, self.gateway.metrics.registry)
        return Scrape.parse(text.decode(), time.monotonic())

    async def evaluate(self) -> None:
        now = time.time()
        rules, channels, active = await asyncio.to_thread(self._read)
        windows = [alerts.window_of(r) or 0.0 for r in rules.values() if r.kind != "token_surge"]  # scrapes kept
        self.scrapes.add(await self.scrape(), max(windows, default=0.0) + 2 * self.config.interval_s)
        measurable = [r for r in rules.values() if r.enabled]
        surges = await asyncio.to_thread(self._token_surges, [r for r in measurable if r.kind == "token_surge"], now)
        sends = []
        seen: set[tuple[str, str]] = set()
        for rule in measurable:
            measured = Measured(surges[rule.name], True) if rule.kind == "token_surge" else measure(rule, self.scrapes)
            if measured is None:
                seen |= {key for key in active if key[0] == rule.name}
                continue
            for subject, finding in measured.findings.items():
                seen.add((rule.name, subject))
                sends += await asyncio.to_thread(self._holds, rule, subject, finding, active.get((rule.name, subject)), now)
            if not measured.complete:
                seen |= {key for key in active if key[0] == rule.name}
        for key, alert in active.items():
            if key not in seen:
                sends += await asyncio.to_thread(self._cleared, alert, rules.get(alert["rule"]), now)
        sends += await asyncio.to_thread(self._retries, now)
        await self._send(sends, channels, rules)

    def _read(self) -> tuple[dict[str, AlertRuleSpec], dict[str, AlertChannelSpec], dict]:
        db = open_db(self.gateway.db_path, migrate=False)
        try:
            return (alerts.effective_rules(self.config, db), alerts.effective_channels(self.config, db),
                    alerts.active(db))
        finally:
            db.conn.close()

    def _write(self, work: Callable) -> list:
        db = open_db(self.gateway.db_path, migrate=False)
        try:
            return work(db)
        finally:
            db.conn.close()

    def _holds(self, rule: AlertRuleSpec, subject: str, finding: Finding, alert: dict | None, now: float) -> list:
        """The condition holds: open, fire, or send again what fires. Returns the (alert, event) to send."""
        def work(db) -> list:
            current = alert or alerts.open_alert(db, rule, subject, finding.labels, finding.value, finding.summary, now)
            fields = {"value": finding.value, "summary": finding.summary, "updated_at": now}
            sends = []
            if current["state"] == "pending" and now - current["started_at"] >= rule.for_s:
                fields |= {"state": "firing", "fired_at": now, "notified_at": now}
                sends.append("firing")
            elif current["state"] == "firing" and now - (current["notified_at"] or 0) >= self.config.repeat_s:
                fields["notified_at"] = now
                sends.append("firing")
            alerts.update_alert(db, current["id"], **fields)
            return [({**current, **fields}, event) for event in sends]
        return self._write(work)

    def _cleared(self, alert: dict, rule: AlertRuleSpec | None, now: float) -> list:
        """The condition no longer holds (or its rule is gone): a pending alert is dropped, a firing one resolved."""
        def work(db) -> list:
            if alert["state"] == "pending":
                db.execute("DELETE FROM alerts WHERE id = ?", [alert["id"]])
                return []
            summary = alert["summary"] if rule is not None and rule.enabled else f"{alert['summary']} (rule removed)"
            fields = {"state": "resolved", "resolved_at": now, "updated_at": now, "notified_at": now,
                      "summary": summary}
            alerts.update_alert(db, alert["id"], **fields)
            return [({**alert, **fields}, "resolved")]
        return self._write(work)

    def _retries(self, now: float) -> list:
        """Messages a channel did not take, first tried less than RETRY_S ago: sent again."""
        def work(db) -> list:
            retried = []
            for alert in alerts.list_alerts(db, limit=1000):
                failed = [name for name, d in alert["deliveries"].items()
                          if d["error"] and d["event"] == alert["state"] and now - d["since"] < RETRY_S]
                if failed and alert["updated_at"] >= now - RETRY_S:
                    retried.append((alert, alert["state"], failed))
            return retried
        return self._write(work)

    def _token_surges(self, rules: list[AlertRuleSpec], now: float) -> dict[str, dict[str, Finding]]:
        if not rules:
            return {}
        db = open_db(self.gateway.db_path, migrate=False)
        try:
            return {rule.name: self._surges(db, rule, now) for rule in rules}
        finally:
            db.conn.close()

    @staticmethod
    def _surges(db, rule: AlertRuleSpec, now: float) -> dict[str, Finding]:
        window, factor = alerts.window_of(rule), alerts.threshold_of(rule)
        by = ("key", "model") if rule.model else ("key",)
        keep = (lambda row: row.get("model") == rule.model) if rule.model else (lambda _: True)
        recent = {r["key_id"]: r for r in summarize(db, since=now - window, by=by) if keep(r) and r["key_id"]}
        if not recent:
            return {}
        before = {r["key_id"]: r["total_tokens"] for r in summarize(db, since=now - window - alerts.BASELINE_S,
                                                                    until=now - window, by=by) if keep(r)}
        found = {}
        for key_id, row in recent.items():
            average = before.get(key_id, 0) * window / alerts.BASELINE_S
            if average >= alerts.MIN_TOKENS and row["total_tokens"] > factor * average:
                name = row.get("key_name") or key_id
                found[f"key {key_id}"] = Finding(
                    {"key": name, **({"model": rule.model} if rule.model else {})}, row["total_tokens"] / average,
                    f"key {name}: {row['total_tokens']:,} tokens in the last {_span(window)}, "
                    f"{row['total_tokens'] / average:.1f} times its average of {average:,.0f} over the 7 days before")
        return found

    async def _send(self, sends: list, channels: dict[str, AlertChannelSpec], rules: dict[str, AlertRuleSpec]) -> None:
        """Each (alert, event[, only these channels]) to the channels of its rule, all at once; what each
        channel answered goes in the alert's deliveries."""
        if not sends:
            return
        jobs = []
        for alert, event, *only in sends:
            rule = rules.get(alert["rule"])
            names = (only[0] if only else None) or (rule.channels if rule is not None and rule.channels else list(channels))
            jobs += [(alert, event, name) for name in names if name in channels]
        outcomes = await asyncio.gather(*(self._deliver(channels[name], alert, event) for alert, event, name in jobs))
        by_alert: dict[int, dict] = {}
        for (alert, event, name), error in zip(jobs, outcomes):
            deliveries = by_alert.setdefault(alert["id"], dict(alert["deliveries"]))
            before = deliveries.get(name, {})
            again = before.get("event") == event and before.get("error")  # a retry: its first try stays the start
            deliveries[name] = {"event": event, "at": time.time(), "error": error,
                                "since": before["since"] if again else time.time(),
                                "attempts": before["attempts"] + 1 if again else 1}
        await asyncio.to_thread(self._write, lambda db: [alerts.update_alert(db, alert_id, deliveries=deliveries)
                                                         for alert_id, deliveries in by_alert.items()])

    @staticmethod
    async def _deliver(channel: AlertChannelSpec, alert: dict, event: str) -> str | None:
        try:
            await deliver(channel, alert, event)
        except DeliveryFailed as exc:
            log.warning("alert %s (%s) not sent to %s: %s", alert["rule"], event, channel.name, exc.message)
            return exc.message
        except Exception as exc:  # a bug must not stop the other channels
            log.exception("alert %s (%s) not sent to %s", alert["rule"], event, channel.name)
            return f"{type(exc).__name__}: {exc}"
        return None


async def send_test(channel: AlertChannelSpec) -> None:
    """A test message to `channel`; DeliveryFailed if it was not taken."""
    await deliver(channel, {"channel": channel.name}, "test")

