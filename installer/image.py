"""The appliance image for k3s and podman, built with no network.

A Debian base is made once with debootstrap (the one step that needs Debian's archive, on
the connected machine that builds the bundle) and kept in podman's storage; the appliance
goes on top from the bundle's own wheels by k3s/Containerfile, with `--network none`. The
image is saved as an OCI archive, which `k3s ctr images import` and `podman load` both
take, and manifests name it by the digest of its manifest, which the archive keeps.

    base_image(mirror) -> str                          the base's name, made if missing
    build_image(wheels, requirement, version, base)    -> str, the image's name
    save_image(name, dest) -> Image                    the OCI archive; its name and digest
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import msgspec

from appliance.errors import InstallError
from services.engines.kube import IMAGE_UID  # the image's user, whom the manifests run it as

NAME = "localhost/appliance"  # localhost/: never pulled, only ever loaded from the archive
BASE_NAME = "localhost/appliance-base"
SUITE = "bookworm"  # Debian 12, whose python3 is 3.11: the Python the bundle's wheels are for
# libgomp1: llama-server's OpenMP; ca-certificates: TLS to remote models and S3.
BASE_PACKAGES = ("python3", "python3-venv", "libgomp1", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ARCHIVE = "images/appliance.oci.tar"  # its member in the bundle


class Image(msgspec.Struct, frozen=True):
    name: str  # localhost/appliance:VERSION
    digest: str  # sha256:... of the image's manifest

    @property
    def reference(self) -> str:
        """The name pinned by digest, as manifests use it."""
        return f"{self.name}@{self.digest}"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InstallError(f"{name} is not installed; the appliance image needs it (Debian: apt-get install {name})")
    return path


def _run(argv: list[str], what: str, **kwargs) -> str:
    """Run argv; a failure is an InstallError with what it was doing and the end of its output."""
    result = subprocess.run(argv, stdin=kwargs.pop("stdin", subprocess.DEVNULL), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)
    if result.returncode:
        tail = "\n".join(result.stdout.splitlines()[-20:])
        raise InstallError(f"{what} failed (exit {result.returncode}); its last lines:\n{tail}")
    return result.stdout


def _exists(name: str) -> bool:
    return subprocess.run([_tool("podman"), "image", "exists", name]).returncode == 0


def base_image(mirror: str = DEFAULT_MIRROR) -> str:
    """The Debian base in podman's storage, made with debootstrap from `mirror` if it is not there."""
    name = f"{BASE_NAME}:{SUITE}"
    if _exists(name):
        return name
    debootstrap = _tool("debootstrap")
    if os.geteuid() != 0:
        raise InstallError("making the image's Debian base with debootstrap needs root (run the bundle build as root)")
    with tempfile.TemporaryDirectory(prefix="appliance-base.") as tmp:
        root = Path(tmp) / "root"
        _run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(root), mirror],
             f"debootstrap {SUITE} from {mirror}")
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        with subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE) as tar:
            _run([_tool("podman"), "import", "--message", f"debootstrap {SUITE} minbase", "-", name],
                 "podman import of the Debian base", stdin=tar.stdout)
        if tar.returncode:
            raise InstallError(f"tar of the Debian base failed (exit {tar.returncode})")
    return name


def build_image(wheels: Path, requirement: str, version: str, base: str) -> str:
    """Build the appliance image from the wheels in `wheels` with no network; `requirement`
    is what pip installs (appliance==VERSION)."""
    podman = _tool("podman")
    if not _exists(base):
        raise InstallError(f"the base image {base} is not in podman's storage (podman images)")
    name = f"{NAME}:{version}"
    containerfile = importlib.resources.files("appliance.k3s") / "Containerfile"
    with tempfile.TemporaryDirectory(prefix="appliance-image.") as tmp, \
            importlib.resources.as_file(containerfile) as recipe:
        context = Path(tmp)
        shutil.copytree(wheels, context / "wheels", copy_function=_link_or_copy)  # the context: wheels only
        _run([podman, "build", "--network", "none", "--pull=never", "--file", str(recipe),
              "--build-arg", f"BASE={base}", "--build-arg", f"REQUIREMENT={requirement}",
              "--build-arg", f"UID={IMAGE_UID}", "--tag", name, str(context)], f"podman build of {name}")
    return name


def save_image(name: str, dest: Path) -> Image:
    """The image as an OCI archive at dest (k3s ctr images import, podman load). Its digest is
    that of the manifest in the archive (podman's storage holds another, uncompressed one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run([_tool("podman"), "save", "--format", "oci-archive", "--output", str(dest), name], f"podman save of {name}")
    return Image(name=name, digest=archive_digest(dest))


def archive_digest(archive: Path) -> str:
    """The digest of the one image manifest in an OCI archive's index.json."""
    try:
        with tarfile.open(archive) as tar:
            index = json.loads(tar.extractfile("index.json").read())
        (manifest,) = index["manifests"]
        return manifest["digest"]
    except (OSError, tarfile.TarError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InstallError(f"{archive}: not an OCI archive of one image ({exc})") from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
