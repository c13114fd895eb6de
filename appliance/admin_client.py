"""The CLI's client of the admin API: it works from any machine on the LAN.

The gateway's URL comes from --url, else APPLIANCE_URL, else the gateway of the signed-in
session (`appliance login`), else the gateway serving the local home (appliance.discovery),
else http://127.0.0.1:8080. The key comes from --key or APPLIANCE_KEY, else the session's
token (only toward the gateway it was issued by, until it expires), else the admin.key
file of the local home.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.cli_options import DEFAULT_URL, KEY_ENV
from appliance.discovery import running_gateway_url
from appliance.errors import ApplianceError
from appliance.files import write_new
from appliance.home import admin_key_path, gateway_url_path, resolve_home

# httpx is imported where a request is made: `--help`, and commands that make none, skip its load time.
if TYPE_CHECKING:
    import httpx

CONNECT_TIMEOUT_S = 5.0
TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 3600.0


class AdminApiError(ApplianceError):
    """An error answer of the admin API, or a gateway that cannot be reached."""

    def __init__(self, message: str, *, status: int = 500, code: str | None = None, param: str | None = None):
        super().__init__(message, code=code, param=param)
        self.status = status


def _resolve_key(key: str | None, home: Path) -> str:
    if key:
        return key
    path = admin_key_path(home)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise AdminApiError(f"no API key: pass --key, set {KEY_ENV}, sign in with `appliance login`, "
                            f"or run where {path} exists") from None
    except PermissionError:
        raise AdminApiError(f"{path} is readable only by its owner: run as that user (or root), or pass --key") from None


def session_path() -> Path:
    """Where `appliance login` keeps its session: the user's config folder (XDG_CONFIG_HOME or ~/.config)."""
    return Path(click.get_app_dir("appliance")) / "session"


def save_session(url: str, answer: dict) -> Path:
    """Keep a sign-in's token (mode 0600) with the gateway that issued it."""
    path = session_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    session = {"url": url.rstrip("/"), **{k: answer[k] for k in ("token", "expires_at", "user", "role")}}
    write_new(path, json.dumps(session).encode())
    return path


def read_session() -> dict | None:
    """The saved session while it lasts; None when there is none, it expired or it cannot be read."""
    try:
        session = json.loads(session_path().read_text())
        return session if session["expires_at"] > time.time() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class AdminClient:
    def __init__(self, url: str, key: str | None, *, origin: str = ""):
        import httpx

        self.url = url.rstrip("/")
        self.origin = origin  # where the URL came from, for an error that cannot reach it
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def request(self, method: str, path: str, **kwargs) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminApiError(f"cannot reach the gateway at {self.url}{self.origin}: {exc}") from None
        if response.is_success:
            return response.json()
        raise api_error(response)

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def download(self, path: str, **params) -> bytes:
        """A GET whose answer is not JSON (CSV, a file): its bytes."""
        import httpx

        try:
            response = self.http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.TransportError as exc:
            raise AdminApiError(f"cannot reach the gateway at {self.url}{self.origin}: {exc}") from None
        if not response.is_success:
            raise api_error(response)
        return response.content

    def post(self, path: str, body: dict | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def upload(self, path: str, file: Path, **params) -> Any:
        """Stream a file as the request body, with its length, so a cut-off upload is detected."""
        import httpx

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
                                content=chunks(), timeout=httpx.Timeout(UPLOAD_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})


def gateway_url(url: str | None, home_dir: Path) -> tuple[str, str]:
    """The gateway's URL and, when the caller did not give it, where it came from."""
    if url:
        return url.rstrip("/"), ""
    recorded = gateway_url_path(home_dir)
    found = running_gateway_url(home_dir)
    if found:
        return found.rstrip("/"), f" (recorded in {recorded})"
    return DEFAULT_URL, f" (the default: {recorded} does not exist; pass --url)"


def connection(url: str | None, key: str | None, home: str | None) -> tuple[str, str, str]:
    """The gateway's URL, the key to present and where the URL came from: `url`, else the
    session's, else the gateway serving `home`, else the default; see the module's doc."""
    home_dir = resolve_home(home)
    session = None if key else read_session()
    if not url and session:
        url, origin = session["url"], f" (the gateway of your session, {session_path()})"
    else:
        url, origin = gateway_url(url, home_dir)
    if session and session["url"] == url:
        key = session["token"]
    return url, _resolve_key(key, home_dir), origin


def make_client(url: str | None, key: str | None, home: str | None) -> AdminClient:
    """A client of the gateway that `connection` resolves."""
    url, key, origin = connection(url, key, home)
    return AdminClient(url, key, origin=origin)


def api_error(response: httpx.Response) -> AdminApiError:
    """An error answer of the admin API as an AdminApiError: its message, status and parameter."""
    try:
        error = response.json()["error"]
        message, code, param = error["message"], error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = response.text.strip() or response.reason_phrase, None, None
    where = f"HTTP {response.status_code}" + (f", parameter {param}" if param else "")
    return AdminApiError(f"{message} ({where})", status=response.status_code, code=code, param=param)
