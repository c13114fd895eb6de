"""`python -m services.engines.fetch`: registered versions' files from the object store into
a folder, each checked against its SHA-256 and renamed into place only then (files there
already are kept). The init container of engine pods on k3s (services/engines/kube_controller.py);
the store's credentials come from APPLIANCE_S3_ACCESS_KEY and APPLIANCE_S3_SECRET_KEY."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.model_registry import materialize
from appliance.objectstore.s3 import S3Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.engines.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="the S3 server (MinIO), http(s)://host:port")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--bucket-prefix", default="")
    parser.add_argument("--dest", required=True, type=Path, help="the folder (the node's cache)")
    parser.add_argument("--versions", required=True,
                        help='JSON: a list of {"format", "sha256", "files"}, as the model registry keeps them')
    args = parser.parse_args(argv)
    missing = [v for v in ("APPLIANCE_S3_ACCESS_KEY", "APPLIANCE_S3_SECRET_KEY") if not os.environ.get(v)]
    if missing:
        parser.error(f"{' and '.join(missing)} must be set (the object store's credentials)")
    try:
        versions = json.loads(args.versions)
        store = S3Settings(endpoint=args.endpoint, region=args.region, bucket_prefix=args.bucket_prefix,
                           access_key=os.environ["APPLIANCE_S3_ACCESS_KEY"],
                           secret_key=os.environ["APPLIANCE_S3_SECRET_KEY"]).open()
        for version in versions:
            print(f"{materialize(store, version, args.dest)}: ready", flush=True)
    except (ValueError, KeyError, TypeError) as exc:
        parser.error(f"--versions: not a list of registry versions ({exc})")
    except ApplianceError as exc:
        print(f"fetch: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
