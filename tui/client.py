"""The console's client of the admin API: asynchronous, so the screen never waits on the
network. URL and key are resolved as the CLI resolves them (appliance.admin_client), and an
error answer becomes an AdminApiError carrying the API's own message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from appliance.admin_client import CONNECT_TIMEOUT_S, TIMEOUT_S, UPLOAD_TIMEOUT_S, AdminApiError, api_error

UPLOAD_CHUNK = 1 << 20


def local_file(text: str) -> Path:
    """A file on the admin's machine, for an upload form (ValueError naming what is wrong)."""
    path = Path(text).expanduser()
    if text and path.is_dir():
        raise ValueError(f"{path} is a directory: only a file can be uploaded")
    if not text or not path.is_file():
        raise ValueError(f"{text or 'path'}: no such file on this machine")
    return path


class Api:
    def __init__(self, url: str, key: str | None, *, origin: str = ""):
        self.url = url.rstrip("/")
        self.origin = origin  # where the URL came from, for an error that cannot reach it
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                      timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    async def _send(self, method: str, path: str, *, also_ok: tuple[int, ...] = (), **kwargs) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminApiError(f"cannot reach the gateway at {self.url}{self.origin}: {str(exc) or type(exc).__name__}",
                                status=503) from None
        if not response.is_success and response.status_code not in also_ok:
            raise api_error(response)
        return response

    async def request(self, method: str, path: str, **kwargs) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def get(self, path: str, **params) -> Any:
        return await self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    async def post(self, path: str, body: dict | None = None) -> Any:
        return await self.request("POST", path, json=body or {})

    async def put(self, path: str, body: dict) -> Any:
        return await self.request("PUT", path, json=body)

    async def patch(self, path: str, body: dict) -> Any:
        return await self.request("PATCH", path, json=body)

    async def delete(self, path: str, **params) -> Any:
        return await self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    async def upload(self, path: str, file: Path, params: dict[str, str | None],
                     progress: Callable[[int], None] | None = None) -> Any:
        """Stream a local file as the body of POST `path`, with its length so that a cut-off
        upload registers nothing; `progress(bytes sent)` after each chunk."""
        params = {k: v for k, v in params.items() if v}

        async def chunks():
            sent = 0
            with open(file, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
                    sent += len(chunk)
                    if progress:
                        progress(sent)
                    yield chunk

        try:
            response = await self.http.post(
                path, params=params, content=chunks(),
                headers={"Content-Length": str(file.stat().st_size), "Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(UPLOAD_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        except httpx.TransportError as exc:
            if not isinstance(exc, httpx.ConnectError):
                await self._refusal(path, params)
            raise AdminApiError(f"the upload to {self.url} did not complete ({type(exc).__name__} {exc}); "
                                "nothing was registered", status=503) from None
        if not response.is_success:
            raise api_error(response)
        return response.json()

    async def _refusal(self, path: str, params: dict) -> None:
        """Raise the gateway's refusal of an upload it hung up on before reading the body (a bad
        name, a missing role): the same request without a body gets that answer, or 'empty'."""
        try:
            answer = await self.http.post(path, params=params, content=b"")
        except httpx.TransportError:
            return
        if not answer.is_success and (error := api_error(answer)).param != "body":
            raise error

    async def metrics(self) -> str:
        """The gateway's Prometheus text (every worker's values summed)."""
        return (await self._send("GET", "/metrics")).text

    async def readiness(self) -> dict:
        """/readyz's answer, ready (200) or not (503): both carry the details."""
        return (await self._send("GET", "/readyz", also_ok=(503,))).json()

    async def close(self) -> None:
        await self.http.aclose()
