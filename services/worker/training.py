"""A fine-tuning job's work: a LoRA adapter trained on a GGUF base, registered as a version
that llama.cpp serves on that base.

The base is the registered GGUF file itself, loaded by transformers (dequantized), so the
chat template the training renders rows with is the one llama-server renders requests
with: the adapter's version is served on the very same file, template and all. Rows
become chats (appliance/finetune.py says how), and the loss is taken on the assistant's
turns only.

The order of the examples is a function of the seed and the step, so a job that stops
(its worker killed, a machine restarted) resumes from its last checkpoint exactly where
it was: each checkpoint holds the adapter, the optimizer and the scheduler, and is an
archive in the object store's checkpoints bucket (table job_checkpoints). A job asked to
stop saves a checkpoint and stops at its next step.

Every step's loss, learning rate, tokens per second and step time go to the job's
metrics (appliance/experiments.py) and a line of its log.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import msgspec

from appliance import __version__, dataset_registry, experiments, jobs, model_registry
from appliance.errors import ApplianceError
from appliance.finetune import FineTune, Shape
from appliance.home import cache_dir, models_cache_dir
from appliance.planning.probe import probe_gpus
from services.engines.status import read_statuses
from services.worker.gpu_room import choose_gpu, reserved_by_serving, training_bytes
from services.worker.lora_gguf import adapter_to_gguf, base_config_dir
from services.worker.runner import Stopped, Waiting, Work

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # torch numbers the GPUs as NVML does

IGNORE = -100  # the label of a token the loss does not count
PACKAGES = ("torch", "transformers", "peft", "gguf", "numpy")


class TrainingError(ApplianceError):
    status = 400


def finetune(work: Work) -> tuple[dict, dict]:
    job = msgspec.convert(work.params, FineTune)
    job_id = work.job["id"]
    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=_mkdir(cache_dir(work.home, "finetune"))))
    try:
        base = model_registry.get_version(work.db, job.base, job.base_version)
        device = _device(work, job, base)
        data = dataset_registry.get_version(work.db, job.dataset, job.dataset_version)
        gguf = model_registry.materialize(work.store, base, models_cache_dir(work.home))
        chats = rows_to_chats(dataset_registry.rows(work.db, work.store, data, cache_dir(work.home, "datasets"),
                                                    split=job.split), job.shape)
        work.note(f"loading {job.base} v{job.base_version} ({gguf.name}) with transformers on {device}; "
                  f"{len(chats)} training examples from {job.dataset} v{job.dataset_version}")
        model, tokenizer = _load_base(gguf, device)
        examples = [e for e in (encode(tokenizer, chat, job.sequence_length) for chat in chats) if e is not None]
        if not examples:
            raise TrainingError(f"no example of {job.dataset} v{job.dataset_version} has an assistant turn that fits "
                                f"in sequence_length {job.sequence_length}")
        total = job.steps or math.ceil((job.epochs or 1.0) * len(examples) / job.batch_size)
        trainer = Trainer(job, model, examples, total, device)
        start = _resume(work, trainer, scratch)
        experiments.start_run(work.db, job_id, job.experiment, _recorded(job), created_by=work.actor.key_id,
                              base_version_id=base["id"], dataset_version_id=data["id"],
                              environment=environment(device))  # again when resumed: the same run
        work.note(f"training steps {start + 1}-{total} of {total}: LoRA rank {job.lora.rank} on "
                  f"{', '.join(job.lora.target_modules)}, batch {job.batch_size}, lr {job.learning_rate:g}")
        last: dict = {}
        for step in range(start, total):
            if jobs.cancel_requested(work.db, job_id):
                _checkpoint(work, trainer, step, scratch)
                raise Stopped(f"stopped at step {step} of {total} when asked; checkpoint kept",
                              {"steps_done": step, "total_steps": total})
            last = trainer.step(step)
            experiments.record_metrics(work.db, job_id, step + 1, last)
            work.note(f"step {step + 1}/{total} loss {last['loss']:.4f} lr {last['learning_rate']:.2e} "
                      f"{last['tokens_per_s']:.0f} tok/s {last['step_time_s']:.2f} s/step")
            if (step + 1) % job.checkpoint_every == 0 and step + 1 < total:
                _checkpoint(work, trainer, step + 1, scratch)
        return _register(work, job, base, data, trainer, tokenizer, last, total, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Trainer:
    """The model with its adapter, the optimizer and the schedule; `step(n)` trains on batch n."""

    def __init__(self, job: FineTune, model, examples: list[dict], total: int, device: str):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(job.seed)
        self.job, self.examples, self.total, self.device = job, examples, total, device
        self._order: tuple[int, list[int]] = (-1, [])  # the last epoch's shuffle
        self.model = get_peft_model(model, LoraConfig(
            r=job.lora.rank, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
            target_modules=list(job.lora.target_modules), task_type="CAUSAL_LM"))
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=job.learning_rate)
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, min(10, total // 10), total)
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def batch(self, step: int) -> list[dict]:
        """The examples of step `step`: the seed's shuffle of each epoch, read in order."""
        n, size = len(self.examples), self.job.batch_size
        return [self.examples[self._shuffle(epoch)[index]]
                for epoch, index in (divmod(position, n) for position in range(step * size, (step + 1) * size))]

    def _shuffle(self, epoch: int) -> list[int]:
        import numpy as np

        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.job.seed, epoch]).permutation(len(self.examples)).tolist())
        return self._order[1]

    def step(self, step: int) -> dict:
        import torch

        started = time.perf_counter()
        batch = self.batch(step)
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [self.pad] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in batch])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
        loss = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          labels=labels.to(self.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad()
        took = time.perf_counter() - started
        return {"loss": float(loss.detach()), "learning_rate": self.schedule.get_last_lr()[0],
                "tokens_per_s": int(mask.sum()) / took, "step_time_s": took,
                "epoch": (step + 1) * self.job.batch_size / len(self.examples)}

    def save(self, folder: Path, step: int) -> None:
        import torch

        self.model.save_pretrained(folder / "adapter")
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "step": step},
                   folder / "state.pt")

    def load(self, folder: Path) -> int:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(folder / "adapter" / "adapter_model.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        return state["step"]


def rows_to_chats(rows: list[dict], shape: Shape) -> list[list[dict]]:
    """Each row as a chat: its messages, or (system,) user (the instruction, then any input) and assistant."""
    chats = []
    for row in rows:
        if shape.kind == "chat":
            chats.append([{"role": m["role"], "content": m["content"]} for m in row[shape.messages] or []])
            continue
        user = str(row[shape.instruction] or "")
        if shape.input and row.get(shape.input):
            user += "\n\n" + str(row[shape.input])
        chat = [{"role": "system", "content": str(row[shape.system])}] if shape.system and row.get(shape.system) else []
        chats.append(chat + [{"role": "user", "content": user},
                             {"role": "assistant", "content": str(row[shape.response] or "")}])
    return chats


def encode(tokenizer, chat: list[dict], length: int) -> dict | None:
    """Token ids of the chat as the model's template renders it, labelled on the assistant's
    turns only; cut to `length`. None when no assistant token is left to learn from."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""  # the chat's text so far, as the template renders it
    for turn in range(len(chat)):
        if chat[turn]["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(chat[:turn], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(chat[: turn + 1], tokenize=False)
        prompt = tokenizer(before[len(rendered):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(through[len(before):], add_special_tokens=False)["input_ids"]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
        rendered = through
    ids, labels = ids[:length], labels[:length]
    return {"input_ids": ids, "labels": labels} if any(label != IGNORE for label in labels) else None


def environment(device: str) -> dict:
    """Where a run ran: package versions and hardware."""
    import torch

    versions = {"appliance": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    hardware = {"machine": platform.machine(), "cpus": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        hardware["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {"packages": versions, "hardware": hardware}


def _device(work: Work, job: FineTune, base: dict) -> str:
    """The CPU, or the GPU with room for the job beside serving (services/worker/gpu_room.py);
    Waiting when there is a GPU but no room yet."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    need = training_bytes(base["card"], job.batch_size, job.sequence_length)
    _, gpus = probe_gpus()
    index, why = choose_gpu(need, gpus, reserved_by_serving(read_statuses(work.home).values()))
    if index is None:
        raise Waiting(why)
    return f"cuda:{index}"


def _load_base(gguf: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.to(device), tokenizer


def _checkpoint(work: Work, trainer: Trainer, step: int, scratch: Path) -> None:
    folder = scratch / f"step-{step}"
    trainer.save(folder, step)
    archive = scratch / f"step-{step}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=".")
    obj = work.store.put_file(jobs.CHECKPOINTS, archive)
    jobs.add_checkpoint(work.db, work.job["id"], step, obj)
    work.note(f"checkpoint at step {step} ({obj.size} bytes) in the object store: {jobs.CHECKPOINTS}/{obj.key}")
    shutil.rmtree(folder)
    archive.unlink()


def _resume(work: Work, trainer: Trainer, scratch: Path) -> int:
    """The step to start from: 0, or the last checkpoint's (its state loaded)."""
    obj = jobs.last_checkpoint(work.db, work.job["id"])
    if obj is None:
        return 0
    folder = scratch / "resume"
    with work.store.local_file(obj, scratch) as archive, \
            tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    loaded = trainer.load(folder)
    shutil.rmtree(folder)
    work.note(f"resuming from the checkpoint at step {loaded}")
    return loaded


def _recorded(job: FineTune) -> dict:
    """The run's parameters as the experiment records them."""
    return {"base": {"model": job.base, "version": job.base_version},
            "dataset": {"name": job.dataset, "version": job.dataset_version, "split": job.split},
            "lora": msgspec.to_builtins(job.lora), "learning_rate": job.learning_rate, "steps": job.steps,
            "epochs": job.epochs, "batch_size": job.batch_size, "sequence_length": job.sequence_length,
            "seed": job.seed}


def _register(work: Work, job: FineTune, base: dict, data: dict, trainer: Trainer, tokenizer, last: dict, total: int,
              scratch: Path) -> tuple[dict, dict]:
    """The adapter as GGUF, registered with its lineage; the run finished."""
    adapter = scratch / "adapter"
    trainer.model.save_pretrained(adapter)
    config = base_config_dir(trainer.model.get_base_model(), tokenizer, scratch / "base-config")
    gguf = adapter_to_gguf(adapter, config, scratch / f"{job.name}-lora.gguf")
    lineage = {"job": work.job["id"], "experiment": job.experiment,
               "base": {"model": base["model"], "version": base["version"], "sha256": base["sha256"]},
               "dataset": {"name": data["dataset"], "version": data["version"], "sha256": data["sha256"],
                           "split": job.split},
               "params": _recorded(job), "metrics": last, "steps": total,
               "environment": environment(trainer.device)}
    row = model_registry.register_adapter(work.db, work.store, job.name, gguf, base=base, lineage=lineage,
                                          created_by=work.actor.key_id)
    work.registered(row)
    artifacts = [{"kind": "lora-gguf", "bucket": model_registry.BUCKET, **f} for f in row["files"]]
    experiments.finish_run(work.db, work.job["id"], final_metrics=last, artifacts=artifacts,
                           model_version_id=row["id"])
    work.note(f"registered {row['model']} version {row['version']} ({row['size']} bytes), a LoRA adapter on "
              f"{base['model']} v{base['version']}: deploy it like any version")
    result = {"model": row["model"], "version": row["version"], "sha256": row["sha256"], "steps": total,
              "final_loss": round(last["loss"], 6)}
    return result, {"version": row["version"], "base": f"{base['model']} v{base['version']}",
                    "dataset": f"{data['dataset']} v{data['version']}", "steps": total}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

