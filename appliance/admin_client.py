"""The CLI's client of the admin API: it works from any machine on the LAN.

The gateway's URL comes from --url or APPLIANCE_URL (default http://127.0.0.1:8080);
the key from --key or APPLIANCE_KEY, else the admin.key file of the local home.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
import httpx

from appliance.errors import ApplianceError
from appliance.home import HOME_ENV, admin_key_path, resolve_home

URL_ENV = "APPLIANCE_URL"
KEY_ENV = "APPLIANCE_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
UPLOAD_TIMEOUT = httpx.Timeout(3600.0, connect=5.0)


class AdminApiError(ApplianceError):
    """An error answer of the admin API, or a gateway that cannot be reached."""

    def __init__(self, message: str, *, status: int = 500, code: str | None = None, param: str | None = None):
        super().__init__(message, code=code, param=param)
        self.status = status


def _resolve_key(key: str | None, home: str | None) -> str:
    if key:
        return key
    path = admin_key_path(resolve_home(home))
    if path.is_file():
        return path.read_text().strip()
    raise AdminApiError(f"no API key: pass --key, set {KEY_ENV}, or run where {path} exists")


class AdminClient:
    def __init__(self, url: str, key: str):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminApiError(f"cannot reach the gateway at {self.url}: {exc}") from None
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            message, code, param = error["message"], error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):
            message, code, param = response.text.strip() or response.reason_phrase, None, None
        raise AdminApiError(f"{message} (HTTP {response.status_code})", status=response.status_code, code=code, param=param)

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def upload(self, path: str, file: Path, **params) -> Any:
        """Stream a file as the request body, with its length, so a cut-off upload is detected."""
        size = file.stat().st_size
        # Progress on stderr, and only for a person watching: stdout stays clean for --json.
        progress = click.progressbar(length=size, label=f"uploading {file.name}", file=sys.stderr,
                                     hidden=not sys.stderr.isatty())
        with open(file, "rb") as f, progress as bar:
            def chunks():
                while chunk := f.read(1 << 20):
                    bar.update(len(chunk))
                    yield chunk

            return self.request("POST", path, params={k: v for k, v in params.items() if v is not None},
                                content=chunks(), timeout=UPLOAD_TIMEOUT,
                                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})


def client_options(function):
    """--url, --key and --home for commands that talk to the admin API."""
    function = click.option("--home", type=click.Path(file_okay=False), envvar=HOME_ENV, show_envvar=True,
                            help="Local home whose admin.key is used when no key is given.")(function)
    function = click.option("--key", envvar=KEY_ENV, show_envvar=True,
                            help="An admin or operator API key. Default: the local home's admin.key.")(function)
    function = click.option("--url", envvar=URL_ENV, show_envvar=True, default=DEFAULT_URL, show_default=True,
                            help="The gateway's base URL.")(function)
    return function


def make_client(url: str, key: str | None, home: str | None) -> AdminClient:
    return AdminClient(url, _resolve_key(key, home or os.environ.get(HOME_ENV)))
