"""Prompt templates: versioned Jinja2 templates with declared variables, rendered by the
gateway when a chat request names one, and split between versions by weight (A/B).

A version holds a `system` template and/or a `user` template and the variables they may
use, each with a type, whether it is required, and a default. Templates run in Jinja2's
immutable sandbox with undefined names an error; a version that uses a variable it does
not declare is refused when it is created. Versions never change: a new text is a new
version. What a request gets is the version it names, else one drawn by the template's
weights (`ab`, {version: weight}; default: the latest version).

A request names a template with the extension field `template` on /v1/chat/completions:
{"name", "version"?, "variables"?}. The rendered system text comes first among the
messages, the rendered user text last (docs/prompts.md).
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from appliance.db import transaction
from appliance.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    import sqlite_utils

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIABLE = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_TEMPLATE_CHARS = 100_000
MAX_RENDERED_CHARS = 400_000  # what one rendering may make, so a loop in a template cannot run away
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "list": list, "object": dict}


class Variable(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=VARIABLE)]
    type: Literal["string", "integer", "number", "boolean", "list", "object"] = "string"
    required: bool = True
    default: Any = None  # used when it is not given (and then it is not required)
    description: str | None = None


class NewVersion(msgspec.Struct, forbid_unknown_fields=True):
    system: Annotated[str, msgspec.Meta(max_length=MAX_TEMPLATE_CHARS)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=MAX_TEMPLATE_CHARS)] | None = None
    variables: Annotated[list[Variable], msgspec.Meta(max_length=256)] = []
    description: str | None = None


class Use(msgspec.Struct, forbid_unknown_fields=True):
    """The `template` field of a chat request."""

    name: str
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    variables: dict[str, Any] = {}


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(f"template name {name!r} is not valid: lower-case letters, digits, '.', '_' and '-', "
                             "at most 64, starting with a letter or digit", param="name")
    return name


def _check_version(body: NewVersion) -> None:
    from jinja2 import TemplateSyntaxError, meta

    if not body.system and not body.user:
        raise InvalidRequest("a template version needs a `system` or a `user` template (or both)", param="system")
    names = [v.name for v in body.variables]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"variables declared twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}",
                             param="variables")
    for v in body.variables:
        if v.default is not None and not isinstance(v.default, TYPES[v.type]):
            raise InvalidRequest(f"variable {v.name}: its default {v.default!r} is not of type {v.type}",
                                 param=f"variables.{v.name}.default")
    env = _environment()
    for part in ("system", "user"):
        text = getattr(body, part)
        if not text:
            continue
        try:
            used = meta.find_undeclared_variables(env.parse(text))
        except TemplateSyntaxError as exc:
            raise InvalidRequest(f"the {part} template does not parse: line {exc.lineno}: {exc.message}",
                                 param=part) from None
        undeclared = sorted(used - set(names))
        if undeclared:
            raise InvalidRequest(f"the {part} template uses variables it does not declare: {', '.join(undeclared)} "
                                 "(declare each in `variables`)", param=part)


def create_version(db: sqlite_utils.Database, name: str, body: NewVersion, *, created_by: str | None) -> dict:
    """The next version of template `name` (made on its first version)."""
    check_name(name)
    _check_version(body)
    now = time.time()
    with transaction(db):
        if not db.execute("SELECT 1 FROM prompt_templates WHERE name = ?", [name]).fetchone():
            db["prompt_templates"].insert({"name": name, "ab": "{}", "created_at": now, "created_by": created_by,
                                           "updated_at": now})
        version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM prompt_template_versions WHERE name = ?",
                             [name]).fetchone()[0]
        db["prompt_template_versions"].insert({
            "name": name, "version": version, "system": body.system, "user": body.user,
            "variables": json.dumps(msgspec.to_builtins(body.variables)), "description": body.description,
            "created_at": now, "created_by": created_by})
        db.execute("UPDATE prompt_templates SET updated_at = ? WHERE name = ?", [now, name])
    return get_version(db, name, version)


def set_ab(db: sqlite_utils.Database, name: str, weights: dict[str, float]) -> dict:
    """How requests that name no version are split: {version: weight}; {} means the latest."""
    if not isinstance(weights, dict):
        raise InvalidRequest("ab must be an object of weights by version, e.g. {\"1\": 90, \"2\": 10}", param="ab")
    with transaction(db):
        template = get_template(db, name)
        known = {v["version"] for v in template["versions"]}
        clean: dict[str, float] = {}
        for version, weight in weights.items():
            if not str(version).isdigit() or int(version) not in known:
                raise InvalidRequest(f"template {name} has no version {version!r} (its versions: "
                                     f"{', '.join(map(str, sorted(known)))})", param=f"ab.{version}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1_000_000:
                raise InvalidRequest(f"the weight of version {version} must be a number from 0, got {weight!r}",
                                     param=f"ab.{version}")
            clean[str(int(version))] = float(weight)
        if clean and not any(clean.values()):
            raise InvalidRequest("at least one weight must be above 0", param="ab")
        db.execute("UPDATE prompt_templates SET ab = ?, updated_at = ? WHERE name = ?",
                   [json.dumps(clean), time.time(), name])
    return get_template(db, name)


def _version_row(row: dict) -> dict:
    return {**row, "variables": json.loads(row["variables"])}


def get_template(db: sqlite_utils.Database, name: str) -> dict:
    rows = list(db.query("SELECT * FROM prompt_templates WHERE name = ?", [name]))
    if not rows:
        raise NotFound(f"no prompt template named {name!r}", param="name")
    versions = [_version_row(r) for r in db.query(
        "SELECT * FROM prompt_template_versions WHERE name = ? ORDER BY version", [name])]
    return {**rows[0], "ab": json.loads(rows[0]["ab"]), "versions": versions}


def get_version(db: sqlite_utils.Database, name: str, version: int) -> dict:
    rows = list(db.query("SELECT * FROM prompt_template_versions WHERE name = ? AND version = ?", [name, version]))
    if not rows:
        raise NotFound(f"prompt template {name!r} has no version {version}", param="version")
    return _version_row(rows[0])


def list_templates(db: sqlite_utils.Database) -> list[dict]:
    return [{**r, "ab": json.loads(r["ab"])} for r in db.query(
        """SELECT t.name, t.ab, t.created_at, t.updated_at, count(v.version) AS versions, max(v.version) AS latest
           FROM prompt_templates t LEFT JOIN prompt_template_versions v ON v.name = t.name
           GROUP BY t.name ORDER BY t.name""")]


def delete_template(db: sqlite_utils.Database, name: str) -> dict:
    with transaction(db):
        template = get_template(db, name)
        db.execute("DELETE FROM prompt_template_versions WHERE name = ?", [name])
        db.execute("DELETE FROM prompt_templates WHERE name = ?", [name])
    return template


def load_all(db: sqlite_utils.Database) -> dict[str, Template]:
    """Every template, compiled, for the gateway (refreshed when `updated_at` changes)."""
    versions: dict[str, dict[int, dict]] = {}
    for row in db.query("SELECT * FROM prompt_template_versions"):
        versions.setdefault(row["name"], {})[row["version"]] = _version_row(row)
    return {r["name"]: Template(r["name"], versions.get(r["name"], {}), json.loads(r["ab"]))
            for r in db.query("SELECT name, ab FROM prompt_templates")}


def load(db: sqlite_utils.Database, name: str) -> Template:
    """One template, compiled (404 for an unknown name)."""
    template = get_template(db, name)
    return Template(name, {v["version"]: v for v in template["versions"]}, template["ab"])


def stamp(db: sqlite_utils.Database) -> tuple:
    """Changes when any template does: the gateway reloads them then."""
    return tuple(db.execute("SELECT count(*), max(updated_at) FROM prompt_templates").fetchone())


class Template:
    """One template's versions, compiled, and its A/B weights."""

    def __init__(self, name: str, versions: dict[int, dict], ab: dict[str, float]):
        env = _environment()
        self.name = name
        self.versions = {n: (v, {part: env.from_string(v[part]) for part in ("system", "user") if v[part]})
                         for n, v in versions.items()}
        self.ab = [(int(k), w) for k, w in ab.items() if w > 0 and int(k) in self.versions]

    def choose(self, asked: int | None, rng: random.Random) -> int:
        if asked is not None:
            if asked not in self.versions:
                raise InvalidRequest(f"prompt template {self.name!r} has no version {asked}", param="template.version")
            return asked
        if self.ab:
            return rng.choices([v for v, _ in self.ab], weights=[w for _, w in self.ab])[0]
        if not self.versions:
            raise Conflict(f"prompt template {self.name!r} has no version", param="template.name")
        return max(self.versions)

    def render(self, version: int, given: dict[str, Any]) -> dict[str, str]:
        """{"system"?, "user"?}: the version's parts, with the variables checked against its declarations."""
        from jinja2 import TemplateError

        spec, compiled = self.versions[version]
        declared = {v["name"]: v for v in spec["variables"]}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise InvalidRequest(f"prompt template {self.name} version {version} has no variable {unknown[0]!r} "
                                 f"(its variables: {', '.join(declared) or 'none'})",
                                 param=f"template.variables.{unknown[0]}")
        values = {}
        for name, v in declared.items():
            if name in given:
                value = given[name]
                if not isinstance(value, TYPES[v["type"]]) or (v["type"] in ("integer", "number")
                                                               and isinstance(value, bool)):
                    raise InvalidRequest(f"variable {name} must be of type {v['type']}, got {type(value).__name__}",
                                         param=f"template.variables.{name}")
                values[name] = value
            elif v["default"] is not None:
                values[name] = v["default"]
            elif v["required"]:
                raise InvalidRequest(f"prompt template {self.name} version {version} needs variable {name!r}"
                                     + (f" ({v['description']})" if v.get("description") else ""),
                                     param=f"template.variables.{name}")
            else:
                values[name] = None
        out = {}
        for part, template in compiled.items():
            pieces, size = [], 0
            try:
                for piece in template.generate(values):  # stopped as soon as it is too long
                    pieces.append(piece)
                    size += len(piece)
                    if size > MAX_RENDERED_CHARS:
                        raise InvalidRequest(f"prompt template {self.name} version {version} rendered more than "
                                             f"{MAX_RENDERED_CHARS} characters", param="template.variables")
            except (TemplateError, OverflowError, TypeError, ValueError, ArithmeticError) as exc:
                # the sandbox's refusals, and a template's own errors with the values it was given
                raise InvalidRequest(f"prompt template {self.name} version {version} could not be rendered: "
                                     f"{type(exc).__name__}: {exc}", param="template.variables") from None
            out[part] = "".join(pieces)
        return out
