"""Every `appliance` call imports the whole command tree first: what it loads there is paid
by every command, so the heavy libraries wait until a command needs them."""

from __future__ import annotations

import json
import subprocess
import sys

# Each costs tens to hundreds of milliseconds to import; none is needed to parse a command line.
HEAVY = {"numpy", "pyarrow", "sqlite_utils", "minio", "urllib3", "httpx", "jsonschema", "phonenumbers",
         "appliance.pii"}


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_the_command_tree_loads_no_heavy_library():
    loaded = set(json.loads(run_python("import json, sys, appliance.cli; print(json.dumps(list(sys.modules)))")))
    assert "appliance.keys_cli" in loaded and "installer.install" in loaded  # the whole tree, as `appliance` loads it
    assert HEAVY & loaded == set()


def test_the_decoy_hash_is_made_by_the_gateway_not_by_every_import():
    made = run_python("""
import appliance.cli
from appliance.auth import Authenticator
from appliance.config import AuthConfig
from appliance.keys import KeyCache
from appliance.passwords import decoy_hash
print(decoy_hash.cache_info().currsize)
Authenticator.from_config(KeyCache(), AuthConfig())
print(decoy_hash.cache_info().currsize)
""").split()
    assert made == ["0", "1"]
