"""Identity-provider JWTs against a test provider's keys: a real RSA key pair, a JWKS file or a
JWKS served over HTTP on loopback, tokens signed by PyJWT, users and teams in a real state
database. Attacks (expired, wrong issuer or audience, another key, alg none, HS256 signed
with the public key) are refused with a 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance import teams, users
from appliance.auth import Authenticator
from appliance.config import JwtConfig
from appliance.db import open_db
from appliance.errors import AuthenticationFailed
from appliance.governance import Limits
from appliance.jwt_auth import JwtVerifier
from appliance.keys import KeyCache, create_key

ISSUER, AUDIENCE = "https://idp.example.lan/realms/corp", "appliance"


class Provider:
    """A test identity provider: an RSA key pair whose public half is published as a JWKS."""

    def __init__(self, kid: str = "k1"):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, **claims) -> str:
        now = time.time()
        payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "preferred_username": "mina",
                   **claims}
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, self.private, algorithm="RS256",
                          headers={"kid": self.kid})


def unsigned(header: dict, claims: dict, sign=None) -> str:
    """A token put together by hand (PyJWT refuses to make these)."""
    part = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()  # noqa: E731
    signing_input = f"{part(header)}.{part(claims)}"
    signature = sign(signing_input.encode()) if sign else b""
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


@pytest.fixture
def db(tmp_path):
    database = open_db(tmp_path / "state.db")
    yield database
    database.conn.close()


@pytest.fixture
def provider():
    return Provider()


def verifier_for(tmp_path, provider: Provider, db, **config) -> JwtVerifier:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(provider.jwks()))
    verifier = JwtVerifier(JwtConfig(jwks_file=str(jwks), issuer=ISSUER, audience=AUDIENCE, **config))
    verifier.refresh(db)
    return verifier


def refused(verifier: JwtVerifier, token: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as raised:
        verifier.authenticate(token)
    assert raised.value.status == 401
    return raised.value


def test_a_valid_token_is_a_principal_with_the_default_role_and_no_key(tmp_path, provider, db):
    verifier = verifier_for(tmp_path, provider, db)
    principal = verifier.authenticate(provider.token())
    assert (principal.name, principal.role, principal.key_id, principal.user_id, principal.team_id) == \
        ("mina", "developer", None, None, None)


def test_a_verified_token_is_cached_until_the_directory_changes(tmp_path, provider, db):
    verifier = verifier_for(tmp_path, provider, db)
    token = provider.token()
    first = verifier.authenticate(token)
    assert verifier.authenticate(token) is first
    users.create_user(db, "mina", role="viewer")
    verifier.refresh(db)
    assert verifier.authenticate(token).role == "viewer"


def test_an_appliance_user_gives_id_and_role_but_a_token_never_makes_an_admin(tmp_path, provider, db):
    boss = users.create_user(db, "boss", role="admin")
    users.create_user(db, "ann", role="viewer")
    verifier = verifier_for(tmp_path, provider, db, role_claim="appliance_role")
    principal = verifier.authenticate(provider.token(preferred_username="boss"))
    assert (principal.user_id, principal.role) == (boss.id, "operator")
    assert verifier.authenticate(provider.token(preferred_username="ann", appliance_role="operator")).role == "viewer"
    assert verifier.authenticate(provider.token(preferred_username="zed", appliance_role="admin")).role == "developer"
    assert verifier.authenticate(provider.token(preferred_username="zoe", appliance_role="viewer")).role == "viewer"


def test_a_disabled_user_and_a_token_without_its_user_claim_are_refused(tmp_path, provider, db):
    users.create_user(db, "gone", role="developer")
    users.update_user(db, "gone", disabled=True)
    verifier = verifier_for(tmp_path, provider, db)
    assert "disabled" in refused(verifier, provider.token(preferred_username="gone")).message
    assert "preferred_username" in refused(verifier, provider.token(preferred_username=None)).message


def test_the_team_claim_maps_to_a_team_with_its_limits_and_policy(tmp_path, provider, db):
    finance = teams.create_team(db, "finance", teams.Settings(rpm=7, no_external=True))
    ops = teams.create_team(db, "ops")
    member = users.create_user(db, "lee", role="developer")
    teams.add_member(db, "ops", "lee")
    verifier = verifier_for(tmp_path, provider, db)
    principal = verifier.authenticate(provider.token(groups=["/unknown", "/finance", "ops"]))
    assert principal.team_id == finance.id and principal.team_limits == Limits(rpm=7) and principal.policy.no_external
    assert verifier.authenticate(provider.token(groups="ops")).team_id == ops.id
    by_membership = verifier.authenticate(provider.token(preferred_username="lee"))
    assert (by_membership.user_id, by_membership.team_id) == (member.id, ops.id)
    assert verifier.authenticate(provider.token(groups=["nobody"])).team_id is None


def test_expired_and_not_yet_valid_tokens_are_refused(tmp_path, provider, db):
    verifier = verifier_for(tmp_path, provider, db)
    assert refused(verifier, provider.token(exp=time.time() - 120)).code == "expired_api_key"
    assert "not yet valid" in refused(verifier, provider.token(nbf=time.time() + 300)).message
    assert "exp" in refused(verifier, provider.token(exp=None)).message
    assert verifier.authenticate(provider.token(exp=time.time() - 5)).name == "mina"  # within the leeway


def test_wrong_issuer_audience_or_key_are_refused(tmp_path, provider, db):
    verifier = verifier_for(tmp_path, provider, db)
    assert "issuer" in refused(verifier, provider.token(iss="https://evil.example")).message.lower()
    assert "audience" in refused(verifier, provider.token(aud="someone-else")).message.lower()
    impostor = Provider(kid=provider.kid)  # another key under the published key id
    assert "signature" in refused(verifier, impostor.token()).message.lower()
    assert "does not publish" in refused(verifier, Provider(kid="k9").token()).message


def test_alg_none_and_hmac_with_the_public_key_are_refused(tmp_path, provider, db):
    verifier = verifier_for(tmp_path, provider, db)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 300, "preferred_username": "mina"}
    assert "alg value is not allowed" in refused(verifier, unsigned({"alg": "none", "kid": provider.kid}, claims)).message
    confused = unsigned({"alg": "HS256", "kid": provider.kid}, claims,
                        sign=lambda data: hmac.new(provider.public_pem(), data, hashlib.sha256).digest())
    assert "alg value is not allowed" in refused(verifier, confused).message


def test_the_authenticator_sends_keys_to_the_key_cache_and_jwts_to_the_verifier(tmp_path, provider, db):
    keys = KeyCache()
    _, secret = create_key(db, "ci", role="viewer")
    with_jwt = Authenticator(keys, verifier_for(tmp_path, provider, db))
    with_jwt.refresh(db)
    assert with_jwt.authenticate(f"Bearer {secret}").name == "ci"
    assert with_jwt.authenticate(f"Bearer {provider.token()}").name == "mina"
    without = Authenticator(keys)
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        without.authenticate(f"Bearer {provider.token()}")
    with pytest.raises(AuthenticationFailed) as missing:
        with_jwt.authenticate(None)
    assert missing.value.code == "missing_api_key"


class JwksServer:
    """An identity provider's JWKS endpoint on loopback; `document` is what it serves, None a 503."""

    def __init__(self, document: dict):
        self.document = document
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps(server.document).encode() if server.document else b"down"
                self.send_response(200 if server.document else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/realms/corp/certs"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_keys_from_a_jwks_url_are_refreshed_and_a_failed_fetch_keeps_the_last(provider, db):
    server = JwksServer(provider.jwks())
    try:
        verifier = JwtVerifier(JwtConfig(jwks_url=server.url, issuer=ISSUER, audience=AUDIENCE, refresh_s=60))
        verifier.refresh(db, now=0)
        assert verifier.authenticate(provider.token()).name == "mina"
        server.document = None  # the provider is down: the keys read last still verify
        verifier.refresh(db, now=60)
        assert verifier.authenticate(provider.token(preferred_username="kim")).name == "kim"
        rotated = Provider(kid="k2")
        server.document = rotated.jwks()
        verifier.refresh(db, now=90)  # not due yet
        refused(verifier, rotated.token())
        verifier.refresh(db, now=120)
        assert verifier.authenticate(rotated.token()).name == "mina"
        refused(verifier, provider.token(preferred_username="lou"))  # the old key is gone
    finally:
        server.close()
