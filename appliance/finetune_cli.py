"""`appliance finetune start`: a LoRA fine-tuning job through the admin API, run by the worker."""

from __future__ import annotations

import click

from appliance.admin_client import make_client
from appliance.cli_options import client_options, json_option, name_and_version
from appliance.jobs_cli import submit


@click.group()
def finetune() -> None:
    """Fine-tune a registered GGUF model on a registered dataset: a LoRA adapter, registered as
    a new version that llama.cpp serves on its base. Follow a job with `appliance jobs logs -f`."""


@finetune.command("start")
@click.option("--base", required=True, metavar="MODEL[:VERSION]",
              help="The registered GGUF model to train on (default version: the latest), or a GGUF model "
                   "the profile serves, such as the default model (registered as version 1 the first time).")
@click.option("--dataset", required=True, metavar="NAME[:VERSION]",
              help="The registered dataset: a 'messages' column (chat JSONL), or instruction and response columns.")
@click.option("--split", metavar="SPLIT_ID", help="Train on this split's 'train' part (appliance datasets split).")
@click.option("--name", help="The model the new version is registered under. Default: BASE-ft.")
@click.option("--rank", type=click.IntRange(1, 256), default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(0, 1024, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="LoRA dropout.")
@click.option("--target-modules", default="q_proj,v_proj", show_default=True,
              help="The modules the adapter trains, comma-separated.")
@click.option("--learning-rate", "--lr", type=click.FloatRange(0, 1, min_open=True), default=2e-4,
              show_default=True)
@click.option("--steps", type=click.IntRange(1), help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=click.FloatRange(0, 1000, min_open=True), help="Passes over the data, instead of --steps.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=2, show_default=True)
@click.option("--sequence-length", type=click.IntRange(16), default=512, show_default=True,
              help="Tokens per example; longer ones are cut.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=10, show_default=True,
              help="Steps between checkpoints (the job resumes from its last).")
@click.option("--experiment", default="default", show_default=True, help="The experiment this run belongs to.")
@click.option("--allow-pii", is_flag=True, help="Train on a dataset whose PII scan found unmasked findings.")
@client_options
@json_option()
def finetune_start(base, dataset, split, name, rank, alpha, dropout, target_modules, learning_rate, steps, epochs,
                   batch_size, sequence_length, seed, checkpoint_every, experiment, allow_pii, url, key, home,
                   as_json):
    """Queue a fine-tuning job. Its parameters are checked (and the dataset's PII findings) before it is queued."""
    base_name, base_version = name_and_version(base, "--base")
    dataset_name, dataset_version = name_and_version(dataset, "--dataset")
    params = {
        "base": base_name, "base_version": base_version, "dataset": dataset_name, "dataset_version": dataset_version,
        "split": split, "name": name, "learning_rate": learning_rate, "steps": steps, "epochs": epochs,
        "batch_size": batch_size, "sequence_length": sequence_length, "seed": seed,
        "checkpoint_every": checkpoint_every, "experiment": experiment, "allow_pii": allow_pii,
        "lora": {"rank": rank, "alpha": alpha, "dropout": dropout,
                 "target_modules": [m.strip() for m in target_modules.split(",") if m.strip()]},
    }
    submit(make_client(url, key, home), "finetune", {k: v for k, v in params.items() if v is not None}, as_json)
