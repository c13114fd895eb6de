"""Checks and unpacks a bundle with nothing but the Python standard library.

`install.sh --bundle FILE` runs this file with the machine's own python3, before any
virtual environment exists and before anything is written to the install target:

    python3 bundle_check.py verify FILE
    python3 bundle_check.py unpack FILE DEST

installer.bundle uses the same functions (with a progress display). The bundle carries
this file as its member `bundle_check.py`, listed in its manifest like every other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import sysconfig
import tarfile
from pathlib import Path, PurePosixPath

FORMAT = 2  # 2: the manifest records the CPU features and the accelerator its binaries need
MANIFEST = "manifest.json"
PROFILE = "profile.yaml"
SELF = "bundle_check.py"
PYTHON_TAG = "cp" + sysconfig.get_config_var("py_version_nodot")
PLATFORM = sysconfig.get_platform()
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20
CPUINFO = Path("/proc/cpuinfo")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


class BundleProblem(Exception):
    """What is wrong with a bundle, naming the member."""


def _problem(member: tarfile.TarInfo, expected: dict[str, dict], seen: set[str]) -> str | None:
    name = member.name
    if name.startswith("/"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..' (path traversal)"
    if not member.isreg():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
                "a directory" if member.isdir() else "a device or FIFO" if member.isdev() else "not a regular file")
        return f"is {kind}; a bundle holds only regular files"
    if name in seen:
        return "appears twice"
    if name not in expected:
        return "not listed in the manifest"
    if member.size != expected[name]["size"]:
        return f"size mismatch (manifest {expected[name]['size']} bytes, file {member.size} bytes)"
    return None


def _read_manifest(tar: tarfile.TarFile, first: tarfile.TarInfo | None) -> dict:
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BundleProblem(f"not a bundle: its first member must be the file {MANIFEST}")
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleProblem(f"{MANIFEST}: {first.size} bytes, too large for a manifest")
    try:
        manifest = json.loads(tar.extractfile(first).read())
        files = manifest["files"]
        fmt, binaries = manifest["format"], manifest["binaries"]
        listed = {f["path"] for f in files}
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleProblem(f"{MANIFEST}: not a valid bundle manifest: {exc}") from None
    if fmt != FORMAT:
        raise BundleProblem(f"{MANIFEST}: bundle format {fmt} is not supported (this appliance reads {FORMAT})")
    if not isinstance(manifest.get("cpu_features"), list) or manifest.get("accelerator") not in ("none", "cuda"):
        raise BundleProblem(f"{MANIFEST}: not a valid bundle manifest: needs cpu_features (a list) and accelerator "
                            "('none' or 'cuda')")
    for needed in (PROFILE, *binaries.values(), *manifest.get("images", {}).values()):
        if needed not in listed:
            raise BundleProblem(f"{MANIFEST}: does not list {needed}")
    return manifest


def _digest(f, advance) -> str:
    digest = hashlib.sha256()
    while data := f.read(CHUNK):
        digest.update(data)
        advance(len(data))
    return digest.hexdigest()


def verify(path: Path, advance=lambda n: None, *, on_manifest=lambda manifest: None) -> dict:
    """Check every member against the manifest without extracting anything; return the manifest.

    `advance(n)` is called as bytes are hashed; `on_manifest(m)` once the manifest is read.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BundleProblem(f"{path}: cannot read the bundle: {exc.strerror}") from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:
            raise BundleProblem(f"{path}: not a bundle (not an uncompressed tar file)") from None
        try:
            members = iter(tar)
            manifest = _read_manifest(tar, next(members, None))
            on_manifest(manifest)
            expected = {entry["path"]: entry for entry in manifest["files"]}
            seen: set[str] = set()
            for member in members:
                if problem := _problem(member, expected, seen):
                    raise BundleProblem(f"{member.name}: {problem}")
                seen.add(member.name)
                want, got = expected[member.name]["sha256"], _digest(tar.extractfile(member), advance)
                if got != want:
                    raise BundleProblem(f"{member.name}: SHA-256 mismatch (manifest {want}, file {got})")
            # tarfile stops quietly at a cut between members; a whole bundle ends with two zero blocks
            f.seek(tar.offset)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.ReadError, EOFError):
            raise BundleProblem(f"{path}: the bundle is truncated") from None
    missing = [p for p in expected if p not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BundleProblem(f"{missing[0]}: listed in the manifest but missing from the bundle{more}")
    return manifest


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The CPU's feature flags as the kernel names them (avx2, fma...), or None where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def incompatibility(manifest: dict, cpuinfo: Path = CPUINFO) -> str | None:
    """Why the bundle's binaries cannot run on this machine, if they cannot: another Python
    or platform, a CPU without an instruction set they use, or no GPU driver for a GPU engine."""
    if (manifest["python"], manifest["platform"]) != (PYTHON_TAG, PLATFORM):
        return (f"the bundle was built for {manifest['python']} on {manifest['platform']}, this machine runs {PYTHON_TAG} "
                f"on {PLATFORM}: build the bundle on a machine with this machine's OS, Python and CPU architecture")
    flags = cpu_flags(cpuinfo)
    missing = [f for f in manifest["cpu_features"] if flags is not None and f not in flags]
    if missing:
        return (f"this machine's CPU lacks {', '.join(missing)}, which the bundle's llama.cpp build uses "
                f"(it needs {', '.join(manifest['cpu_features'])}): it would die with an illegal instruction")
    if manifest["accelerator"] == "cuda" and not NVIDIA_DRIVER.exists():
        return (f"the bundle's vLLM engine needs an NVIDIA GPU with its driver, and none is loaded here "
                f"({NVIDIA_DRIVER} is absent): install the driver first, or build a bundle for a CPU profile")
    return None


def unpack(path: Path, dest: Path, advance=lambda n: None) -> Path:
    """Extract a bundle that verify() accepted into `dest`, which must not exist yet.

    Extraction goes to `dest`.tmp, renamed at the end: `dest` is whole or absent.
    """
    dest = Path(dest).absolute()
    if dest.exists():
        raise BundleProblem(f"{dest}: already exists; a bundle unpacks into a new folder")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted unpack
    try:
        tmp.mkdir(parents=True)
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                tar.extract(member, tmp, filter="data")
                advance(member.size)
        tmp.rename(dest)
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleProblem(f"{path}: cannot unpack into {dest}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "verify":
            manifest = verify(Path(argv[1]))
            print(f"{argv[1]}: {len(manifest['files'])} files verified (appliance {manifest['appliance_version']}, "
                  f"profile {manifest['profile']})")
        elif len(argv) == 3 and argv[0] == "unpack":
            if problem := incompatibility(verify(Path(argv[1]))):
                raise BundleProblem(problem)
            print(unpack(Path(argv[1]), Path(argv[2])))
        else:
            print("usage: python3 bundle_check.py verify FILE | unpack FILE DEST", file=sys.stderr)
            return 2
    except BundleProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
