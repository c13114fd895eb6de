"""`appliance render`: write deployment files without installing anything."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_options import profile_option
from appliance.config import load_profile


@click.group()
def render() -> None:
    """Write deployment files (systemd units, k3s manifests) for a profile without installing."""


@render.command("k3s")
@profile_option("small-cluster")
@click.option("--inventory", "inventories", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A node's inventory from `appliance probe --json`; once per node.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the manifests into.")
def render_k3s_command(profile_name: str, inventories: tuple[str, ...], out: str) -> None:
    """Write Kubernetes manifests for a k3s cluster into OUT.

    Engine replicas are placed on the nodes as the plan for the given inventories
    decides. Secrets are generated on the first render and kept on later ones. Apply
    with `kubectl apply -f OUT`; images.txt lists the images every node must have.
    """
    from appliance.planning.engine_builds import check_gpu_offload
    from appliance.planning.inventory import read_inventory
    from installer.k3s import host_model_path, render_k3s
    from appliance.planning.planner import make_plan

    profile = load_profile(profile_name)
    machines = [read_inventory(Path(p)) for p in inventories]
    plan = make_plan(profile, machines, whole_gpus=True)
    check_gpu_offload(plan)  # the image carries this machine's llama.cpp build
    out_dir = Path(out)
    written = render_k3s(profile, plan, out_dir, machines)
    click.echo(f"wrote {len(written)} files to {out_dir} (secrets in {out_dir / '10-secrets.yaml'}, mode 0600)")
    click.echo("images to import on every node (images.txt):")
    for image in (out_dir / "images.txt").read_text().split():
        click.echo(f"  {image}")
    click.echo("model files each node needs:")
    for model in profile.models:
        if model.engine != "remote":
            nodes = sorted({p.node for p in plan.model(model.name).replicas})
            click.echo(f"  {host_model_path(profile, model)}  on {', '.join(nodes)}")
    click.echo(f"then: kubectl apply -f {out_dir}")


@render.command("systemd")
@profile_option("auto")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder laid out as the machine's root: units land in OUT/etc/systemd/system.")
@click.option("--inventory", "inventories", multiple=True, type=click.Path(dir_okay=False),
              help="Plan for this inventory (`appliance probe --json`) instead of probing this machine; "
                   "once per node.")
@click.option("--node", help="The plan's node to render for (default: the first, i.e. this machine).")
@click.option("--with-minio", is_flag=True,
              help="The install brings /opt/appliance/bin/minio: an `auto` object store runs it.")
def render_systemd_command(profile_name: str, out: str, inventories: tuple[str, ...], node: str | None,
                           with_minio: bool) -> None:
    """Write hardened systemd units and their config for a bare-metal install into OUT.

    OUT mirrors the target machine: etc/systemd/system (the units and appliance.target),
    etc/appliance (gateway.json, one engine-MODEL-I.env per engine replica with its key,
    minio.env and litestream.env, mode 0600; litestream.yml),
    usr/lib/sysusers.d and usr/lib/tmpfiles.d (the `appliance` user, its folders). Keys are
    generated on the first render into OUT and kept on later ones; an `s3` object store's
    credentials are read from the environment. To install by hand: copy
    the tree onto /, then run `systemd-sysusers`, `systemd-tmpfiles --create`,
    `systemctl daemon-reload` and `systemctl enable --now appliance.target`.
    """
    from appliance.planning.inventory import read_inventory
    from installer.layout import Layout
    from appliance.planning.planner import choose_profile, make_plan
    from appliance.planning.probe import probe
    from installer.systemd import render_systemd

    layout = Layout()
    machines = [read_inventory(Path(p)) for p in inventories] or [probe(layout.data)]
    profile = load_profile(choose_profile(machines) if profile_name == "auto" else profile_name)
    plan = make_plan(profile, machines)
    out_dir = Path(out)
    rendered = render_systemd(profile, plan, layout, out_dir, node=node, with_minio=with_minio)
    click.echo(f"rendered profile {profile.name} for node {node or plan.nodes[0]} into {out_dir}:")
    for path in [*rendered.units, *rendered.files]:
        note = "" if path in rendered.changed else "  (unchanged)"
        click.echo(f"  {path.relative_to(out_dir)}  {path.stat().st_mode & 0o777:04o}{note}")
    for path in rendered.removed:
        click.echo(f"  {path.relative_to(out_dir)}  removed (not in this render)")


@render.command("monitoring")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the files into.")
@click.option("--gateway", "target", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where Prometheus reaches the gateway's /metrics.")
@click.option("--metrics-key-file", type=click.Path(dir_okay=False),
              help="A file holding a key of the metrics role, for a gateway whose profile sets "
                   "gateway.metrics_require_key.")
def render_monitoring_command(out: str, target: str, metrics_key_file: str | None) -> None:
    """Write a Prometheus config that scrapes the gateway, the appliance's alert rules for
    Prometheus, and a Grafana dashboard, into OUT.

    OUT/prometheus.yml names OUT/appliance-rules.yml as its rule file (the same conditions as
    the appliance's own built-in alert rules); import OUT/grafana-dashboard.json into Grafana
    and choose the Prometheus data source that scrapes the gateway.
    """
    from installer.monitoring import write_monitoring

    out_dir = Path(out)
    for path in write_monitoring(out_dir, target, metrics_key_file):
        click.echo(f"  {path}")
