"""Model cards filled from a model's own files: GGUF metadata, or an HF directory's
config.json, tokenizer_config.json, safetensors headers and README front matter.

A card is a plain dict. `EDITABLE` fields can be changed later by an admin; the
extracted ones are kept as read from the files.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import yaml

from appliance.errors import InvalidRequest, ModelFileError

EDITABLE = ("description", "license", "tags", "intended_use", "limitations", "notes")
GGUF_MAGIC = b"GGUF"


def detect_model_format(path: Path) -> str:
    """'gguf' for a GGUF file, 'hf' for a directory with config.json; else a clear error."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise ModelFileError(f"{path.name}: a model directory needs a config.json (HF format)", param="path")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    raise ModelFileError(
        f"{path.name}: unknown model format (supported: a GGUF file, or an HF directory with config.json)", param="path"
    )


def card_from_gguf(path: Path) -> dict:
    from gguf import LlamaFileType

    from appliance.gguf_meta import read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: not a readable GGUF file (truncated or corrupt: {exc})", param="file") from None
    field = meta.fields.get

    arch = field("general.architecture")
    if not arch:
        raise ModelFileError(f"{path.name}: GGUF metadata has no general.architecture", param="file")
    file_type = field("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = f"file type {file_type}"
    return _clean({
        "format": "gguf",
        "name": field("general.name"),
        "architecture": arch,
        "parameters": sum(t.n_elements for t in meta.tensors),
        "size_label": field("general.size_label"),
        "quantization": quantization,
        "context_length": field(f"{arch}.context_length"),
        "layers": field(f"{arch}.block_count"),
        "embedding_length": field(f"{arch}.embedding_length"),
        "vocabulary": field(f"{arch}.vocab_size"),
        "chat_template": field("tokenizer.chat_template"),
        "license": field("general.license"),
        "organization": field("general.organization"),
        "languages": field("general.languages"),
        "base_model": field("general.base_model.0.name"),
    })


def card_from_hf(directory: Path) -> dict:
    config = _read_json(directory / "config.json")
    tokenizer = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    architectures = config.get("architectures") or []
    quant = config.get("quantization_config") or {}
    return _clean({
        "format": "hf",
        "name": config.get("_name_or_path") or directory.name,
        "architecture": architectures[0] if architectures else config.get("model_type"),
        "parameters": _safetensors_parameters(directory),
        "quantization": quant.get("quant_method") or config.get("torch_dtype"),
        "context_length": config.get("max_position_embeddings"),
        "layers": config.get("num_hidden_layers"),
        "embedding_length": config.get("hidden_size"),
        "vocabulary": config.get("vocab_size"),
        "chat_template": tokenizer.get("chat_template"),
        "license": _readme_license(directory / "README.md"),
    })


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.parent.name}/{path.name}: not readable JSON ({exc})", param="path") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.parent.name}/{path.name}: expected a JSON object", param="path")
    return data


def _safetensors_parameters(directory: Path) -> int | None:
    """Sum of tensor elements from each .safetensors header (8-byte length, then JSON)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelFileError(f"{file.name}: truncated safetensors file", param="path")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024:
                raise ModelFileError(f"{file.name}: safetensors header of {length} bytes is not plausible", param="path")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ModelFileError(f"{file.name}: corrupt safetensors header", param="path") from None
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor.get("shape", []):
                    count *= dim
                total += count
    return total


def _readme_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    if not match:
        return None
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    license_ = front.get("license") if isinstance(front, dict) else None
    return str(license_) if license_ else None


def _clean(card: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in card.items() if v is not None}


def apply_edits(card: dict, edits: dict) -> dict:
    """The card as shown: extracted fields overlaid with an admin's edits."""
    return {**card, **edits}


def validate_edits(edits: dict) -> dict:
    unknown = sorted(set(edits) - set(EDITABLE))
    if unknown:
        raise InvalidRequest(f"card fields {', '.join(unknown)} cannot be edited (editable: {', '.join(EDITABLE)})",
                             param=unknown[0])
    for key, value in edits.items():
        if key == "tags":
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise InvalidRequest("tags must be a list of strings", param="tags")
        elif value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{key} must be a string", param=key)
    return edits


def compare_cards(a: dict, b: dict) -> list[dict]:
    """Side by side: every field of either card, with whether it differs."""
    rows = []
    for key in sorted(set(a) | set(b), key=lambda k: (k == "chat_template", k)):
        left, right = a.get(key), b.get(key)
        rows.append({"field": key, "a": left, "b": right, "same": left == right})
    return rows
