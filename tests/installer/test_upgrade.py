"""`appliance upgrade` (and `install.sh --bundle FILE --upgrade`) on a `--root` install: from
the edge bundle (0.1.0) to the next one (0.1.1), built from a copy of this source with
only its version changed. A bundle whose engine cannot start fails the health check and is
rolled back to the very same environment, configuration and rows; the good one keeps
every row; running it again changes nothing."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance.db import open_db
from appliance.teams import create_team
from appliance.users import create_user
from installer.bundle import build_bundle, read_manifest, unpack_bundle, write_bundle
from tests.conftest import BIN
from tests.installer.test_install import ROOT_DIR, install, offline_env, tampered

pytestmark = pytest.mark.bundle


@pytest.fixture(scope="module")
def next_bundle(next_source, tmp_path_factory) -> Path:
    """The edge-cpu bundle of version 0.1.1."""
    return build_bundle("edge-cpu", tmp_path_factory.mktemp("next") / "edge-cpu-0.1.1.tar", source=next_source).path


def with_broken_engine(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle`, checksums, image and all, whose profile's engine refuses its arguments."""
    unpacked = unpack_bundle(bundle, dest.with_suffix(".unpacked"))
    profile = yaml.safe_load((unpacked / "profile.yaml").read_text())
    profile["models"][0]["extra_args"] = ["--no-such-llama-flag"]
    (unpacked / "profile.yaml").write_text(yaml.safe_dump(profile))
    manifest = read_manifest(unpacked)
    members = {f.path: unpacked / f.path for f in manifest.files}
    write_bundle(dest, members, profile=manifest.profile, appliance_version=manifest.appliance_version,
                 requirement=manifest.requirement, binaries=manifest.binaries, images=manifest.images)
    shutil.rmtree(unpacked)
    return dest


@pytest.fixture(scope="module")
def broken_bundle(next_bundle, tmp_path_factory) -> Path:
    return with_broken_engine(next_bundle, tmp_path_factory.mktemp("broken") / "broken.tar")


def version(root: Path) -> str:
    return subprocess.run([str(root / "opt/appliance/bin/appliance"), "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def snapshot(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table (FTS shadow tables aside), as stored."""
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '%_fts%' ORDER BY name")]
        return {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        conn.close()


def upgrade(root: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "opt/appliance/bin/appliance"), "upgrade", "--root", str(root), "--bundle",
                           str(bundle), *extra], capture_output=True, text=True, env=offline_env(), timeout=900)


def test_a_failed_upgrade_rolls_back_and_a_good_one_keeps_every_row(edge_bundle, next_bundle, broken_bundle,
                                                                      tmp_path):
    root = tmp_path / "root"
    done = install("--bundle", str(edge_bundle), "--root", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    state = root / "var/lib/appliance/state.db"
    db = open_db(state)
    create_user(db, "alice", role="developer", email="alice@example.com")
    create_team(db, "research")
    db.conn.close()
    rows = snapshot(state)
    assert any(rows[t] for t in ("users", "teams", "api_keys"))
    profile = (root / "etc/appliance/profile.yaml").read_bytes()
    units = {p.name: p.read_bytes() for p in (root / "etc/systemd/system").glob("appliance*") if p.is_file()}

    refused = upgrade(root, tampered(next_bundle, tmp_path / "tampered.tar"))
    assert refused.returncode != 0 and "SHA-256" in refused.stderr, refused.stderr
    assert not (root / "var/lib/appliance/backups").exists(), "nothing is written before the bundle checks out"

    failed = upgrade(root, broken_bundle, "--health-timeout", "120")
    assert failed.returncode != 0, failed.stdout
    assert "failed, so it was rolled back to 0.1.0" in failed.stderr, failed.stderr
    assert "the new version exited with 1 before it was ready" in failed.stderr, failed.stderr
    assert "--no-such-llama-flag" in failed.stderr, "the engine's own complaint is quoted"
    assert version(root) == "appliance, version 0.1.0"
    assert snapshot(state) == rows, "the databases are as they were"
    assert (root / "etc/appliance/profile.yaml").read_bytes() == profile
    assert {p.name: p.read_bytes() for p in (root / "etc/systemd/system").glob("appliance*") if p.is_file()} == units
    assert not (root / "opt/appliance.previous").exists() and not (root / "etc/appliance/bundle.json").exists()

    # install.sh's equivalent, to the good bundle.
    done = subprocess.run([str(ROOT_DIR / "install.sh"), "--bundle", str(next_bundle), "--upgrade", "--root", str(root)],
                          capture_output=True, text=True, env=offline_env(), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "upgraded appliance 0.1.0 to 0.1.1" in done.stdout and "health check:  passed" in done.stdout
    assert version(root) == "appliance, version 0.1.1"
    after = snapshot(state)
    for table, table_rows in rows.items():
        assert set(table_rows) <= set(after[table]), f"{table}: a row went missing"
    failed_backup, backup = sorted((root / "var/lib/appliance/backups").glob("upgrade-*/state.db"))
    assert snapshot(backup) == snapshot(failed_backup) == rows, "each upgrade backed up the rows as they were"
    assert not (root / "opt/appliance.previous").exists()

    again = upgrade(root, next_bundle)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do: appliance 0.1.1"), again.stdout


def test_upgrade_needs_an_install(next_bundle, tmp_path):
    nothing = subprocess.run([str(BIN / "appliance"), "upgrade", "--root", str(tmp_path / "empty"), "--bundle",
                              str(next_bundle)], capture_output=True, text=True)
    assert nothing.returncode != 0 and "no appliance is installed in" in nothing.stderr
    done = subprocess.run([str(ROOT_DIR / "install.sh"), "--bundle", str(next_bundle), "--upgrade", "--root",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode != 0 and "nothing to upgrade" in done.stderr


def test_a_cluster_upgrade_is_refused_before_it_reaches_the_cluster(edge_bundle, tmp_path):
    """Wrong folders, options and bundles are refused before kubectl is run (here: a kubectl that fails)."""
    inventory = Path(__file__).parents[1] / "inventories" / "edge-cpu-here.json"
    out = tmp_path / "manifests"
    subprocess.run([str(BIN / "appliance"), "render", "k3s", "--profile", "edge-cpu", "--inventory", str(inventory),
                    "--out", str(out)], check=True, capture_output=True)

    def cluster_upgrade(bundle: Path, manifests: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "appliance"), "upgrade", "--bundle", str(bundle), "--manifests", str(manifests),
                               "--kubectl", "false", *extra], capture_output=True, text=True)

    no_image = cluster_upgrade(edge_bundle, out)
    assert no_image.returncode != 0 and "carries no appliance image" in no_image.stderr, no_image.stderr
    bad = cluster_upgrade(tampered(edge_bundle, tmp_path / "tampered.tar"), out)
    assert bad.returncode != 0 and "SHA-256" in bad.stderr, bad.stderr
    empty = cluster_upgrade(edge_bundle, tmp_path)
    assert empty.returncode == 2 and "no control Deployment" in empty.stderr and "--manifests" in empty.stderr
    both = cluster_upgrade(edge_bundle, out, "--root", str(tmp_path))
    assert both.returncode == 2 and "--root is for a bare-metal install" in both.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("manifests")) == ["manifests"]
