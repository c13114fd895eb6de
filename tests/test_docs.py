"""The docs cannot drift: undocumented commands, profile keys or metrics fail here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from appliance.config import profile_schema
from services.gateway import state_metrics
from services.gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.reference(), "docs/cli.md is stale: run `make docs`"


def test_console_keys_are_current():
    spec = importlib.util.spec_from_file_location("console_reference", DOCS / "console_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (DOCS / "console.md").read_text()
    assert text == module.rewritten(text), "docs/console.md's key tables are stale: run `make docs`"


def test_every_profile_key_is_documented():
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", (DOCS / "profiles.md").read_text(), re.MULTILINE))
    schema = profile_schema()
    keys = {key for definition in schema["$defs"].values() for key in definition.get("properties", {})}
    assert keys, "the schema lists the profile's keys"
    assert keys - documented == set(), "profile keys missing from docs/profiles.md"
    assert documented - keys == set(), "docs/profiles.md documents keys that do not exist"


def test_published_schema_is_current():
    assert json.loads((DOCS / "profile.schema.json").read_text()) == profile_schema(), "run `make docs`"


def test_every_metric_is_documented_and_every_documented_one_exists():
    text = (DOCS / "observability.md").read_text()
    metrics = GatewayMetrics()
    names = {m.name + ("_total" if m.type == "counter" else "") for m in metrics.registry.collect()}
    names |= {name + ("_total" if kind == "counter" else "") for name, (kind, _, _) in state_metrics.FAMILIES.items()}
    missing = {name for name in names if f"`{name}`" not in text}
    assert not missing, f"metrics missing from docs/observability.md: {missing}"
    table = text[text.index("## Metrics"):]
    documented = set(re.findall(r"^\| `((?:appliance|gen_ai)_[a-z_]+)` \|", table, re.MULTILINE))
    assert documented == names, f"documented but not exported: {documented - names}"


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
