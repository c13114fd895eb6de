"""`appliance render monitoring`: the files it writes, and a scrape that carries a metrics key."""

from __future__ import annotations

import json

import yaml

from installer.monitoring import DASHBOARD, RULES, shipped
from tests.conftest import appliance


def test_it_writes_the_config_the_rules_and_the_dashboard(tmp_path):
    out = tmp_path / "monitoring"
    printed = appliance("render", "monitoring", "--out", str(out), "--gateway", "10.0.0.5:8080",
                        "--metrics-key-file", "/etc/prometheus/appliance.key").stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["prometheus.yml", RULES, DASHBOARD])
    assert all(str(out / name) in printed for name in ("prometheus.yml", RULES, DASHBOARD))
    [job] = yaml.safe_load((out / "prometheus.yml").read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["10.0.0.5:8080"]}] and job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/etc/prometheus/appliance.key"}
    assert json.loads((out / DASHBOARD).read_text()) == json.loads(shipped(DASHBOARD))


def test_a_wrong_option_is_a_usage_error(tmp_path):
    result = appliance("render", "monitoring", home=tmp_path, check=False)
    assert result.returncode == 2 and "Missing option '--out'" in result.stderr
