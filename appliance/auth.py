"""Who is calling: API keys, password sessions and identity-provider JWTs, behind one door.

`Authenticator.authenticate` answers the caller's Principal from memory (the key cache,
the JWT verifier's cache); `refresh` keeps both current off the request path.

A password sign-in (`sign_in`) is a session: an api_keys row of kind 'session' owned by
the user, with the user's role, that expires after auth.session_ttl_s. Its secret looks
like any key's, so it works wherever a key does; signing out revokes it.
"""

from __future__ import annotations

import time

import msgspec
import sqlite_utils

from appliance import users
from appliance.config import AuthConfig
from appliance.errors import AuthenticationFailed, InvalidRequest
from appliance.governance import Principal
from appliance.jwt_auth import JwtVerifier
from appliance.keys import SECRET_PREFIX, KeyCache, create_key, find_key, revoke_key
from appliance.passwords import decoy_hash, hash_password, needs_rehash, verify_password

SESSION_KIND = "session"
SIGN_IN_REFUSED = "Incorrect user name or password."  # one message for every refusal: no user enumeration


class Authenticator:
    def __init__(self, keys: KeyCache, jwt: JwtVerifier | None = None):
        self.keys = keys
        self.jwt = jwt

    @classmethod
    def from_config(cls, keys: KeyCache, config: AuthConfig) -> Authenticator:
        decoy_hash()  # made now, so that the first sign-in with an unknown name takes no longer than the rest
        return cls(keys, JwtVerifier(config.jwt) if config.jwt else None)

    def authenticate(self, authorization: str | None, *, monitoring: bool = False) -> Principal:
        """The caller `authorization` names: an sk-ap- key or session through the key cache, a
        JWT through the verifier when one is configured (401 otherwise, as the key cache says)."""
        if self.jwt is not None and authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and not token.startswith(SECRET_PREFIX) and token.count(".") == 2:
                return self.jwt.authenticate(token)
        return self.keys.authenticate(authorization, monitoring=monitoring)

    def refresh(self, db: sqlite_utils.Database) -> None:
        """Keys, and the identity provider's keys and the users and teams tokens map to. Blocking I/O."""
        self.keys.refresh(db)
        if self.jwt is not None:
            self.jwt.refresh(db)


class Session(msgspec.Struct, frozen=True):
    """What a sign-in answers; `token` is shown this once."""

    token: str
    session_id: str
    expires_at: float
    user: str
    user_id: str
    role: str


class SignInRefused(AuthenticationFailed):
    """A refused sign-in: the caller sees SIGN_IN_REFUSED, the audit log sees `reason`."""

    def __init__(self, reason: str):
        super().__init__(SIGN_IN_REFUSED, code="invalid_credentials")
        self.reason = reason


def sign_in(db: sqlite_utils.Database, name: str, password: str, *, ttl_s: float, session_id: str) -> Session:
    """Check a user's password (Argon2id: slow on purpose, call off the event loop) and open a
    session with the user's role, billed to their first team by name, if any."""
    if not name or not password:
        raise InvalidRequest("give a 'username' and a 'password'", param="username" if not name else "password")
    found = users.password_hash(db, name)
    user, stored = found if found else (None, None)
    if not verify_password(stored, password):  # the same work for an unknown name
        raise SignInRefused("unknown user" if user is None else "no password set" if stored is None
                            else "wrong password")
    if user.disabled_at is not None:
        raise SignInRefused("user disabled")
    if needs_rehash(stored):
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", [hash_password(password), user.id])
    session, token = create_key(db, user.name, user=user.id, expires_at=time.time() + ttl_s, key_id=session_id,
                                kind=SESSION_KIND)  # billed to the user's first team, as every key of theirs
    return Session(token=token, session_id=session.id, expires_at=session.expires_at, user=user.name,
                   user_id=user.id, role=session.role)


def sign_out(db: sqlite_utils.Database, session_id: str | None) -> None:
    """Revoke the caller's session (400 when the caller is not a session: keys are revoked at /admin/keys)."""
    if session_id is None or find_key(db, session_id).kind != SESSION_KIND:
        raise InvalidRequest("only a password session signs out; an API key is revoked at /admin/keys",
                             param="authorization")
    revoke_key(db, session_id)
