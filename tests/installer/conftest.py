"""Installer fixtures. `edge_bundle` builds the real edge-cpu bundle once per session;
`next_source` is this source as the next version, 0.1.1, for upgrades."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from installer.bundle import build_bundle

ROOT_DIR = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bundle: builds the real ~335 MB edge-cpu bundle (pip wheel from the index or pip's cache)"
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if "edge_bundle" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.bundle)


@pytest.fixture(scope="session")
def edge_bundle(tmp_path_factory) -> Path:
    """The edge-cpu bundle, as `appliance bundle build --profile edge-cpu` makes it: ~335 MB, ~15 s with
    pip's wheel cache warm (the first llama-server build takes minutes). Tests must not modify it."""
    return build_bundle("edge-cpu", tmp_path_factory.mktemp("bundle") / "edge-cpu.tar").path


@pytest.fixture(scope="session")
def next_source(tmp_path_factory) -> Path:
    """This source's tracked files with the version bumped to 0.1.1: the next version to upgrade to."""
    source = tmp_path_factory.mktemp("next") / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT_DIR, capture_output=True, text=True, check=True).stdout
    for name in tracked.split("\n"):
        if name and (ROOT_DIR / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT_DIR / name, source / name)
    pyproject = source / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.1.1"', 1))
    return source
