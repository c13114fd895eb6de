"""Bearer JWTs signed by the organisation's identity provider (Keycloak, AD FS, ...).

The provider's public keys come from a JWKS document (profile auth.jwt.jwks_file or
jwks_url), read again every refresh_s off the request path; a read that fails keeps the
last good keys (with none yet, it is tried again every RETRY_S). A token is accepted
when its signature verifies with one of those keys, by one of the profile's algorithms
(asymmetric only: `none` and HMAC never), and its exp (required), nbf, iss and aud hold,
with LEEWAY_S for clocks apart.

Its claims become a Principal: the name from user_claim; an appliance user of that name
gives its id and role (a disabled one is refused); otherwise the role comes from role_claim
when it names a role, else default_role. A token never makes an admin (MAX_ROLE): an
identity provider's mistake must not own the appliance; admins sign in with a key or a
password. The team is the first value of team_claim that names an appliance team, else
the user's first team by name; its limits and policy apply. A verified token is cached
(by its SHA-256) until it expires, so the request path pays one dict lookup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import httpx
import jwt
import msgspec
import sqlite_utils

from appliance.config import JwtConfig
from appliance.errors import AuthenticationFailed
from appliance.governance import Limits, Policy, Principal
from appliance.users import ROLES

log = logging.getLogger("appliance.jwt")

LEEWAY_S = 30.0
MAX_ROLE = "operator"
TOKEN_ROLES = ROLES[ROLES.index(MAX_ROLE):]  # what a token may carry, highest first
CACHE_SIZE = 10_000
FETCH_TIMEOUT = httpx.Timeout(3.0)  # the refresh that reads keys and deployments waits for it
RETRY_S = 30.0  # how soon a read is tried again while no keys were ever read


class _Team(msgspec.Struct, frozen=True):
    id: str
    name: str
    limits: Limits
    policy: Policy


class _User(msgspec.Struct, frozen=True):
    id: str
    role: str
    disabled: bool
    teams: tuple[str, ...]  # team names, sorted


class Directory(msgspec.Struct, frozen=True):
    """The appliance's users and teams by name, as the state database had them at the last refresh."""

    users: dict[str, _User]
    teams: dict[str, _Team]

    @classmethod
    def load(cls, db: sqlite_utils.Database) -> Directory:
        teams = {row["name"]: _Team(row["id"], row["name"], msgspec.json.decode(row["limits"], type=Limits),
                                    msgspec.json.decode(row["policy"], type=Policy))
                 for row in db.query("SELECT id, name, limits, policy FROM teams")}
        names = {team.id: team.name for team in teams.values()}
        members: dict[str, list[str]] = {}
        for row in db.query("SELECT team_id, user_id FROM team_members"):
            members.setdefault(row["user_id"], []).append(names[row["team_id"]])
        users = {row["name"]: _User(row["id"], row["role"], row["disabled_at"] is not None,
                                    tuple(sorted(members.get(row["id"], []))))
                 for row in db.query("SELECT id, name, role, disabled_at FROM users")}
        return cls(users, teams)


def directory_fingerprint(db: sqlite_utils.Database) -> tuple:
    return tuple(db.execute(
        "SELECT (SELECT count(*) FROM users), (SELECT max(updated_at) FROM users),"
        " (SELECT max(disabled_at) FROM users), (SELECT count(*) FROM teams), (SELECT max(updated_at) FROM teams),"
        " (SELECT count(*) FROM team_members)"
    ).fetchone())


def read_jwks(config: JwtConfig) -> dict:
    """The provider's JWKS document (blocking I/O); raises when it cannot be read."""
    if config.jwks_file:
        return json.loads(Path(config.jwks_file).read_text())
    response = httpx.get(config.jwks_url, timeout=FETCH_TIMEOUT, follow_redirects=False)
    response.raise_for_status()
    return response.json()


def signing_keys(document: dict) -> dict[str, jwt.PyJWK]:
    """The signature keys of a JWKS document by key id (raises when it holds none that PyJWT can use)."""
    return {key.key_id or "": key for key in jwt.PyJWKSet.from_dict(document).keys
            if key.public_key_use in (None, "sig")}


class JwtVerifier:
    """Verifies identity-provider tokens against keys and a directory that `refresh` keeps current."""

    def __init__(self, config: JwtConfig):
        if not (config.jwks_file or config.jwks_url):
            raise ValueError("auth.jwt needs jwks_file or jwks_url")
        self.config = config
        self._keys: dict[str, jwt.PyJWK] = {}
        self._document: dict | None = None
        self._keys_read_at = float("-inf")
        self._directory = Directory({}, {})
        self._fingerprint: tuple | None = None
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    # --- off the request path --------------------------------------------------

    def refresh(self, db: sqlite_utils.Database, now: float | None = None) -> None:
        """Read the keys when refresh_s has passed and the users and teams when they changed. Blocking I/O."""
        now = time.monotonic() if now is None else now
        changed = False
        if now - self._keys_read_at >= (self.config.refresh_s if self._keys else min(RETRY_S, self.config.refresh_s)):
            self._keys_read_at = now
            try:
                document = read_jwks(self.config)
                keys = signing_keys(document)
            except Exception as exc:  # a provider briefly away must not lock everyone out
                log.warning("reading the identity provider's keys (%s) failed, keeping the %d last read: %s",
                            self.config.jwks_file or self.config.jwks_url, len(self._keys), exc)
            else:
                changed = document != self._document
                self._keys, self._document = keys, document
        fingerprint = directory_fingerprint(db)
        if fingerprint != self._fingerprint:
            self._directory, self._fingerprint, changed = Directory.load(db), fingerprint, True
        if changed:
            self._cache = OrderedDict()  # principals follow the new keys, users and teams

    # --- on the request path ---------------------------------------------------

    def authenticate(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).hexdigest()
        cache = self._cache
        hit = cache.get(digest)
        if hit is not None and hit[1] + LEEWAY_S > time.time():
            cache.move_to_end(digest)
            return hit[0]
        claims = self._verify(token)
        principal = self._principal(claims)
        cache[digest] = (principal, float(claims["exp"]))
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> dict:
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthenticationFailed("Malformed bearer token: neither an API key nor a JWT.") from None
        key = self._keys.get(header.get("kid") or "")
        if key is None and not header.get("kid") and len(self._keys) == 1:
            key = next(iter(self._keys.values()))  # a provider with one key may leave kid out
        if key is None:
            raise AuthenticationFailed("The token is signed by a key the identity provider does not publish "
                                       f"(kid {header.get('kid')!r}).")
        try:
            return jwt.decode(
                token, key.key, algorithms=list(config.algorithms), audience=config.audience, issuer=config.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp"], "verify_aud": config.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("The token has expired.", code="expired_api_key") from None
        except jwt.InvalidTokenError as exc:
            raise AuthenticationFailed(f"The token is not valid: {exc}.") from None

    def _principal(self, claims: dict) -> Principal:
        config, directory = self.config, self._directory
        name = claims.get(config.user_claim)
        if not isinstance(name, str) or not name:
            raise AuthenticationFailed(f"The token has no {config.user_claim!r} claim naming its user.")
        user = directory.users.get(name)
        if user is not None and user.disabled:
            raise AuthenticationFailed(f"The user {name!r} is disabled.")
        if user is not None:
            role = MAX_ROLE if user.role == "admin" else user.role
        else:
            claimed = claims.get(config.role_claim) if config.role_claim else None
            role = claimed if claimed in TOKEN_ROLES else config.default_role
        team = self._team(claims, user)
        return Principal(
            key_id=None, name=name, role=role, user_id=user.id if user else None,
            team_id=team.id if team else None, team_name=team.name if team else None,
            team_limits=team.limits if team else Limits(),
            policy=team.policy if team else Policy(),
        )

    def _team(self, claims: dict, user: _User | None) -> _Team | None:
        teams = self._directory.teams
        claimed = claims.get(self.config.team_claim) if self.config.team_claim else None
        for value in [claimed] if isinstance(claimed, str) else claimed if isinstance(claimed, list) else []:
            if isinstance(value, str) and value.strip("/") in teams:  # Keycloak writes groups as /name
                return teams[value.strip("/")]
        return teams.get(user.teams[0]) if user and user.teams else None
