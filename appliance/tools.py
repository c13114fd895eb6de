"""Tools the gateway runs for a model: registered through /admin/tools, each a local command
run in a sandbox or a tool of an MCP server on the LAN (services/gateway/tool_runtime.py).

A tool has the name and the JSON Schema of its arguments that the model sees as a function,
and how it runs:

- `command`: argv run under bubblewrap. It sees the system's folders (/usr, /etc but its
  password hashes, /bin, /lib…), the program's own folder and the `read_paths` given, all
  read-only, and a private /tmp; not the appliance's home, not /home, /root, /var or /srv.
  No network unless `network`, its own process tree, and limits on address space, CPU time
  and wall time. The arguments come as JSON on stdin; what it prints is the result.
- `mcp`: a tool of an MCP server (Streamable HTTP, its URL), called with the arguments.

A chat request names the tools the gateway may run for it (`server_tools`); the gateway
then runs the calls the model makes to them and feeds the results back, in a bounded loop
(services/gateway/tool_loop.py), each call audited.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import jsonschema
import msgspec

from appliance.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    import sqlite_utils

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's function names
SANDBOX = "bwrap"  # bubblewrap: Debian's `bubblewrap` package


class Command(msgspec.Struct, forbid_unknown_fields=True):
    argv: Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0  # wall time
    cpu_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=65_536)] = 512  # address space
    network: bool = False
    read_paths: Annotated[list[str], msgspec.Meta(max_length=32)] = []  # more folders it may read (absolute)
    max_output_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)] = 65_536


class Mcp(msgspec.Struct, forbid_unknown_fields=True):
    url: str  # the server's Streamable HTTP endpoint, e.g. http://10.0.0.5:8000/mcp
    tool: str | None = None  # its name on the server; default: the registered name
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 30.0


class NewTool(msgspec.Struct, forbid_unknown_fields=True):
    description: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    command: Command | None = None
    mcp: Mcp | None = None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(f"tool name {name!r} is not valid: letters, digits, '_' and '-', at most 64 (a function "
                             "name the model calls)", param="name")
    return name


def _check(body: NewTool, home: Path | None) -> None:
    if (body.command is None) == (body.mcp is None):
        raise InvalidRequest("a tool is a `command` or an `mcp` tool: give one of them", param="command")
    try:
        jsonschema.Draft202012Validator.check_schema(body.parameters)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"parameters is not a JSON Schema: {exc.message}", param="parameters") from None
    if body.parameters.get("type") != "object":
        raise InvalidRequest("parameters must be a JSON Schema of type 'object' (the call's arguments)",
                             param="parameters")
    if body.command is not None:
        program = body.command.argv[0]
        if not os.path.isabs(program) or not os.access(program, os.X_OK):
            raise InvalidRequest(f"{program!r} is not an executable file given by its absolute path on the gateway's "
                                 "machine", param="command.argv")
        for path in (os.path.dirname(program), *body.command.read_paths):
            if not os.path.isabs(path) or not os.path.isdir(path):
                raise InvalidRequest(f"{path!r} is not a folder given by its absolute path", param="command.read_paths")
            if home is not None and (Path(path).resolve().is_relative_to(home.resolve())
                                     or home.resolve().is_relative_to(Path(path).resolve())):
                raise InvalidRequest(f"{path} holds the appliance's home ({home}): a tool never sees it",
                                     param="command.read_paths")
        if shutil.which(SANDBOX) is None:
            raise InvalidRequest("command tools run in bubblewrap's sandbox, which is not installed on the gateway's "
                                 "machine (Debian: apt-get install bubblewrap); MCP tools need no sandbox",
                                 param="command")
    if body.mcp is not None and not body.mcp.url.startswith(("http://", "https://")):
        raise InvalidRequest(f"mcp.url must be an http(s) URL of the server's Streamable HTTP endpoint, got "
                             f"{body.mcp.url!r}", param="mcp.url")


def create(db: sqlite_utils.Database, name: str, body: NewTool, *, created_by: str | None,
           replace: bool = False, home: Path | None = None) -> dict:
    """Register (or, with `replace`, replace) a tool; `home`, the appliance's, which no tool may read."""
    check_name(name)
    _check(body, home)
    exists = db.execute("SELECT 1 FROM tools WHERE name = ?", [name]).fetchone() is not None
    if exists and not replace:
        raise Conflict(f"a tool named {name!r} exists already (PUT replaces it)", param="name")
    now = time.time()
    db["tools"].upsert({"name": name, "spec": json.dumps(msgspec.to_builtins(body)), "created_at": now,
                        "created_by": created_by, "updated_at": now}, pk="name")
    return get(db, name)


def _public(row: dict) -> dict:
    spec = json.loads(row["spec"])
    return {"name": row["name"], "kind": "command" if spec.get("command") else "mcp", **spec,
            "created_at": row["created_at"], "created_by": row["created_by"], "updated_at": row["updated_at"]}


def get(db: sqlite_utils.Database, name: str) -> dict:
    rows = list(db.query("SELECT * FROM tools WHERE name = ?", [name]))
    if not rows:
        raise NotFound(f"no tool named {name!r}", param="name")
    return _public(rows[0])


def list_tools(db: sqlite_utils.Database) -> list[dict]:
    return [_public(r) for r in db.query("SELECT * FROM tools ORDER BY name")]


def delete(db: sqlite_utils.Database, name: str) -> dict:
    tool = get(db, name)
    db.execute("DELETE FROM tools WHERE name = ?", [name])
    return tool


def load_all(db: sqlite_utils.Database) -> dict[str, NewTool]:
    return {r["name"]: msgspec.json.decode(r["spec"], type=NewTool) for r in db.query("SELECT name, spec FROM tools")}


def stamp(db: sqlite_utils.Database) -> tuple:
    return tuple(db.execute("SELECT count(*), max(updated_at) FROM tools").fetchone())


def function(name: str, tool: NewTool) -> dict:
    """The tool as the model sees it: an OpenAI function."""
    return {"type": "function", "function": {"name": name, "description": tool.description,
                                             "parameters": tool.parameters}}
