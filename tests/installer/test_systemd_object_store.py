"""A bare-metal install with the filesystem store: gateway.json names it, and the units that
store and fetch objects may write its folder, wherever it is."""

from __future__ import annotations

import msgspec

from appliance.objectstore import FilesystemSettings
from installer.systemd import render_systemd
from services.gateway.runtime import GatewayRuntime
from tests.installer.test_systemd import LAYOUT, UNITS, edge_plan, service  # noqa: F401 (edge_plan: a fixture)

USERS = ("appliance-gateway.service", "appliance-worker.service", "appliance-controller.service")


def test_a_filesystem_store_outside_the_home_is_made_and_writable(edge_plan, tmp_path):
    profile, plan = edge_plan
    storage = msgspec.structs.replace(profile.storage, object_store="filesystem", data_path="/srv/objects")
    out = tmp_path / "out"
    render_systemd(msgspec.structs.replace(profile, storage=storage), plan, LAYOUT, out)
    runtime = msgspec.json.decode((out / "etc/appliance/gateway.json").read_bytes(), type=GatewayRuntime)
    assert runtime.storage == FilesystemSettings(path="/srv/objects")
    for unit in USERS:
        assert service(out / UNITS / unit)["ReadWritePaths"].split() == ["/var/lib/appliance", "/srv/objects"], unit
    engine = service(out / UNITS / "appliance-engine-smollm2-135m-instruct-0.service")
    assert engine["ReadWritePaths"] == "/var/lib/appliance"  # engines read the fetched copies in the home
    assert "d /srv/objects 0750 appliance appliance -" in (out / "usr/lib/tmpfiles.d/appliance.conf").read_text()

