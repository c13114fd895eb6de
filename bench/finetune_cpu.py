"""Steps per second and peak memory of a LoRA fine-tuning job on the default model, on the CPU.

Each configuration (batch size x sequence length, LoRA rank) runs in a process of its own,
so its peak resident memory is its own: the worker's Trainer (services/worker/training.py)
on the default model loaded from its GGUF file, as a job runs it, on chats of the asked
length rendered with the model's template. Warm-up steps are not timed.

    .venv/bin/python bench/finetune_cpu.py --configs 1x128,2x256,4x256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARM_UP = 2


def one(batch: int, length: int, rank: int, steps: int) -> dict:
    """Run in a child: load, train `steps` timed steps, report."""
    import torch

    from appliance.config import load_profile
    from appliance.finetune import FineTune, Lora, Shape
    from services.worker.training import Trainer, _load_base, encode, rows_to_chats

    started = time.perf_counter()
    gguf = Path(load_profile("edge-cpu").models[0].path)
    model, tokenizer = _load_base(gguf, "cpu")
    loaded_s = time.perf_counter() - started
    turn = [{"role": "user", "content": "Tell me about the weather today in the city."},
            {"role": "assistant", "content": "It is sunny and warm, with a light breeze from the sea."}]
    chat = [{"role": "system", "content": "You are a helpful assistant."}] + turn * (length // 30 + 1)
    example = encode(tokenizer, rows_to_chats([{"messages": chat}], Shape("chat", messages="messages"))[0], length)
    job = FineTune(base="bench", dataset="bench", lora=Lora(rank=rank), batch_size=batch, sequence_length=length,
                   steps=steps + WARM_UP)
    trainer = Trainer(job, model, [example] * 64, steps + WARM_UP, "cpu")
    for step in range(WARM_UP):
        trainer.step(step)
    timed = time.perf_counter()
    for step in range(WARM_UP, WARM_UP + steps):
        trainer.step(step)
    took = time.perf_counter() - timed
    tokens = steps * batch * len(example["input_ids"])
    return {"batch": batch, "length": len(example["input_ids"]), "rank": rank, "steps": steps,
            "steps_per_s": steps / took, "tokens_per_s": tokens / took, "load_s": loaded_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x128,2x256,4x256", help="BATCHxLENGTH, comma-separated")
    parser.add_argument("--ranks", default="8", help="LoRA ranks, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, length, rank = map(int, args.child.split(","))
        print(json.dumps(one(batch, length, rank, args.steps)))
        return
    print("| batch x tokens | LoRA rank | steps/s | tokens/s | peak RSS MiB | model load s |")
    print("|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        batch, length = map(int, config.split("x"))
        for rank in map(int, args.ranks.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", f"{batch},{length},{rank}",
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['batch']} x {r['length']} | {r['rank']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                  f"| {r['peak_rss_mib']:.0f} | {r['load_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
