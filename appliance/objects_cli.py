"""`appliance objects status|list|copy`: the object store, seen from this machine.

A store is named by a profile (a built-in name or a YAML file: its `storage:` section as
`appliance up` resolves it for --home), by `file:///folder` (a filesystem store), or by
`http(s)://host:port[?bucket_prefix=P&region=R]` (an S3 endpoint, with the keys in
$APPLIANCE_S3_ACCESS_KEY and $APPLIANCE_S3_SECRET_KEY).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import click
import msgspec

from appliance.cli_format import emit, size, table
from appliance.cli_options import PROFILE_ENV, home_option, json_option
from appliance.config import DEFAULT_PROFILE, BucketPrefix, StorageConfig, load_profile
from appliance.errors import ApplianceError, ProfileError
from appliance.home import resolve_home, tmp_dir
from appliance.objectstore import BUCKETS, FilesystemSettings, ObjectStoreSettings, S3Settings, StoredObject
from appliance.objectstore.copy import copy_objects

USAGE = ("name a store by a profile (built-in name or YAML file), file:///folder, "
         "or http(s)://host:port[?bucket_prefix=P&region=R]")
S3_KEYS = StorageConfig()  # the profile's default names of the S3 keys' variables


def parse_store(text: str, home: str | None, param: str) -> ObjectStoreSettings:
    """The store that `text` names (see the module's doc); errors name `param`."""
    url = urlsplit(text)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path.startswith("/") or url.query:
            raise click.BadParameter(f"{text!r}: a filesystem store is file:///absolute/folder", param_hint=param)
        return FilesystemSettings(path=os.path.normpath(unquote(url.path)))
    if url.scheme in ("http", "https"):
        return _s3_store(text, url, param)
    if "://" in text:
        raise click.BadParameter(f"{text!r}: the scheme {url.scheme!r} is not supported; {USAGE}", param_hint=param)
    from services.storage.minio import resolve_object_store

    try:
        store, _ = resolve_object_store(load_profile(text, check_files=False), resolve_home(home), as_client=True)
    except ProfileError as exc:
        raise click.BadParameter(f"{exc.message} ({USAGE})", param_hint=param) from None
    if store is None:
        raise click.BadParameter(f"profile {text!r} has no object store (storage.object_store is 'none')",
                                 param_hint=param)
    return store


def _s3_store(text: str, url, param: str) -> S3Settings:
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    if unknown := sorted(set(query) - {"bucket_prefix", "region"}):
        raise click.BadParameter(f"{text!r}: unknown parameter {', '.join(unknown)} (only bucket_prefix and region)",
                                 param_hint=param)
    if not url.netloc or url.path not in ("", "/"):
        raise click.BadParameter(f"{text!r}: an S3 store is its endpoint, http(s)://host:port", param_hint=param)
    try:
        prefix = msgspec.convert(query.get("bucket_prefix", ""), BucketPrefix)
    except msgspec.ValidationError:
        raise click.BadParameter(f"{text!r}: bucket_prefix is lowercase letters, digits and '-', ending in '-'",
                                 param_hint=param) from None
    keys = [os.environ.get(S3_KEYS.access_key_env), os.environ.get(S3_KEYS.secret_key_env)]
    if not all(keys):
        raise click.BadParameter(f"{text!r}: an S3 store needs its keys in {S3_KEYS.access_key_env} and "
                                 f"{S3_KEYS.secret_key_env}", param_hint=param)
    return S3Settings(endpoint=f"{url.scheme}://{url.netloc}", access_key=keys[0], secret_key=keys[1],
                      region=query.get("region") or "us-east-1", bucket_prefix=prefix)


store_home_option = home_option("The home a profile's store is resolved for (its folder, MinIO's credentials). "
                                "Default: ./var")


def store_option(*names: str, help: str):
    """An optional store, by default the --profile of `appliance up` ($APPLIANCE_PROFILE, else edge-cpu)."""
    return click.option(*names, metavar="PROFILE_OR_URL", default=DEFAULT_PROFILE, envvar=PROFILE_ENV,
                        show_default=True, show_envvar=True, help=help)


def _say_progress(obj: StoredObject, outcome: str) -> None:
    if outcome != "present":
        click.echo(f"{outcome} {obj.bucket}/{obj.key} ({size(obj.size)})", err=True)


@click.group()
def objects() -> None:
    """The object store: what it holds, and copying it to another store.

    A store is a profile (its storage section, for --home), file:///folder (a filesystem
    store) or http(s)://host:port[?bucket_prefix=P&region=R] (an S3 endpoint; keys in
    APPLIANCE_S3_ACCESS_KEY and APPLIANCE_S3_SECRET_KEY).

    These read and write the stores themselves, not through the admin API: they move
    bytes between stores and change nothing the appliance records (a target is used
    only once the profile points at it), so they also work while the gateway is down.
    """


@objects.command("status")
@store_option("--store", "store_text", help="The store to look at.")
@store_home_option
@json_option()
def objects_status(store_text: str, home: str | None, as_json: bool) -> None:
    """Where the store is and what each bucket holds (it fails when the store does not answer)."""
    settings = parse_store(store_text, home, "--store")
    store = settings.open()
    buckets = []
    for bucket in BUCKETS:
        sizes = [obj.size for obj in store.list_objects(bucket)]
        buckets.append({"bucket": bucket, "objects": len(sizes), "bytes": sum(sizes)})
    data = {"store": settings.label, "settings": _public(settings), "buckets": buckets}
    emit(data, as_json, lambda d: f"{d['store']}\n" + table(
        [{**b, "size": size(b["bytes"])} for b in d["buckets"]], ["bucket", "objects", "size"]))


@objects.command("list")
@click.argument("bucket", type=click.Choice(BUCKETS), required=False)
@store_option("--store", "store_text", help="The store to look at.")
@store_home_option
@json_option()
def objects_list(bucket: str | None, store_text: str, home: str | None, as_json: bool) -> None:
    """List the stored objects (of BUCKET, or of every bucket)."""
    store = parse_store(store_text, home, "--store").open()
    rows = [{"bucket": obj.bucket, "key": obj.key, "size": obj.size}
            for name in ([bucket] if bucket else BUCKETS) for obj in store.list_objects(name)]
    emit(rows, as_json, lambda rs: table([{**r, "size": size(r["size"])} for r in rs], ["bucket", "key", "size"]))


@objects.command("copy")
@click.option("--to", "target_text", metavar="PROFILE_OR_URL", required=True, help="The store to copy into.")
@store_option("--from", "source_text", help="The store to copy from.")
@store_home_option
@json_option("Print the counts as JSON.")
def objects_copy(target_text: str, source_text: str, home: str | None, as_json: bool) -> None:
    """Copy every object into another store, e.g. when the appliance outgrows this machine.

    Each object is checked against its SHA-256 on the way; those already in the target are
    skipped, so running it again after a failure copies only what is missing. Afterwards,
    point the profile's storage section at the target. It exits non-zero when a store fails
    or an object could not be copied.
    """
    source, target = parse_store(source_text, home, "--from"), parse_store(target_text, home, "--to")
    if source == target:
        raise click.BadParameter(f"{target.label} is also the store copied from", param_hint="--to")
    # Downloads from S3 pass through the home's disk when there is one (a model may not fit in /tmp).
    home_dir = resolve_home(home)
    if home_dir.is_dir():
        tmp_dir(home_dir).mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="objects-copy-", dir=tmp_dir(home_dir) if home_dir.is_dir() else None) as work:
        report = copy_objects(source.open(), target.open(), Path(work), on_object=_say_progress)
    emit(msgspec.to_builtins(report), as_json, lambda r: (
        f"{r['copied']} copied ({size(r['copied_bytes'])}), {r['present']} already there, {len(r['failed'])} failed: "
        f"from {source.label} to {target.label}"))
    if report.failed:
        raise ApplianceError(f"{len(report.failed)} object(s) were not copied:\n  " + "\n  ".join(report.failed))


def _public(settings: ObjectStoreSettings) -> dict:
    """The settings without the secret key."""
    return {k: v for k, v in msgspec.to_builtins(settings).items() if k != "secret_key"}
