"""`./install.sh --bundle FILE --root DIR`: an offline install into a directory tree, then
the installed appliance serves a chat answer; a second run changes nothing; uninstall."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import start_stack
from tests.installer.test_systemd import verify_errors

ROOT_DIR = Path(__file__).resolve().parents[2]
INSTALL = ROOT_DIR / "install.sh"


def offline_env() -> dict[str, str]:
    """Every package index unreachable: a dead index URL, no find-links, no pip config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_CONFIG_FILE=os.devnull,
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return env


def install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=offline_env(), timeout=600)


@pytest.fixture(scope="module")
def installed(edge_bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("installed") / "root"
    done = install("--bundle", str(edge_bundle), "--root", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_bundle_install_lays_out_the_machine(installed):
    root = installed
    assert (root / "opt/appliance/bin/appliance").is_file() and (root / "opt/appliance/bin/litestream").is_file()
    profile = yaml.safe_load((root / "etc/appliance/profile.yaml").read_text())
    model = Path(profile["models"][0]["path"])
    assert model.parts[:5] == ("/", "var", "lib", "appliance", "models") and (root / model.relative_to("/")).is_file()
    engine_keys = [str(p.relative_to(root)) for p in (root / "etc/appliance").glob("engine-*.env")]
    assert engine_keys and not (root / "etc/appliance/engines.env").exists()
    for secret in ("etc/appliance/gateway.json", *engine_keys, "var/lib/appliance/admin.key"):
        assert (root / secret).stat().st_mode & 0o777 == 0o600, secret
    assert "appliance:" in (root / "etc/passwd").read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/appliance.target").is_symlink()


def test_installed_units_pass_systemd_analyze_verify(installed, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(installed / "etc/systemd/system", tree / "etc/systemd/system", ignore=shutil.ignore_patterns("*.wants"))
    assert verify_errors(tree, tmp_path) == ""


def test_second_install_changes_nothing(installed, edge_bundle):
    before = {p: p.stat().st_mtime_ns for p in installed.rglob("*") if p.is_file() and "opt/appliance" not in str(p)}
    done = install("--bundle", str(edge_bundle), "--root", str(installed))
    assert done.returncode == 0, done.stderr
    assert "nothing changed" in done.stdout
    after = {p: p.stat().st_mtime_ns for p in installed.rglob("*") if p.is_file() and "opt/appliance" not in str(p)}
    assert after == before


@pytest.mark.stack
def test_installed_appliance_answers_a_chat(installed, tmp_path):
    """The installed virtual environment and model, run with `appliance up` (no systemd here)."""
    profile = yaml.safe_load((installed / "etc/appliance/profile.yaml").read_text())
    for model in profile["models"]:
        model["path"] = str(installed / Path(model["path"]).relative_to("/"))
    (tmp_path / "installed.yaml").write_text(yaml.safe_dump(profile))
    stack = start_stack(tmp_path, tmp_path / "installed.yaml", appliance=installed / "opt/appliance/bin/appliance")
    try:
        answer = stack.client().chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=24,
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in answer.choices[0].message.content
    finally:
        stack.stop()


def tampered(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` with a byte flipped inside the data of its largest member."""
    shutil.copy(bundle, dest)
    with tarfile.open(dest) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)
    with open(dest, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(member.offset_data + member.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dest


def test_tampered_bundle_is_refused_before_anything_is_written(edge_bundle, tmp_path):
    bad = tampered(edge_bundle, tmp_path / "bad.tar")
    root = tmp_path / "root"
    done = install("--bundle", str(bad), "--root", str(root))
    assert done.returncode != 0
    assert "SHA-256 mismatch" in done.stderr
    assert not any(root.iterdir())


def test_uninstall_keeps_data_unless_purged(edge_bundle, tmp_path):
    root = tmp_path / "root"
    assert install("--bundle", str(edge_bundle), "--root", str(root)).returncode == 0
    appliance = str(root / "opt/appliance/bin/appliance")
    done = subprocess.run([appliance, "uninstall", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (root / "opt/appliance").exists() and not (root / "etc/appliance").exists()
    assert not list((root / "etc/systemd/system").glob("appliance*"))
    assert (root / "var/lib/appliance/state.db").is_file() and "kept the data" in done.stdout
    # --purge, by this checkout's CLI (the installed one is gone; installing again costs half a minute)
    done = subprocess.run([str(Path(sys.executable).parent / "appliance"), "uninstall", "--root", str(root), "--purge"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (root / "var/lib/appliance").exists() and "removed the data" in done.stdout


def test_install_picks_the_profile_from_the_hardware(tmp_path):
    """`appliance install` without --profile (install.sh from a source tree): `auto`, edge-cpu on this CPU box."""
    root = tmp_path / "root"
    done = subprocess.run([str(Path(sys.executable).parent / "appliance"), "install", "--root", str(root)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "edge-cpu.yaml" in done.stdout
    assert yaml.safe_load((root / "etc/appliance/profile.yaml").read_text())["name"] == "edge-cpu"
