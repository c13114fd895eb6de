"""How close the fit estimator is to the memory the llama.cpp engine really uses.

For each context length, starts the real engine (the default model, CPU) exactly as the
appliance does, sends one chat completion whose prompt fills most of the context (so that the weights, KV
cache and compute buffers are touched as in real use), and
compares the process's resident memory (RSS) with appliance.planning.estimate's total. Also
prints the buffer sizes llama.cpp itself logs, which is where the estimator's
constants come from.
Usage: .venv/bin/python bench/estimate_accuracy.py [--contexts 512 2048 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import load_profile  # noqa: E402
from appliance.planning.estimate import MiB, llamacpp_estimate, model_shape  # noqa: E402
from appliance.planning.planner import LLAMACPP_SLOTS  # noqa: E402
from services.engines.commands import engine_command  # noqa: E402
from gateway_overhead import free_port, wait_until  # noqa: E402

LOGGED = re.compile(r"(KV (?:self|buffer) size|compute buffer size|model buffer size|CPU_Mapped model buffer size)\s*=\s*([\d.]+) MiB")


def measure(model, context: int) -> dict:
    model.context_length = context
    port, key = free_port(), "bench-key"
    command = engine_command(model, "127.0.0.1", port, key)
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as log:
        proc = subprocess.Popen(command.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **command.env})
        try:
            wait_until(command.health_url, timeout=120)
            # A prompt that fills most of the context, so every buffer is touched as in real use.
            prompt = "Summarise this: " + "the cat sat on the mat. " * (context * 7 // 8 // 7)
            body = json.dumps({"model": model.name, "max_tokens": 16, "temperature": 0,
                               "messages": [{"role": "user", "content": prompt}]}).encode()
            request = urllib.request.Request(command.base_url + "/chat/completions", body,
                                             {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            urllib.request.urlopen(request, timeout=600).read()
            time.sleep(0.5)
            rss = psutil.Process(proc.pid).memory_info().rss
        finally:
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        logged = {name: float(v) for name, v in LOGGED.findall(log.read().decode(errors="replace"))}
    estimate = llamacpp_estimate(model_shape(model.path), context, model.max_num_seqs)
    return {"context": context, "rss_mib": round(rss / MiB, 1), "estimate_mib": round(estimate.total_bytes / MiB, 1),
            "error_pct": round(100 * (estimate.total_bytes - rss) / rss, 1), "llama.cpp logged MiB": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--slots", type=int, default=LLAMACPP_SLOTS[0], help="parallel slots, each with the context")
    args = parser.parse_args()
    model = load_profile("edge-cpu").models[0]
    model.max_num_seqs = args.slots
    model.extra_args = [*model.extra_args, "--verbosity", "4"]
    for context in args.contexts:
        print(json.dumps({"slots": args.slots, **measure(model, context)}), flush=True)


if __name__ == "__main__":
    main()
