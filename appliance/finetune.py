"""Fine-tuning jobs: what a `finetune` job is given, checked before anything is queued.

A job trains a LoRA adapter on a registered base model version (a GGUF file, as llama.cpp
serves it) with the rows of a registered dataset version, and registers the adapter as a
new version that llama.cpp serves on that base (services/worker/training.py does the work).

`resolve` turns what was asked into what will run: the latest versions filled in, the
dataset's shape (chat messages, or instruction and response columns) found, and a
dataset with unmasked PII findings refused unless `allow_pii` says otherwise. The job
records the resolved parameters, so a run can be repeated exactly.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from appliance.errors import InvalidRequest, NotFound, TrainingNotInstalled

if TYPE_CHECKING:
    import sqlite_utils

# What the worker trains with: the `train` extra (llama.cpp's converter makes the GGUF adapter).
TRAINING_PACKAGES = ("torch", "transformers", "peft", "appliance_llama_convert")

# Column names a dataset may use for each part of an instruction and its answer.
INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
SYSTEM_COLUMNS = ("system",)
INPUT_COLUMNS = ("input", "context")
MESSAGES_COLUMN = "messages"


class Lora(msgspec.Struct, forbid_unknown_fields=True):
    rank: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    alpha: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 16.0
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05
    target_modules: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.]{1,64}$")]],
                              msgspec.Meta(min_length=1, max_length=32)] = msgspec.field(
        default_factory=lambda: ["q_proj", "v_proj"])


class Shape(msgspec.Struct, frozen=True):
    """How a dataset's rows become chats: a `messages` column, or instruction and response columns."""

    kind: Literal["chat", "instruction"]
    messages: str | None = None
    instruction: str | None = None
    response: str | None = None
    system: str | None = None
    input: str | None = None


class FineTune(msgspec.Struct, forbid_unknown_fields=True):
    """A `finetune` job's parameters. `steps` or `epochs` (default: one epoch)."""

    base: str  # a registered model with a GGUF version
    dataset: str
    name: str | None = None  # the model the new version is registered under; default "<base>-ft"
    base_version: Annotated[int, msgspec.Meta(ge=1)] | None = None  # default: the latest
    dataset_version: Annotated[int, msgspec.Meta(ge=1)] | None = None  # default: the latest
    split: str | None = None  # a split of the dataset version: trains on its "train" part
    lora: Lora = msgspec.field(default_factory=Lora)
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 2e-4
    steps: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    epochs: Annotated[float, msgspec.Meta(gt=0, le=1000)] | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    sequence_length: Annotated[int, msgspec.Meta(ge=16, le=131_072)] = 512
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0
    checkpoint_every: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10  # steps
    experiment: str = "default"
    allow_pii: bool = False  # train on a dataset whose PII scan found something unmasked
    shape: Shape | None = None  # filled in by `resolve`

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give `steps` or `epochs`, not both")


def require_training_stack(packages: tuple[str, ...] = TRAINING_PACKAGES) -> None:
    """503 naming what is missing when this install cannot train (no `train` extra)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise TrainingNotInstalled(
            f"this appliance was installed without the fine-tuning stack (missing: {', '.join(missing)}): "
            "install the `train` extra (pip install 'appliance[train]'), or an air-gapped bundle built with "
            "`appliance bundle build --with-training`")


def resolve(db: sqlite_utils.Database, job: FineTune) -> FineTune:
    """The job with its versions, name and dataset shape filled in; 4xx naming the parameter
    for a base that llama.cpp cannot serve a LoRA on, a dataset it cannot train on, or one
    with unmasked PII findings."""
    from appliance import dataset_registry, model_registry  # pyarrow: loaded by the gateway, not the CLI

    for value, what in ((job.name or f"{job.base}-ft", "name"), (job.experiment, "experiment")):
        try:
            model_registry.check_name(value, "model" if what == "name" else what)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param=f"params.{what}") from None
    base = version_for_job(db, model_registry, job.base, job.base_version, "base")
    if base["format"] != "gguf":
        raise InvalidRequest(f"model {job.base} version {base['version']} is {base['format']}: fine-tuning "
                             "trains on a GGUF base (llama.cpp serves the adapter on it)", param="params.base")
    data = version_for_job(db, dataset_registry, job.dataset, job.dataset_version, "dataset")
    if job.split is not None:
        split = next((s for s in data["splits"] if s["id"] == job.split), None)
        if split is None:
            known = ", ".join(s["id"] for s in data["splits"]) or "none"
            raise InvalidRequest(f"dataset {job.dataset} version {data['version']} has no split {job.split!r} "
                                 f"(its splits: {known})", param="params.split")
        if "train" not in split["parts"]:
            raise InvalidRequest(f"split {job.split} has no 'train' part (parts: {', '.join(split['parts'])})",
                                 param="params.split")
    found = {name: n for name, n in data["pii"]["counts"].items() if n}
    if found and not job.allow_pii:
        listed = ", ".join(f"{n} {name}" for name, n in found.items())
        raise InvalidRequest(f"dataset {job.dataset} version {data['version']} has unmasked PII ({listed}): train on "
                             "a masked copy (appliance datasets mask), or set allow_pii to train on it as it is",
                             param="params.allow_pii")
    return msgspec.structs.replace(
        job, name=job.name or f"{job.base}-ft", base_version=base["version"], dataset_version=data["version"],
        epochs=job.epochs if job.steps is not None or job.epochs is not None else 1.0,
        shape=shape_of(data["schema"], job.dataset, data["version"]))


def shape_of(schema: list[dict], dataset: str, version: int) -> Shape:
    """How rows of a dataset with `schema` ([{"name", "type"}]) become chats; 400 when they cannot."""
    types = {column["name"]: column["type"] for column in schema}
    if MESSAGES_COLUMN in types:
        if not types[MESSAGES_COLUMN].startswith("list<"):
            raise InvalidRequest(f"dataset {dataset} version {version}: column 'messages' is {types['messages']}, "
                                 "not a list of {role, content} messages", param="params.dataset")
        return Shape("chat", messages=MESSAGES_COLUMN)

    def first(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in types), None)

    instruction, response = first(INSTRUCTION_COLUMNS), first(RESPONSE_COLUMNS)
    if instruction is None or response is None:
        raise InvalidRequest(
            f"dataset {dataset} version {version} has columns {', '.join(types) or 'none'}: fine-tuning needs a "
            f"'messages' column (chat JSONL) or an instruction column ({', '.join(INSTRUCTION_COLUMNS)}) with a "
            f"response column ({', '.join(RESPONSE_COLUMNS)})", param="params.dataset")
    return Shape("instruction", instruction=instruction, response=response, system=first(SYSTEM_COLUMNS),
                 input=first(INPUT_COLUMNS))


def version_for_job(db: sqlite_utils.Database, registry, name: str, version: int | None, param: str) -> dict:
    """A registered model or dataset version (the latest when `version` is None); 400 naming
    the job's parameter `param` (or `<param>_version`)."""
    try:
        if version is None:
            versions = registry.versions(db, name)
            if not versions:
                raise InvalidRequest(f"{param} {name} has no versions", param=f"params.{param}")
            return registry.get_version(db, name, versions[-1]["version"])
        return registry.get_version(db, name, version)
    except NotFound as exc:
        raise InvalidRequest(exc.message, param=f"params.{param}" if version is None else f"params.{param}_version") \
            from None
