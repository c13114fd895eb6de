"""Profile validation: every error names the file, the key and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from appliance.config import builtin_profiles, load_profile, profile_schema
from appliance.errors import ProfileError

MODEL = {"name": "m", "engine": "llamacpp", "path": "model.gguf"}


@pytest.fixture
def write(tmp_path: Path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    def _write(data, name="p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return _write


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path), **kwargs)
    message = caught.value.message
    assert message.startswith(str(path)), "the error names the file"
    return message


def test_default_profile_is_edge_cpu_and_valid():
    profile = load_profile()
    assert profile.name == "edge-cpu"
    [model] = profile.models
    assert model.name == "smollm2-135m-instruct" and model.engine == "llamacpp" and model.replicas == 1
    assert Path(model.path).is_file() and model.path.endswith(".gguf")
    assert profile.gateway.port == 8080 and profile.gateway.max_body_bytes == 8 * 1024 * 1024


def test_every_builtin_profile_validates():
    assert "edge-cpu" in builtin_profiles()
    for name in builtin_profiles():
        load_profile(name, check_files=False)


def test_relative_model_path_is_resolved_against_the_profile(write, tmp_path):
    profile = load_profile(str(write({"name": "p", "models": [MODEL]})))
    assert profile.models[0].path == str(tmp_path / "model.gguf")


def test_a_relative_jwks_file_is_resolved_against_the_profile(write, tmp_path):
    (tmp_path / "idp.json").write_text('{"keys": []}')
    profile = load_profile(str(write({"name": "p", "models": [MODEL], "auth": {"jwt": {"jwks_file": "idp.json"}}})))
    assert profile.auth.jwt.jwks_file == str(tmp_path / "idp.json")


@pytest.mark.parametrize(
    "models, expected",
    [
        ([{**MODEL, "engine": "lamacpp"}], "models[0].engine: 'lamacpp' is not one of 'llamacpp', 'remote', 'vllm'"),
        ([{**MODEL, "replica": 2}], "models[0]: unknown key 'replica'"),
        ([{**MODEL, "replicas": 0}], "models[0].replicas: 0 is less than the minimum of 1"),
        ([{**MODEL, "replicas": "two"}], "models[0].replicas: 'two' is not of type 'integer'"),
        ([{"engine": "llamacpp", "path": "model.gguf"}], "models[0]: 'name' is a required property"),
        ([{**MODEL, "name": "has space"}], "models[0].name: 'has space' does not match"),
        ([{**MODEL, "path": "missing.gguf"}], "models[0].path: no such file or directory"),
        ([{**MODEL, "path": None}], "models[0].path: required for engine 'llamacpp'"),
        ([{**MODEL, "path": 42}], "models[0].path: 42 is not of type 'string' or 'null'"),
        ([{"name": "m", "engine": "llamacpp"}], "models[0].path: required for engine 'llamacpp'"),
        ([{"name": "r", "engine": "remote"}], "models[0].base_url: required for engine 'remote'"),
        ([{"name": "r", "engine": "remote", "base_url": "ftp://x"}], "models[0].base_url: must start with http://"),
        ([{**MODEL, "base_url": "http://x"}], "models[0].base_url: only used by engine 'remote'"),
        ([MODEL, MODEL], "models[1].name: duplicate model name 'm'"),
        ([], "models: [] should be non-empty"),
        ([{**MODEL, "path": "package://no_such_package_xyz/m.gguf"}], "Python package 'no_such_package_xyz' is not installed"),
    ],
)
def test_invalid_models_are_refused_with_the_key_named(write, models, expected):
    assert expected in error_of(write({"name": "p", "models": models}))


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"models": [MODEL]}, "(top level): 'name' is a required property"),
        ({"name": "p", "models": [MODEL], "gatway": {}}, "(top level): unknown key 'gatway'"),
        ({"name": "p", "models": [MODEL], "gateway": {"port": 70000}}, "gateway.port: 70000 is greater than the maximum of 65535"),
        ({"name": "p", "models": [MODEL], "gateway": {"max_body_bytes": "8M"}}, "gateway.max_body_bytes: '8M' is not of type 'integer'"),
        (["not", "a", "mapping"], "(top level): ['not', 'a', 'mapping'] is not of type 'object'"),
        ({"name": "p", "models": [MODEL], "auth": {"jwt": {}}}, "auth.jwt: give exactly one of jwks_file and jwks_url"),
        ({"name": "p", "models": [MODEL], "auth": {"jwt": {"jwks_file": "k.json", "jwks_url": "http://idp/jwks"}}},
         "auth.jwt: give exactly one of jwks_file and jwks_url"),
        ({"name": "p", "models": [MODEL], "auth": {"jwt": {"jwks_url": "ldap://idp"}}},
         "auth.jwt.jwks_url: must start with http:// or https://"),
        ({"name": "p", "models": [MODEL], "auth": {"jwt": {"jwks_file": "missing.json"}}},
         "auth.jwt.jwks_file: no such file"),
        ({"name": "p", "models": [MODEL], "costs": {"currency": "won"}}, "costs.currency: 'won' does not match"),
        ({"name": "p", "models": [{**MODEL, "price_output_per_million": -1}]},
         "models[0].price_output_per_million: -1 is not of type"),
    ],
)
def test_invalid_top_level_is_refused(write, data, expected):
    assert expected in error_of(write(data))


def test_llamacpp_needs_a_gguf_file(write, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"PK\x03\x04 not gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert "models[0].path: not a GGUF file" in error_of(write({"name": "p", "models": [{**MODEL, "path": "weights.bin"}]}))
    assert "needs a GGUF file, got a directory" in error_of(write({"name": "p", "models": [{**MODEL, "path": "dir.gguf"}]}))


def test_yaml_syntax_error_and_empty_file(write):
    assert "not valid YAML" in error_of(write("name: [unclosed\n"))
    assert "the file is empty" in error_of(write(""))


def test_unknown_profile_name_lists_the_builtin_ones():
    with pytest.raises(ProfileError) as caught:
        load_profile("no-such-profile")
    assert "edge-cpu" in caught.value.message


def test_missing_profile_file():
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile("/nonexistent/profile.yaml")


def test_schema_is_valid_json_schema_and_matches_the_builtin_profiles():
    schema = profile_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for name in builtin_profiles():
        path = Path(__file__).parents[2] / "profiles" / f"{name}.yaml"
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    assert json.dumps(schema)
