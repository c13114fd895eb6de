"""`appliance bundle build|verify`: the air-gapped bundle from the command line (see installer.bundle)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.filesize import decimal as _size

from appliance.cli_options import profile_option
from installer.image import DEFAULT_MIRROR

if TYPE_CHECKING:  # installer.bundle is imported by the commands only: it adds ~60 ms to every CLI start
    from installer.bundle import BuildResult


def summary(result: BuildResult) -> str:
    """What a build produced, for the admin who carries the file across the air gap."""
    m = result.manifest
    wheels = [f.size for f in m.files if f.path.startswith("wheels/")]
    models = Counter()
    for f in m.files:
        if f.path.startswith("models/"):
            models[f.path.split("/")[1]] += f.size
    extras = m.requirement.partition("[")[2].partition("]")[0].split(",")
    minio = ("yes (bin/minio)" if "minio" in m.binaries else
             "no (add --minio PATH_OR_URL --minio-sha256 HEX to include it)")
    return "\n".join([
        f"bundle:     {result.path}",
        f"size:       {_size(result.size)}",
        f"sha256:     {result.sha256}",
        f"profile:    {m.profile} (appliance {m.appliance_version}, for {m.python} on {m.platform})",
        f"wheels:     {len(wheels)} ({_size(sum(wheels))})",
        "models:     " + (", ".join(f"{name} ({_size(size)})" for name, size in models.items()) or "none"),
        f"litestream: {m.binaries['litestream']}",
        f"minio:      {minio}",
        "training:   " + ("yes (torch, transformers, peft)" if "train" in extras else
                          "no (add --with-training to run fine-tuning jobs)"),
        "image:      " + ("; ".join(f"{ref} ({member})" for ref, member in m.images.items()) or
                          "no (add --image for k3s or podman)"),
    ])


@click.group()
def bundle() -> None:
    """Air-gapped bundles: build on a connected machine, verify, install with ./install.sh --bundle."""


@bundle.command("build")
@profile_option()
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle file to write (a tar).")
@click.option("--source", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The appliance source folder (with pyproject.toml). Default: the checkout this "
                   "appliance is installed from (pip install -e).")
@click.option("--minio", metavar="PATH_OR_URL", help="The MinIO server binary to include: a file or an http(s) URL.")
@click.option("--minio-sha256", metavar="HEX", help="The pinned SHA-256 of the MinIO binary (required with --minio).")
@click.option("--with-training", "training", is_flag=True,
              help="Include the fine-tuning stack (torch, transformers, peft; about 250 MB more), so "
                   "fine-tuning jobs run on the installed appliance.")
@click.option("--image/--no-image", default=None,
              help="Include the appliance image for k3s and podman (an OCI archive, built with podman). "
                   "Default: when the profile has a k3s: section.")
@click.option("--debian-mirror", metavar="URL", default=DEFAULT_MIRROR, show_default=True,
              help="Where debootstrap gets the image's Debian base, the first time only.")
def bundle_build(profile_name: str, output: Path, source: Path | None, minio: str | None, minio_sha256: str | None,
                 training: bool, image: bool | None, debian_mirror: str) -> None:
    """Build an air-gapped bundle: wheels, models, binaries and their checksums.

    Run it on a connected machine with the target's OS, Python version and CPU
    architecture: the wheels are built for this machine's platform. Ends with a
    summary that includes the bundle's SHA-256.
    """
    from installer.bundle import build_bundle

    result = build_bundle(profile_name, output, source=source, minio=minio, minio_sha256=minio_sha256,
                          training=training, image=image, debian_mirror=debian_mirror)
    click.echo(summary(result))


@bundle.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def bundle_verify(file: Path) -> None:
    """Check bundle FILE against its manifest, extracting nothing.

    Every listed file must be there with its size and SHA-256, and nothing else: no
    unlisted member, link, device, absolute path or '..'.
    """
    from installer.bundle import verify_bundle

    m = verify_bundle(file)
    click.echo(f"{file}: OK, {len(m.files)} files match the manifest "
               f"(profile {m.profile}, appliance {m.appliance_version}, for {m.python} on {m.platform}, built {m.created_at})")
