"""The shipped Prometheus rules and Grafana dashboard: promtool checks the rules and runs
their unit tests; a real Prometheus (Debian's) scrapes the live gateway with the config
`appliance render monitoring` writes, evaluates every rule, fires the budget rule when a key
spends its budget, and answers every query of the dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from appliance import alerts
from installer.monitoring import DASHBOARD, RULES, shipped
from tests.conftest import DEFAULT_MODEL, appliance, free_port

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="Prometheus is not installed (.ci/run installs Debian's prometheus)")

KIND_OF = {"ApplianceErrorRate": "error_rate", "ApplianceLatency": "latency", "ApplianceTokenSurge": "token_surge",
           "ApplianceGpuMemory": "gpu_memory", "ApplianceGpuTemperature": "gpu_temperature",
           "ApplianceEngineCrashLoop": "engine_crash_loop", "ApplianceBudget": "budget"}

UNIT_TESTS = """\
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'appliance_engine_restarts_total{{model="m", replica="0"}}'
        values: '0 1 2 3 3 3 3 3 3 3 3 3 3 3 3 3'
      - series: 'appliance_requests_total{{model="m", endpoint="chat/completions", status="200"}}'
        values: '0+10x10'
      - series: 'appliance_requests_total{{model="m", endpoint="chat/completions", status="502"}}'
        values: '0+2x10'
      - series: 'appliance_budget_spent_tokens{{scope="key", name="ci", period="day"}}'
        values: '95'
      - series: 'appliance_budget_tokens{{scope="key", name="ci", period="day"}}'
        values: '100'
    alert_rule_test:
      - eval_time: 4m
        alertname: ApplianceEngineCrashLoop
        exp_alerts:
          - exp_labels: {{severity: critical, model: m}}
            exp_annotations:
              summary: "m: an engine replica keeps crashing (3 restarts in 10m, or marked failed)"
      - eval_time: 15m
        alertname: ApplianceEngineCrashLoop
        exp_alerts: []
      - eval_time: 1m
        alertname: ApplianceErrorRate
        exp_alerts: []
      - eval_time: 8m
        alertname: ApplianceErrorRate
        exp_alerts:
          - exp_labels: {{severity: critical, model: m}}
            exp_annotations:
              summary: "m: 16.67% of answers were server errors (5xx) in 5m"
      - eval_time: 1m
        alertname: ApplianceBudget
        exp_alerts:
          - exp_labels: {{severity: warning, scope: key, name: ci, period: day}}
            exp_annotations:
              summary: "key ci: 95% of its dayly budget spent"
"""


def rules_file(tmp_path):
    path = tmp_path / RULES
    path.write_bytes(shipped(RULES))
    return path


def test_promtool_checks_the_rules_and_their_unit_tests_pass(tmp_path):
    rules = rules_file(tmp_path)
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 8 rules found" in checked.stdout, checked.stdout + checked.stderr
    tests = tmp_path / "rules.test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES))
    tested = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rules_say_what_the_built_in_rules_say():
    """Thresholds and durations: the Prometheus rules and appliance/alerts.py cannot drift apart."""
    rules = {r["alert"]: r for r in yaml.safe_load(shipped(RULES))["groups"][0]["rules"]}
    defaults = {r.kind: r for r in alerts.DEFAULT_RULES}
    assert set(KIND_OF.values()) == set(alerts.KINDS) == set(defaults)
    for name, kind in KIND_OF.items():
        rule, default = rules[name], defaults[kind]
        threshold = f"{alerts.threshold_of(default):g}"
        assert f"> {threshold}" in rule["expr"] or f">= {threshold}" in rule["expr"], (name, threshold)
        assert rule.get("for", "0s") == (f"{default.for_s / 60:g}m" if default.for_s else "0s"), name
        assert rule["labels"]["severity"] == default.severity, name


def query(prometheus: str, expr: str) -> dict:
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.mark.stack
def test_a_real_prometheus_scrapes_the_gateway_and_evaluates_the_rules(observed, tmp_path):
    out = tmp_path / "monitoring"
    appliance("render", "monitoring", "--out", str(out), "--gateway", f"127.0.0.1:{observed.port}")
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES] and (out / RULES).read_bytes() == shipped(RULES)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (out / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(["prometheus", f"--config.file={out / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    prometheus = f"http://127.0.0.1:{port}"
    try:
        admin = httpx.Client(base_url=observed.root, headers={"Authorization": f"Bearer {observed.admin_key}"})
        # Counted from its first request (a limit puts it in the ledger), then given a budget it has nearly spent.
        spender = admin.post("/admin/keys", json={"name": "prom-budget", "rpm": 1000, "period": "day"}).json()
        answer = httpx.post(f"{observed.base_url}/chat/completions", timeout=60,
                            headers={"Authorization": f"Bearer {spender['key']}"},
                            json={"model": DEFAULT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200, answer.text
        used = answer.json()["usage"]["total_tokens"]
        assert admin.patch(f"/admin/keys/{spender['id']}", json={"budget_tokens": used + 1}).status_code == 200

        deadline, firing = time.monotonic() + 60, []
        while time.monotonic() < deadline and not firing:
            time.sleep(0.5)
            try:
                found = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            except httpx.HTTPError:
                continue
            firing = [a for a in found if a["labels"]["alertname"] == "ApplianceBudget"
                      and a["labels"]["name"] == "prom-budget" and a["state"] == "firing"]
        assert firing, (tmp_path / "prometheus.log").read_text()[-2000:]

        [target] = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
        assert target["health"] == "up", target
        groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
        evaluated = [(r["name"], r["health"]) for g in groups for r in g["rules"]]
        assert len(evaluated) == 8 and all(health == "ok" for _, health in evaluated), evaluated
        healthy = query(prometheus, f'appliance_replicas_healthy{{model="{DEFAULT_MODEL}"}}')["data"]["result"]
        assert healthy and healthy[0]["value"][1] == "1"

        dashboard = json.loads(shipped(DASHBOARD))
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
                answer = query(prometheus, expr)
                assert answer["status"] == "success", (panel["title"], expr, answer)
    finally:
        server.terminate()
        server.wait(20)
