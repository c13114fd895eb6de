"""What each alert kind measures, from two scrapes of gateway metrics (the appliance's own
evaluation, services/gateway/alerting.py): over the threshold it holds, under it, or with too
few requests, it does not; the kinds that read the state now need one scrape."""

from __future__ import annotations

from appliance.config import AlertRuleSpec
from appliance.scrapes import Scrape
from services.gateway.alerting import Scrapes, measure

BEFORE = """
appliance_requests_total{model="a",endpoint="chat/completions",status="200"} 100
appliance_requests_total{model="a",endpoint="chat/completions",status="502"} 0
appliance_requests_total{model="b",endpoint="chat/completions",status="200"} 0
appliance_requests_total{model="b",endpoint="chat/completions",status="500"} 0
appliance_engine_restarts_total{model="a",replica="0"} 1
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="10.0"} 0
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="60.0"} 0
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="+Inf"} 0
"""
AFTER = """
appliance_requests_total{model="a",endpoint="chat/completions",status="200"} 180
appliance_requests_total{model="a",endpoint="chat/completions",status="502"} 20
appliance_requests_total{model="b",endpoint="chat/completions",status="200"} 3
appliance_requests_total{model="b",endpoint="chat/completions",status="500"} 5
appliance_engine_restarts_total{model="a",replica="0"} 4
appliance_replicas_failed{model="b"} 1
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="10.0"} 10
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="60.0"} 100
gen_ai_server_request_duration_seconds_bucket{gen_ai_request_model="a",gen_ai_operation_name="chat",le="+Inf"} 100
appliance_gpu_memory_used_bytes{gpu="0",name="H200",uuid="u0"} 97
appliance_gpu_memory_total_bytes{gpu="0",name="H200",uuid="u0"} 100
appliance_gpu_memory_used_bytes{gpu="1",name="H200",uuid="u1"} 50
appliance_gpu_memory_total_bytes{gpu="1",name="H200",uuid="u1"} 100
appliance_gpu_temperature_celsius{gpu="0",name="H200",uuid="u0"} 70
appliance_gpu_temperature_celsius{gpu="1",name="H200",uuid="u1"} 91
appliance_budget_spent_tokens{scope="key",name="ci",period="day"} 95
appliance_budget_tokens{scope="key",name="ci",period="day"} 100
appliance_budget_spent_cost{scope="team",name="risk",period="month",currency="USD"} 1
appliance_budget_cost{scope="team",name="risk",period="month",currency="USD"} 100
"""


def scrapes(*texts: str) -> Scrapes:
    kept = Scrapes()
    for at, text in enumerate(texts):
        kept.add(Scrape.parse(text, at * 600.0), 3600)
    return kept


def found(kind: str, **rule) -> dict:
    measured = measure(AlertRuleSpec(name="r", kind=kind, **rule), scrapes(BEFORE, AFTER))
    assert measured.complete
    return {subject: round(finding.value, 4) for subject, finding in measured.findings.items()}


def test_each_kind_holds_over_its_threshold_only():
    # a: 20 of 100 answers were 5xx; b: 5 of 8, but under the 10 requests that say anything
    assert found("error_rate") == {"a": 0.2}
    assert found("error_rate", threshold=0.25) == {}
    assert found("latency") == {"a": 57.2222} and found("latency", threshold=60) == {}  # p95 in the 10-60 s bucket
    assert found("engine_crash_loop") == {"a": 3.0, "b": 3.0}  # a: 3 restarts; b: a replica marked failed
    assert found("engine_crash_loop", model="b") == {"b": 3.0}
    assert found("gpu_memory") == {"gpu 0": 0.97}
    assert found("gpu_temperature") == {"gpu 1": 91.0}
    assert found("budget") == {"key ci": 0.95}


def test_a_window_not_yet_watched_whole_cannot_resolve_and_one_scrape_measures_nothing():
    rule = AlertRuleSpec(name="r", kind="error_rate", window_s=1200)
    assert measure(rule, scrapes(AFTER)) is None
    assert measure(rule, scrapes(BEFORE, AFTER)).complete is False  # 600 s of a 1200 s window
