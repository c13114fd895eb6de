"""The model registry: named models with immutable versions whose files live in the
object store (content-addressed), and a card per version filled from the files' metadata.

Registering verifies everything (format, metadata, checksum) before storing anything,
stores the files before writing the row, and removes files that no row refers to if
the row cannot be written: a version is either fully registered or not at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path

import sqlite_utils

from appliance import gates
from appliance.db import transaction
from appliance.errors import ChecksumMismatch, Conflict, InvalidRequest, NotFound
from appliance.model_card import (
    apply_edits,
    card_from_gguf,
    card_from_hf,
    compare_cards,
    detect_model_format,
    validate_edits,
)
from appliance.objectstore import ObjectStore, StoredObject

BUCKET = "models"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "model") -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"{what} name {name!r} is not valid: letters, digits, '.', '_' and '-', starting with a letter or digit",
            param="name",
        )
    return name


def _model_files(path: Path, fmt: str) -> list[tuple[str, Path]]:
    if fmt == "gguf":
        return [(path.name, path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [(str(p.relative_to(path)), p) for p in files]


def register(db: sqlite_utils.Database, store: ObjectStore, name: str, path: Path, *, source: str,
             created_by: str | None, sha256: str | None = None) -> dict:
    """Register the GGUF file or HF directory at `path` as the next version of `name`."""
    check_name(name)
    if not path.exists():
        raise InvalidRequest(f"{path}: no such file or directory", param="path")
    fmt = detect_model_format(path)
    card = card_from_gguf(path) if fmt == "gguf" else card_from_hf(path)
    # A GGUF file's digest is checked as it is stored (a mismatch stores nothing); a directory's after.
    file_sha256 = sha256 if fmt == "gguf" else None
    stored: list[tuple[str, StoredObject]] = [(rel, store.put_file(BUCKET, p, sha256=file_sha256))
                                              for rel, p in _model_files(path, fmt)]
    files = [{"path": rel, "key": obj.key, "sha256": obj.sha256, "size": obj.size} for rel, obj in stored]
    if fmt == "gguf":
        digest = files[0]["sha256"]
    else:
        manifest = json.dumps([[f["path"], f["sha256"]] for f in files]).encode()
        digest = hashlib.sha256(manifest).hexdigest()
        if sha256 is not None and digest != sha256.lower():
            _forget_unreferenced(db, store, files)
            raise ChecksumMismatch(f"{path.name}: manifest SHA-256 is {digest}, expected {sha256.lower()}", param="sha256")
    return _insert_version(db, store, name, fmt, files, digest, card, source=source, created_by=created_by)


def register_adapter(db: sqlite_utils.Database, store: ObjectStore, name: str, path: Path, *, base: dict,
                     lineage: dict, created_by: str | None) -> dict:
    """Register a GGUF LoRA adapter trained on version `base` as the next version of `name`
    (format 'gguf-lora'): llama.cpp serves it on that base. Its card is the base's, with
    where it came from (`lineage`: the run's base, dataset, job, parameters and metrics)."""
    check_name(name)
    obj = store.put_file(BUCKET, path)
    files = [{"path": path.name, "key": obj.key, "sha256": obj.sha256, "size": obj.size}]
    card = {**base["card"], "adapter": "lora", "base_model": f"{base['model']} v{base['version']}",
            "fine_tuned_from": lineage}
    return _insert_version(db, store, name, "gguf-lora", files, obj.sha256, card,
                           source=f"fine-tuned from {base['model']} version {base['version']} by job {lineage['job']}",
                           created_by=created_by, base_id=base["id"], lineage=lineage)


def _insert_version(db: sqlite_utils.Database, store: ObjectStore, name: str, fmt: str, files: list[dict],
                    digest: str, card: dict, *, source: str, created_by: str | None, base_id: str | None = None,
                    lineage: dict | None = None) -> dict:
    """The version's row, once its files are stored; the files are forgotten if it cannot be written."""
    try:
        with transaction(db):
            existing = db.execute("SELECT version FROM model_versions WHERE model = ? AND sha256 = ?", [name, digest]).fetchone()
            if existing:
                raise Conflict(f"this content is already registered as {name} version {existing[0]}", param="path")
            now = time.time()
            if not db.execute("SELECT 1 FROM registered_models WHERE name = ?", [name]).fetchone():
                db["registered_models"].insert({"name": name, "created_at": now, "created_by": created_by})
            version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model = ?", [name]).fetchone()[0]
            row = {
                "id": "mv_" + uuid.uuid4().hex[:12], "model": name, "version": version, "format": fmt, "sha256": digest,
                "size": sum(f["size"] for f in files), "files": json.dumps(files), "source": source,
                "card": json.dumps(card), "card_edits": "{}", "created_at": now, "created_by": created_by,
                "base_id": base_id, "lineage": json.dumps(lineage) if lineage is not None else None,
            }
            db["model_versions"].insert(row)
    except BaseException:
        _forget_unreferenced(db, store, files)
        raise
    return gates.schedule(db, _public(row))  # a gated model's new version: its evaluation, for the caller to queue


def _forget_unreferenced(db: sqlite_utils.Database, store: ObjectStore, files: list[dict]) -> None:
    """Delete stored files that no registered version refers to (after a failed register or a delete)."""
    referenced = {f["key"] for (raw,) in db.execute("SELECT files FROM model_versions").fetchall() for f in json.loads(raw)}
    for f in files:
        if f["key"] not in referenced:
            store.delete(BUCKET, f["key"])


def _public(row: dict) -> dict:
    out = dict(row)
    out["files"] = json.loads(row["files"]) if isinstance(row["files"], str) else row["files"]
    out["lineage"] = json.loads(row["lineage"]) if isinstance(row.get("lineage"), str) else row.get("lineage")
    out["gate"] = json.loads(row["gate"]) if isinstance(row.get("gate"), str) else row.get("gate")
    card, edits = json.loads(row["card"]), json.loads(row["card_edits"])
    out.pop("card_edits")
    out["card"] = apply_edits(card, edits)
    out["edited_fields"] = sorted(edits)
    return out


def list_models(db: sqlite_utils.Database) -> list[dict]:
    rows = db.query(
        """SELECT m.name, m.created_at, count(v.id) AS versions, max(v.version) AS latest,
                  (SELECT group_concat(d.name) FROM deployments d JOIN model_versions dv ON dv.id = d.version_id
                   WHERE dv.model = m.name) AS deployed_as
           FROM registered_models m LEFT JOIN model_versions v ON v.model = m.name
           GROUP BY m.name ORDER BY m.name"""
    )
    return [{**r, "deployed_as": r["deployed_as"].split(",") if r["deployed_as"] else []} for r in rows]


def has_versions(db: sqlite_utils.Database, name: str) -> bool:
    return db.execute("SELECT 1 FROM model_versions WHERE model = ? LIMIT 1", [name]).fetchone() is not None


def versions(db: sqlite_utils.Database, name: str) -> list[dict]:
    rows = [_public(r) for r in db.query("SELECT * FROM model_versions WHERE model = ? ORDER BY version", [name])]
    if not rows and not db.execute("SELECT 1 FROM registered_models WHERE name = ?", [name]).fetchone():
        raise NotFound(f"no registered model named {name!r}", param="name")
    deployed = _deployed_names(db)
    for row in rows:
        row["deployed_as"] = deployed.get(row["id"], [])
    return rows


def _deployed_names(db: sqlite_utils.Database) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for version_id, served in db.execute("SELECT version_id, name FROM deployments ORDER BY name").fetchall():
        out.setdefault(version_id, []).append(served)
    return out


def get_version(db: sqlite_utils.Database, name: str, version: int) -> dict:
    rows = list(db.query("SELECT * FROM model_versions WHERE model = ? AND version = ?", [name, version]))
    if not rows:
        raise NotFound(f"model {name!r} has no version {version}", param="version")
    out = _public(rows[0])
    out["deployed_as"] = _deployed_names(db).get(out["id"], [])
    return out


def edit_card(db: sqlite_utils.Database, name: str, version: int, edits: dict) -> dict:
    """Change the editable card fields of one version (None removes an edit)."""
    validate_edits(edits)
    with transaction(db):
        current = get_version(db, name, version)
        merged = json.loads(db.execute("SELECT card_edits FROM model_versions WHERE id = ?", [current["id"]]).fetchone()[0])
        for key, value in edits.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        db.execute("UPDATE model_versions SET card_edits = ? WHERE id = ?", [json.dumps(merged), current["id"]])
    return get_version(db, name, version)


def compare(db: sqlite_utils.Database, name: str, a: int, b: int) -> dict:
    left, right = get_version(db, name, a), get_version(db, name, b)
    facts = {k: (left[k], right[k]) for k in ("format", "sha256", "size", "source", "created_at")}
    return {
        "model": name, "a": a, "b": b,
        "fields": compare_cards(left["card"], right["card"])
        + [{"field": k, "a": x, "b": y, "same": x == y} for k, (x, y) in facts.items()],
    }


def delete_version(db: sqlite_utils.Database, store: ObjectStore, name: str, version: int) -> dict:
    """Delete one version and its files (unless another version shares them); refused while deployed."""
    with transaction(db):
        row = get_version(db, name, version)
        if row["deployed_as"]:
            raise Conflict(
                f"{name} version {version} is deployed as {', '.join(row['deployed_as'])}: undeploy it first",
                param="version",
            )
        adapters = [f"{m} v{v}" for m, v in db.execute(
            "SELECT model, version FROM model_versions WHERE base_id = ? ORDER BY model, version", [row["id"]])]
        if adapters:
            raise Conflict(f"{name} version {version} is the base of fine-tuned versions ({', '.join(adapters)}): "
                           "delete those first", param="version")
        for column in ("base_version_id", "model_version_id"):  # a run keeps its record of a deleted version
            db.execute(f"UPDATE runs SET {column} = NULL WHERE {column} = ?", [row["id"]])
        db.execute("DELETE FROM model_versions WHERE id = ?", [row["id"]])
        if not db.execute("SELECT 1 FROM model_versions WHERE model = ?", [name]).fetchone():
            db.execute("DELETE FROM registered_models WHERE name = ?", [name])
    _forget_unreferenced(db, store, row["files"])
    return row


def materialize(store: ObjectStore, row: dict, cache: Path) -> Path:
    """The version's files on local disk (checked against their SHA-256), for an engine to load.

    GGUF: cache/<sha256>.gguf; a LoRA adapter: cache/<sha256>.lora.gguf (its base is
    materialized on its own); HF: cache/<sha256>/ with the directory's files.
    """
    files = row["files"]
    if row["format"] in ("gguf", "gguf-lora"):
        target = cache / (f"{row['sha256']}.gguf" if row["format"] == "gguf" else f"{row['sha256']}.lora.gguf")
        if not target.exists():
            store.get_file(StoredObject(BUCKET, files[0]["key"], files[0]["sha256"], files[0]["size"]), target)
        return target
    folder = cache / row["sha256"]
    for f in files:
        dest = folder / f["path"]
        if not dest.exists():
            store.get_file(StoredObject(BUCKET, f["key"], f["sha256"], f["size"]), dest)
    return folder
