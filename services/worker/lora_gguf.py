"""A LoRA adapter as PEFT saves it, turned into the GGUF adapter that llama.cpp's server
applies to its base model (`llama-server --model BASE.gguf --lora ADAPTER.gguf`).

The conversion is llama.cpp's own `convert_lora_to_gguf.py`, from the same pinned llama.cpp
source as the appliance's llama-server (the appliance-llama-convert wheel that
installer/llama_build.py writes; the `train` extra installs it), run as a program with this
Python. It reads the adapter's weights and the base model's Hugging Face config and
tokenizer, not the base weights; base_config_dir() writes those for a model that
transformers loaded from its GGUF file. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.errors import InstallError, ModelFileError

STDERR_LINES = 20  # of the converter's output, in the error when it fails


def base_config_dir(model, tokenizer, dir: Path) -> Path:
    """Write the base model's config and tokenizer into `dir`, as the converter's `--base`
    wants them: `model` (a transformers model, or a PEFT model around one) loaded from a GGUF
    file has no `architectures` (the converter picks its model class by it: the model's own
    class is named) and a `quantization_config` for GGUF, which the converter refuses
    ("Quant method is not yet supported: 'gguf'"), so it is left out."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dir.mkdir(parents=True, exist_ok=True)
    base.config.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    path = dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = config.get("architectures") or [type(base).__name__]
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dir


def converter() -> Path:
    """llama.cpp's convert_lora_to_gguf.py, from the appliance-llama-convert wheel."""
    try:
        from appliance_llama_convert import script
    except ImportError:
        raise InstallError("llama.cpp's LoRA converter (appliance-llama-convert) is not installed: "
                           "install the appliance with its `train` extra (make install does)") from None
    return script("convert_lora_to_gguf.py")


def adapter_to_gguf(adapter_dir: Path, base_config_dir: Path, out: Path) -> Path:
    """Convert the PEFT adapter in `adapter_dir` (adapter_config.json, adapter_model.safetensors)
    for the base model described in `base_config_dir` into the GGUF file `out` (f16); return `out`.

    A failed conversion raises ModelFileError with the converter's last lines of output; `out`
    is then absent (the converter writes `out`.part, renamed once it exits cleanly).
    """
    partial = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(converter()), "--base", str(base_config_dir), "--outtype", "f16",
            "--outfile", str(partial), str(adapter_dir)]
    # The scripts' own gguf-py (NO_LOCAL_GGUF would pick the installed gguf package); no hub.
    env = {**{k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"},
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if run.returncode or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = (run.stderr or run.stdout).strip().splitlines()[-STDERR_LINES:]
        raise ModelFileError(f"converting the LoRA adapter {adapter_dir} to GGUF failed (convert_lora_to_gguf.py "
                             f"exited {run.returncode}):\n" + "\n".join(tail))
    os.replace(partial, out)
    return out
