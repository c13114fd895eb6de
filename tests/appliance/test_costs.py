"""Costs (appliance/costs.py): prices from the profile, and local models' cost from the
hardware's hourly cost and the throughput measured, shared and kept in the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.config import ModelConfig
from appliance.costs import UNMEASURED_TOKENS_PER_S, Costs, WindowState, merge
from appliance.limits import Governor

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_773_489_600.0  # a minute's start


def models() -> list[ModelConfig]:
    return [
        ModelConfig(name="gpt", engine="remote", base_url="http://x/v1", price_input_per_million=2.0,
                    price_output_per_million=8.0),
        ModelConfig(name="free-remote", engine="remote", base_url="http://x/v1"),
        ModelConfig(name="priced-local", engine="llamacpp", path="m.gguf", price_output_per_million=1.0),
        ModelConfig(name="local", engine="vllm", path="m"),
    ]


def test_prices_and_hardware():
    costs = Costs.from_models(models(), hardware_per_hour=7.2, currency="KRW")
    assert costs.cost("gpt", 1_000_000, 500_000) == pytest.approx(2.0 + 4.0)
    assert costs.worst_cost("gpt", 1000, 2000) == pytest.approx(1000 * 2e-6 + 2000 * 8e-6)
    assert costs.cost("free-remote", 10**6, 10**6) == 0  # a remote model without prices costs nothing
    assert costs.cost("priced-local", 10**6, 10**6) == pytest.approx(1.0)  # its prices, not the hardware's
    per_token = 7.2 / 3600 / UNMEASURED_TOKENS_PER_S
    assert costs.cost("local", 30, 70) == pytest.approx(100 * per_token)
    assert costs.cost("a-deployment", 1, 0) == pytest.approx(per_token)  # any model not in the profile is local
    assert Costs.from_models(models()).cost("local", 10**6, 10**6) == 0  # no hardware_per_hour: no cost
    assert costs.currency == "KRW"


def test_merge_is_the_union_of_intervals():
    assert merge([], [(5, 6), (1, 2), (1.5, 3), (10, 12), (2.5, 5.5)]) == [(1, 6), (10, 12)]
    assert merge([(0, 1), (4, 5)], [(1, 4)]) == [(0, 5)]
    assert merge([(0, 1)], [(2, 3)]) == [(0, 1), (2, 3)]


def test_a_windows_rate_counts_parallel_requests_once():
    state = WindowState()
    state.add(1, 2000, [(0.0, 10.0), (0.0, 10.0)])  # two requests side by side, 1000 tokens each
    state.add(1, 500, [(20.0, 25.0)])  # and one alone later
    state.add(0, 10**6, [(0.0, 1.0)])  # an older window than the open one: ignored
    assert state.estimate is None  # nothing closed yet
    state.add(2, 10, [(60.0, 60.5)])  # closes window 1
    assert state.estimate == pytest.approx(2500 / 15)
    state.add(3, 1, [])  # window 2 had too little work to say anything
    assert state.estimate == pytest.approx(2500 / 15)


OTHER_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from appliance.costs import Costs
    from appliance.limits import Governor

    costs = Costs({}, hardware_per_hour=3.6)
    governor = Governor(Path(sys.argv[1]), costs)
    costs.throughput.record("local", 1000, 10.0, now=float(sys.argv[2]) + 10)
    governor.sweep(now=float(sys.argv[2]) + 11)
    governor.close()
""")


def test_throughput_is_shared_by_workers_and_kept(tmp_path):
    ledger = tmp_path / "ledger"
    costs = Costs.from_models(models(), hardware_per_hour=3.6)
    governor = Governor(ledger, costs)
    try:
        # this worker and another process each answer 1000 tokens in the same 10 s: 200 tokens/s together
        subprocess.run([sys.executable, "-c", OTHER_WORKER, str(ledger), str(T0)], check=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        costs.throughput.record("local", 1000, 10.0, now=T0 + 10)
        governor.sweep(now=T0 + 11)
        assert costs.throughput.tokens_per_second("local") == UNMEASURED_TOKENS_PER_S  # the window is still open
        costs.throughput.record("local", 1, 0.5, now=T0 + 61)  # the next window opens
        governor.sweep(now=T0 + 62)
        assert costs.throughput.tokens_per_second("local") == pytest.approx(200)
        assert costs.cost("local", 100, 100) == pytest.approx(200 * 3.6 / 3600 / 200)
    finally:
        governor.close()
    restarted = Costs.from_models(models(), hardware_per_hour=3.6)
    governor = Governor(ledger, restarted)
    try:
        assert restarted.throughput.tokens_per_second("local") == pytest.approx(200)
    finally:
        governor.close()
