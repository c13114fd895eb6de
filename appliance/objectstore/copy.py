"""Copying every object of one store into another, for an admin who moves the appliance's
objects (to a bigger machine, or from the embedded filesystem store to S3 and back)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance.errors import ChecksumMismatch
from appliance.objectstore.base import BUCKETS, ObjectStore, StoredObject


class CopyReport(msgspec.Struct, kw_only=True):
    source: str
    target: str
    copied: int = 0
    copied_bytes: int = 0
    present: int = 0  # already in the target (same key and size): skipped
    failed: list[str] = []  # "bucket/key: why", for objects whose bytes do not match their SHA-256


def copy_objects(source: ObjectStore, target: ObjectStore, work: Path,
                 on_object: Callable[[StoredObject, str], None] | None = None) -> CopyReport:
    """Every content-addressed object of every bucket, from source to target.

    Each object is checked against its SHA-256 on the way (put_file with the digest its key
    names), so a corrupt object is never copied: it is reported in `failed` and the copy goes
    on. Any other failure (a store down, a full disk) stops the copy with its error; what was
    copied before stays, and running it again skips it. `on_object(obj, outcome)` hears of
    each object: "copied", "present" or "failed".
    """
    target.ensure_buckets()
    report = CopyReport(source=source.location, target=target.location)
    for bucket in BUCKETS:
        for obj in source.list_objects(bucket):
            outcome = "present"
            if target.exists(bucket, obj.key) == obj.size:
                report.present += 1
            else:
                try:
                    with source.local_file(obj, work) as path:
                        target.put_file(bucket, path, sha256=obj.sha256)
                    outcome = "copied"
                    report.copied += 1
                    report.copied_bytes += obj.size
                except ChecksumMismatch as exc:
                    outcome = "failed"
                    report.failed.append(f"{bucket}/{obj.key}: corrupt in the source, not copied ({exc.message})")
            if on_object is not None:
                on_object(obj, outcome)
    return report
