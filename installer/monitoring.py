"""The files that let an organisation's own Prometheus and Grafana watch the appliance: a
scrape config for the gateway's /metrics, the alert rules (appliance/monitoring/
prometheus-rules.yml: the conditions of the appliance's built-in rules) and a dashboard."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

RULES, DASHBOARD = "prometheus-rules.yml", "grafana-dashboard.json"
SCRAPE_INTERVAL_S = 15


def shipped(name: str) -> bytes:
    return importlib.resources.files("appliance.monitoring").joinpath(name).read_bytes()


def prometheus_config(target: str, rules: str, metrics_key_file: str | None = None,
                      interval_s: float = SCRAPE_INTERVAL_S) -> dict:
    job = {"job_name": "appliance", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
    if metrics_key_file:
        job["authorization"] = {"type": "Bearer", "credentials_file": metrics_key_file}
    return {"global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "rule_files": [rules], "scrape_configs": [job]}


def write_monitoring(out: Path, target: str, metrics_key_file: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (RULES, DASHBOARD):
        (out / name).write_bytes(shipped(name))
        written.append(out / name)
    config = out / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(target, RULES, metrics_key_file), sort_keys=False))
    return [config, *written]
