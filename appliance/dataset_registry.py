"""The dataset registry: named datasets with immutable versions (CSV, JSON Lines or Parquet
files in the object store), each with its schema, quality report and PII scan, made when
it is registered so nobody trains on a file before its report exists.

Derived data is registered too: a masked copy is a new version that names its parent,
and a train/validation/test split is stored once per (version, seed, ratios).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import sqlite_utils

from appliance import pii, tabular
from appliance.db import transaction
from appliance.errors import Conflict, DatasetError, InvalidRequest, NotFound
from appliance.model_registry import check_name
from appliance.objectstore import ObjectStore, StoredObject

BUCKET = "datasets"
EXTENSIONS = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}


def register(db: sqlite_utils.Database, store: ObjectStore, name: str, path: Path, *, source: str,
             created_by: str | None, fmt: str | None = None, sha256: str | None = None,
             parent_id: str | None = None, derivation: str | None = None) -> dict:
    """Check, profile and store the file at `path` as the next version of dataset `name`."""
    check_name(name, "dataset")
    if not path.is_file():
        raise InvalidRequest(f"{path}: no such file", param="path")
    if fmt is not None and fmt not in tabular.FORMATS:
        raise InvalidRequest(f"unknown format {fmt!r}: choose one of {', '.join(tabular.FORMATS)}", param="format")
    try:
        if fmt is None:
            with open(path, "rb") as f:
                fmt = tabular.detect_format(path.name, f.read(64 * 1024))
        table = tabular.load_table(path, fmt)  # names the line or row that is wrong
    except DatasetError as exc:  # name the file as the client knows it, not the server's staging path
        raise DatasetError(exc.message.replace(str(path), path.name)) from None
    quality = tabular.quality_report(table)
    scan = pii.scan_table(table)
    obj = store.put_file(BUCKET, path, sha256=sha256)  # a mismatch stores nothing
    digest, size = obj.sha256, obj.size
    try:
        with transaction(db):
            existing = db.execute("SELECT version FROM dataset_versions WHERE dataset = ? AND sha256 = ?",
                                  [name, digest]).fetchone()
            if existing:
                raise Conflict(f"this content is already registered as {name} version {existing[0]}", param="path")
            now = time.time()
            if not db.execute("SELECT 1 FROM registered_datasets WHERE name = ?", [name]).fetchone():
                db["registered_datasets"].insert({"name": name, "created_at": now, "created_by": created_by})
            version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM dataset_versions WHERE dataset = ?",
                                 [name]).fetchone()[0]
            row = {
                "id": "dv_" + uuid.uuid4().hex[:12], "dataset": name, "version": version, "format": fmt,
                "sha256": digest, "size": size, "rows": table.num_rows,
                "schema": json.dumps([{"name": f.name, "type": str(f.type)} for f in table.schema]),
                "quality": json.dumps(quality), "pii": json.dumps(scan), "source": source, "parent_id": parent_id,
                "derivation": derivation, "created_at": now, "created_by": created_by,
            }
            db["dataset_versions"].insert(row)
    except BaseException:
        _forget_unreferenced(db, store, [obj.key])
        raise
    return _public(row)


def _referenced_keys(db: sqlite_utils.Database) -> set[str]:
    keys = {f"sha256/{digest}" for (digest,) in db.execute("SELECT sha256 FROM dataset_versions").fetchall()}
    for (parts,) in db.execute("SELECT parts FROM dataset_splits").fetchall():
        keys |= {p["key"] for p in json.loads(parts).values()}
    return keys


def _forget_unreferenced(db: sqlite_utils.Database, store: ObjectStore, keys: list[str]) -> None:
    referenced = _referenced_keys(db)
    for key in keys:
        if key not in referenced:
            store.delete(BUCKET, key)


def _public(row: dict) -> dict:
    out = dict(row)
    for field in ("schema", "quality", "pii"):
        if isinstance(out.get(field), str):
            out[field] = json.loads(out[field])
    return out


def list_datasets(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query(
        """SELECT d.name, d.created_at, count(v.id) AS versions, max(v.version) AS latest
           FROM registered_datasets d LEFT JOIN dataset_versions v ON v.dataset = d.name
           GROUP BY d.name ORDER BY d.name"""
    ))


def versions(db: sqlite_utils.Database, name: str) -> list[dict]:
    rows = list(db.query(
        "SELECT id, dataset, version, format, sha256, size, rows, source, parent_id, derivation, created_at, created_by,"
        " pii FROM dataset_versions WHERE dataset = ? ORDER BY version", [name]))
    if not rows and not db.execute("SELECT 1 FROM registered_datasets WHERE name = ?", [name]).fetchone():
        raise NotFound(f"no registered dataset named {name!r}", param="name")
    for row in rows:
        row["pii_found"] = sum(json.loads(row.pop("pii"))["counts"].values())
    return rows


def get_version(db: sqlite_utils.Database, name: str, version: int) -> dict:
    rows = list(db.query("SELECT * FROM dataset_versions WHERE dataset = ? AND version = ?", [name, version]))
    if not rows:
        raise NotFound(f"dataset {name!r} has no version {version}", param="version")
    out = _public(rows[0])
    out["splits"] = [_split_public(s) for s in db.query(
        "SELECT * FROM dataset_splits WHERE version_id = ? ORDER BY created_at", [out["id"]])]
    return out


def _split_public(row: dict) -> dict:
    return {**row, "ratios": json.loads(row["ratios"]), "parts": json.loads(row["parts"])}


def fetch(store: ObjectStore, row: dict, cache: Path) -> Path:
    """The version's file on local disk (checked against its SHA-256)."""
    target = cache / f"{row['sha256']}{EXTENSIONS[row['format']]}"
    if not target.exists():
        store.get_file(StoredObject(BUCKET, f"sha256/{row['sha256']}", row["sha256"], row["size"]), target)
    return target


def load(store: ObjectStore, row: dict, cache: Path) -> pa.Table:
    return tabular.load_table(fetch(store, row, cache), row["format"])


def rows(db: sqlite_utils.Database, store: ObjectStore, row: dict, cache: Path, *, split: str | None = None,
         part: str = "train") -> list[dict]:
    """The rows of version `row`, or of one part of its split `split`, as dicts (for jobs)."""
    if split is None:
        return load(store, row, cache).to_pylist()
    obj, fmt = part_object(db, row["dataset"], row["version"], split, part)
    cache.mkdir(parents=True, exist_ok=True)
    with store.local_file(obj, cache) as path:
        return tabular.load_table(path, fmt).to_pylist()


def diff(db: sqlite_utils.Database, store: ObjectStore, name: str, a: int, b: int, *, key: str | None,
         cache: Path) -> dict:
    old, new = get_version(db, name, a), get_version(db, name, b)
    result = tabular.diff_tables(load(store, old, cache), load(store, new, cache), key=key)
    return {"dataset": name, "a": a, "b": b, **result}


def mask(db: sqlite_utils.Database, store: ObjectStore, name: str, version: int, *, created_by: str | None,
         cache: Path) -> dict:
    """Register a copy of `version` with every PII match replaced by a placeholder, as a new version."""
    row = get_version(db, name, version)
    masked, counts = pii.mask_table(load(store, row, cache))
    if not any(counts.values()):
        raise InvalidRequest(f"{name} version {version} has no PII to mask", param="version", code="nothing_to_mask")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        path = Path(tmp) / f"{name}-v{version}-masked{EXTENSIONS[row['format']]}"
        tabular.write_table(masked, path, row["format"])
        return register(db, store, name, path, source=f"masked copy of version {version}", created_by=created_by,
                        fmt=row["format"], parent_id=row["id"],
                        derivation=f"masked from version {version}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))


def split(db: sqlite_utils.Database, store: ObjectStore, name: str, version: int, *, ratios: dict[str, float],
          seed: int, created_by: str | None, cache: Path) -> dict:
    """Split a version into named parts (train, validation, test, ...), stored once per seed and ratios."""
    row = get_version(db, name, version)
    ratios_text = json.dumps(ratios, sort_keys=True)
    existing = list(db.query("SELECT * FROM dataset_splits WHERE version_id = ? AND seed = ? AND ratios = ?",
                             [row["id"], seed, ratios_text]))
    if existing:
        return _split_public(existing[0])
    parts_tables = tabular.split_table(load(store, row, cache), ratios, seed)
    parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for part, table in parts_tables.items():
            path = Path(tmp) / f"{name}-v{version}-{part}{EXTENSIONS[row['format']]}"
            tabular.write_table(table, path, row["format"])
            obj = store.put_file(BUCKET, path)
            parts[part] = {"key": obj.key, "sha256": obj.sha256, "size": obj.size, "rows": table.num_rows}
    split_row = {
        "id": "ds_" + hashlib.sha256(f"{row['id']}:{seed}:{ratios_text}".encode()).hexdigest()[:12],
        "version_id": row["id"], "seed": seed, "ratios": ratios_text, "parts": json.dumps(parts),
        "created_at": time.time(), "created_by": created_by,
    }
    try:
        db["dataset_splits"].insert(split_row)
    except BaseException:
        _forget_unreferenced(db, store, [p["key"] for p in parts.values()])
        raise
    return _split_public(split_row)


def part_object(db: sqlite_utils.Database, name: str, version: int, split_id: str, part: str) -> tuple[StoredObject, str]:
    """The stored object of one part of a split, and the version's format."""
    row = get_version(db, name, version)
    for s in row["splits"]:
        if s["id"] == split_id:
            if part not in s["parts"]:
                raise NotFound(f"split {split_id} has no part {part!r} (parts: {', '.join(s['parts'])})", param="part")
            p = s["parts"][part]
            return StoredObject(BUCKET, p["key"], p["sha256"], p["size"]), row["format"]
    raise NotFound(f"{name} version {version} has no split {split_id!r}", param="split")


def delete_version(db: sqlite_utils.Database, store: ObjectStore, name: str, version: int) -> dict:
    """Delete a version, its splits, and their files (where no other version shares them)."""
    with transaction(db):
        row = get_version(db, name, version)
        keys = [f"sha256/{row['sha256']}"] + [p["key"] for s in row["splits"] for p in s["parts"].values()]
        db.execute("UPDATE runs SET dataset_version_id = NULL WHERE dataset_version_id = ?", [row["id"]])
        db.execute("DELETE FROM dataset_splits WHERE version_id = ?", [row["id"]])
        db.execute("UPDATE dataset_versions SET parent_id = NULL WHERE parent_id = ?", [row["id"]])
        db.execute("DELETE FROM dataset_versions WHERE id = ?", [row["id"]])
        if not db.execute("SELECT 1 FROM dataset_versions WHERE dataset = ?", [name]).fetchone():
            db.execute("DELETE FROM registered_datasets WHERE name = ?", [name])
    _forget_unreferenced(db, store, keys)
    return {k: row[k] for k in ("id", "dataset", "version", "sha256", "size", "rows")}
