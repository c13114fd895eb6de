"""Installer fixtures. `edge_bundle` builds the real edge-cpu bundle once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from installer.bundle import build_bundle


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
