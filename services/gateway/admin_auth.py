"""Password sign-in for the CLI and the console: /auth/login, /auth/logout, /auth/me.

Against guessing: every refused sign-in answers after FAILURE_DELAY_S, and MAX_FAILURES
refusals for one user name from one client address within WINDOW_S lock that pair out
(429 with Retry-After) until the oldest refusal is WINDOW_S old; each gateway worker
counts its own. Behind the LAN door (services/gateway/door.py) the client address is not
known here, so the pair is in effect the user name alone. At most HASHING_SLOTS password
checks run at once (Argon2id takes 64 MiB and tens of milliseconds each), on worker
threads, never on the event loop. Sign-ins, refused or not, and sign-outs are in the
audit log (auth.login, auth.logout).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, get, post

from appliance import audit, auth
from appliance.audit import Actor
from appliance.errors import RateLimited
from appliance.keys import new_key_id
from services.gateway.admin import current_actor, decoded, gateway_of, perform, principal_of, request_body
from services.gateway.request_ids import new_request_id

FAILURE_DELAY_S = 1.0
MAX_FAILURES = 10
WINDOW_S = 600.0
HASHING_SLOTS = 4
TRACKED_PAIRS = 10_000  # the oldest pair is forgotten beyond this many


class Login(msgspec.Struct, forbid_unknown_fields=True):
    username: Annotated[str, msgspec.Meta(max_length=256)]
    password: Annotated[str, msgspec.Meta(max_length=1024)]


class LoginThrottle:
    """Recent sign-ins per (user name, client address) that did not succeed. An attempt counts
    from the moment it is let through, so parallel guesses cannot all pass before the first is
    refused; a success forgets them."""

    def __init__(self) -> None:
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def attempt(self, pair: tuple[str, str]) -> None:
        """Let an attempt through, counted as failed until it `succeeded`; 429 past MAX_FAILURES."""
        failures = self._failures.get(pair)
        now = time.monotonic()
        while failures and failures[0] <= now - WINDOW_S:
            failures.popleft()
        if failures and len(failures) >= MAX_FAILURES:
            raise RateLimited(f"Too many refused sign-ins for this user from this address; try again in "
                              f"{failures[0] + WINDOW_S - now:.0f} s.", retry_after=failures[0] + WINDOW_S - now)
        self._failures.setdefault(pair, deque()).append(now)
        if len(self._failures) > TRACKED_PAIRS:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, pair: tuple[str, str]) -> None:
        self._failures.pop(pair, None)


_throttle = LoginThrottle()
_hashing = asyncio.Semaphore(HASHING_SLOTS)


class AuthController(Controller):
    path = "/auth"
    tags = ["auth"]

    @post("/login", opt=request_body(Login))
    async def login(self, request: Request) -> Response:
        """Sign in with a user's password; answers a session token (shown this once) that works as an API key
        until `expires_at` (profile auth.session_ttl_s)."""
        body = await decoded(request)
        pair = (body.username.casefold(), request.client.host if request.client else "")
        _throttle.attempt(pair)
        gateway = gateway_of(request)
        actor = Actor(None, body.username, None, new_request_id())
        session_id = new_key_id()

        def work(db) -> auth.Session:
            target = f"user/{body.username}"
            try:
                session = auth.sign_in(db, body.username, body.password, ttl_s=gateway.runtime.auth.session_ttl_s,
                                       session_id=session_id)
            except auth.SignInRefused as exc:
                audit.record(db, actor, "auth.login", target, outcome=f"refused: {exc.reason}")
                raise
            signed_in = Actor(session.session_id, session.user, session.role, actor.request_id, session.user_id)
            audit.record(db, signed_in, "auth.login", target,
                         detail={"session": session.session_id, "expires_at": session.expires_at})
            return session

        try:
            async with _hashing:
                session = await perform(request, actor, work)
        except auth.SignInRefused:
            await asyncio.sleep(FAILURE_DELAY_S)
            raise
        _throttle.succeeded(pair)
        answer = {"token": session.token, "expires_at": session.expires_at, "user": session.user,
                  "role": session.role, "session_id": session.session_id}
        return Response(answer, status_code=200, headers={"x-request-id": actor.request_id})

    @post("/logout")
    async def logout(self, request: Request) -> Response:
        """End the caller's session (the token stops working within a second)."""
        actor = await current_actor(request)
        await perform(request, actor, lambda db: auth.sign_out(db, actor.key_id), action="auth.logout",
                      target=f"session/{actor.key_id}")
        return Response({"signed_out": True}, status_code=200, headers={"x-request-id": actor.request_id})

    @get("/me")
    async def me(self, request: Request) -> Response:
        """Who the caller is, as the gateway governs it: role, user, team, limits, policy (no secrets)."""
        return Response(msgspec.to_builtins(await principal_of(request)))
