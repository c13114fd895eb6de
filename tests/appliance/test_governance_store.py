"""Users, teams and keys in a real state database: ownership rules, limits and policies,
deletion rules, and the key cache's principals (role, limits, merged policy)."""

from __future__ import annotations

import time

import msgspec
import pytest

from appliance import keys, teams, users
from appliance.db import open_db
from appliance.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied
from appliance.governance import Limits, Policy
from appliance.passwords import verify_password
from appliance.teams import Settings


@pytest.fixture
def db(tmp_path):
    database = open_db(tmp_path / "state.db")
    yield database
    database.conn.close()


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def test_settings_cover_every_limit_and_policy_field():
    assert set(Settings.__struct_fields__) == set(teams.LIMIT_FIELDS) | set(teams.POLICY_FIELDS)


def test_a_user_is_stored_without_their_password(db):
    user = users.create_user(db, "kim", role="developer", email="kim@example.com", password="correct horse")
    assert user.id.startswith("usr_") and user.has_password and user.disabled_at is None
    shown = users.describe(user)
    assert "correct horse" not in str(shown) and "password_hash" not in shown and shown["state"] == "active"
    found, stored = users.password_hash(db, "kim")
    assert found == user and stored.startswith("$argon2id$") and verify_password(stored, "correct horse")
    assert users.find_user(db, user.id) == users.find_user(db, "kim") == user
    users.set_password(db, "kim", "another secret")
    assert verify_password(users.password_hash(db, user.id)[1], "another secret")


def test_pii_short_names_resolve_to_detectors(db):
    team = teams.create_team(db, "t", Settings(pii={"rrn": "block", "PHONE": "mask", "*": "mask"}))
    assert team.policy.pii == {"kr_rrn": "block", "phone": "mask", "*": "mask"}


def test_korean_user_names_are_fine(db):
    assert users.create_user(db, "김철수", role="viewer").name == "김철수"


@pytest.mark.parametrize("call, param, error", [
    (lambda db: users.create_user(db, "a b", role="viewer"), "name", InvalidRequest),
    (lambda db: users.create_user(db, "usr_x", role="viewer"), "name", InvalidRequest),
    (lambda db: users.create_user(db, "x", role="metrics"), "role", InvalidRequest),
    (lambda db: users.create_user(db, "x", role="viewer", email="nope"), "email", InvalidRequest),
    (lambda db: users.create_user(db, "x", role="viewer", password="short"), "password", InvalidRequest),
    (lambda db: users.find_user(db, "ghost"), "user", NotFound),
    (lambda db: teams.create_team(db, "team_x"), "name", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(rpm=0)), "rpm", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(budget_cost=-1.0)), "budget_cost", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(models=[])), "models", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(period="week")), "period", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(pii={"nonsense": "mask"})), "pii.nonsense", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(pii={"email": "shred"})), "pii.email", InvalidRequest),
    (lambda db: teams.create_team(db, "t", Settings(injection="loud")), "injection", InvalidRequest),
    (lambda db: teams.find_team(db, "ghost"), "team", NotFound),
    (lambda db: keys.create_key(db, "k", user="ghost"), "user", NotFound),
    (lambda db: keys.create_key(db, "k", team="ghost"), "team", NotFound),
    (lambda db: keys.create_key(db, "k", settings=Settings(tpm=-5)), "tpm", InvalidRequest),
    (lambda db: keys.create_key(db, "k", settings=Settings(deny=[""])), "deny[0]", InvalidRequest),
    (lambda db: keys.create_key(db, "k", settings=Settings(deny=["re:("])), "deny", InvalidRequest),
])
def test_bad_input_names_the_parameter(db, call, param, error):
    with pytest.raises(error) as raised:
        call(db)
    assert raised.value.param == param, raised.value.message


def test_names_are_unique(db):
    users.create_user(db, "lee", role="viewer")
    teams.create_team(db, "finance")
    for call in (lambda: users.create_user(db, "lee", role="admin"), lambda: teams.create_team(db, "finance")):
        with pytest.raises(Conflict) as raised:
            call()
        assert raised.value.param == "name"
    other = users.create_user(db, "park", role="viewer")
    with pytest.raises(Conflict):
        users.update_user(db, other.id, name="lee")


def test_team_settings_change_field_by_field_and_null_clears(db):
    team = teams.create_team(db, "finance", Settings(models=["gpt-*", "local"], rpm=60, budget_cost=12.5, period="day",
                                                     pii={"*": "mask", "kr_rrn": "block"}, no_external=True))
    assert team.limits == Limits(models=["gpt-*", "local"], rpm=60, budget_cost=12.5, period="day")
    assert team.policy == Policy(pii={"*": "mask", "kr_rrn": "block"}, no_external=True)
    team = teams.update_team(db, "finance", Settings(rpm=None, tpm=1000, deny=["project x"], injection="block"))
    assert team.limits == Limits(models=["gpt-*", "local"], tpm=1000, budget_cost=12.5, period="day")
    assert team.policy == Policy(pii={"*": "mask", "kr_rrn": "block"}, no_external=True, deny=["project x"],
                                 injection="block")
    team = teams.update_team(db, team.id, Settings(pii=None, models=None, period=None), name="money")
    assert team.name == "money" and team.policy.pii == {} and team.limits == Limits(tpm=1000, budget_cost=12.5)
    assert teams.describe(team)["limits"] == {"tpm": 1000, "budget_cost": 12.5}


def test_a_users_key_has_at_most_their_role_and_is_billed_only_to_their_team(db):
    dev = users.create_user(db, "dev", role="developer")
    team = teams.create_team(db, "ml")
    key, _ = keys.create_key(db, "dev-laptop", user="dev")
    assert key.role == "developer" and key.user_id == dev.id and key.team_id is None
    with pytest.raises(PermissionDenied) as raised:
        keys.create_key(db, "escalate", user="dev", role="operator")
    assert raised.value.param == "role"
    with pytest.raises(InvalidRequest) as raised:
        keys.create_key(db, "billed", user="dev", team="ml")
    assert raised.value.param == "team" and "not a member" in raised.value.message
    teams.add_member(db, "ml", "dev")
    teams.add_member(db, "ml", "dev")  # twice changes nothing
    assert teams.members(db, team.id) == [{"id": dev.id, "name": "dev", "role": "developer"}]
    billed, _ = keys.create_key(db, "billed", user="dev", team="ml", role="viewer")
    assert (billed.user_id, billed.team_id, billed.role) == (dev.id, team.id, "viewer")
    service, _ = keys.create_key(db, "etl", team=team.id)
    assert service.user_id is None and service.team_id == team.id and service.role == "developer"
    assert [k.id for k in keys.list_keys(db, team_id=team.id)] == [billed.id, service.id]
    assert users.user_teams(db, dev.id) == [{"id": team.id, "name": "ml"}]
    with pytest.raises(PermissionDenied):
        keys.update_key(db, billed.id, role="admin")


def test_a_members_key_that_names_no_team_is_billed_to_their_first_team(db):
    """Leaving out --team must not take a member out of their team's limits and policy."""
    teams.create_team(db, "zeta")
    alpha = teams.create_team(db, "alpha", Settings(no_external=True, budget_tokens=1000))
    users.create_user(db, "kim", role="developer")
    teams.add_member(db, "zeta", "kim")
    teams.add_member(db, "alpha", "kim")
    key, secret = keys.create_key(db, "mine", user="kim")
    assert key.team_id == alpha.id
    cache = keys.KeyCache()
    cache.refresh(db)
    principal = cache.authenticate(bearer(secret))
    assert principal.policy.no_external and principal.team_limits.budget_tokens == 1000


def test_key_update_changes_only_what_is_given(db):
    key, _ = keys.create_key(db, "bot", expires_at=time.time() + 3600, settings=Settings(rpm=10, pii={"email": "mask"}))
    updated = keys.update_key(db, key.prefix, name="bot-2", expires_at=None,
                              settings=Settings(tpm=500, pii_responses=True))
    assert updated.limits == Limits(rpm=10, tpm=500)
    assert updated.policy == Policy(pii={"email": "mask"}, pii_responses=True)
    assert updated.name == "bot-2" and updated.expires_at is None and updated.updated_at is not None
    assert keys.find_key(db, key.id) == updated
    assert keys.describe(updated)["limits"] == {"rpm": 10, "tpm": 500}
    with pytest.raises(InvalidRequest) as raised:
        keys.update_key(db, key.id, expires_at=1.0)
    assert raised.value.param == "expires_at"
    keys.revoke_key(db, key.id)
    with pytest.raises(Conflict) as raised:
        keys.update_key(db, key.id, settings=Settings(rpm=1))
    assert raised.value.param == "key_id"


def test_a_team_with_active_keys_is_deleted_only_with_force(db):
    teams.create_team(db, "ops")
    users.create_user(db, "ann", role="operator")
    teams.add_member(db, "ops", "ann")
    key, _ = keys.create_key(db, "ann-ops", user="ann", team="ops")
    with pytest.raises(Conflict) as raised:
        teams.remove_member(db, "ops", "ann")
    assert raised.value.param == "user" and key.id in raised.value.message
    with pytest.raises(Conflict) as raised:
        teams.delete_team(db, "ops")
    assert raised.value.param == "force" and key.id in raised.value.message
    assert teams.find_team(db, "ops")
    team, revoked = teams.delete_team(db, "ops", force=True)
    assert revoked == [key.id] and keys.find_key(db, key.id).state() == "revoked"
    assert users.user_teams(db, users.find_user(db, "ann").id) == []
    with pytest.raises(NotFound):
        teams.find_team(db, team.id)


def test_removing_a_member_without_keys(db):
    teams.create_team(db, "qa")
    users.create_user(db, "bo", role="viewer")
    teams.add_member(db, "qa", "bo")
    teams.remove_member(db, "qa", "bo")
    with pytest.raises(NotFound) as raised:
        teams.remove_member(db, "qa", "bo")
    assert raised.value.param == "user"


def test_deleting_a_user_revokes_their_keys(db):
    user = users.create_user(db, "gone", role="developer")
    first, _ = keys.create_key(db, "one", user="gone")
    second, _ = keys.create_key(db, "two", user="gone", kind="session")
    other, _ = keys.create_key(db, "other")
    deleted, revoked = users.delete_user(db, "gone")
    assert deleted == user and revoked == [first.id, second.id]
    assert [k.state() for k in keys.list_keys(db)] == ["revoked", "revoked", "active"] and other.state() == "active"
    with pytest.raises(NotFound):
        users.find_user(db, user.id)


def test_the_cache_resolves_principals_with_merged_policy(db):
    cache = keys.KeyCache()
    team = teams.create_team(db, "fin", Settings(rpm=100, models=["local-*"], no_external=True,
                                                 pii={"kr_rrn": "block", "email": "mask"}))
    user = users.create_user(db, "analyst", role="operator")
    teams.add_member(db, "fin", "analyst")
    key, secret = keys.create_key(db, "analyst-key", user="analyst", team="fin",
                                  settings=Settings(rpm=10, pii={"*": "mask", "email": "allow"}, injection="flag"))
    service, service_secret = keys.create_key(db, "svc", role="admin")
    assert cache.refresh(db) and not cache.refresh(db)
    principal = cache.authenticate(bearer(secret))
    assert (principal.key_id, principal.name, principal.role) == (key.id, "analyst-key", "operator")
    assert (principal.user_id, principal.team_id) == (user.id, team.id)
    assert principal.limits == Limits(rpm=10) and principal.team_limits == Limits(rpm=100, models=["local-*"])
    # the key's "allow" for email loses to the team's "mask"; an entry equal to "*" is dropped
    assert principal.policy == Policy(no_external=True, pii={"*": "mask", "kr_rrn": "block"}, injection="flag")
    assert principal.policy.pii_action("email") == "mask"
    assert principal.allows_model("local-7b") and not principal.allows_model("gpt-4o")
    assert cache.authenticate(bearer(service_secret)).policy == Policy()

    teams.update_team(db, "fin", Settings(injection="block"))  # a team change is seen at the next refresh
    assert cache.refresh(db) and cache.authenticate(bearer(secret)).policy.injection == "block"
    users.update_user(db, "analyst", role="viewer")  # a lowered user lowers their keys
    assert cache.refresh(db) and cache.authenticate(bearer(secret)).role == "viewer"
    keys.update_key(db, key.id, settings=Settings(rpm=None))
    assert cache.refresh(db) and cache.authenticate(bearer(secret)).limits == Limits()


def test_the_cache_refuses_disabled_users_expired_and_revoked_keys(db):
    cache = keys.KeyCache()
    users.create_user(db, "sam", role="developer")
    _, secret = keys.create_key(db, "sam-key", user="sam")
    short, short_secret = keys.create_key(db, "short", expires_at=time.time() + 0.5)
    _, session = keys.create_key(db, "sam (session)", user="sam", kind="session")
    cache.refresh(db)
    assert cache.authenticate(bearer(session)).name == "sam (session)"
    users.update_user(db, "sam", disabled=True)
    assert cache.refresh(db)
    for refused in (secret, session):
        with pytest.raises(AuthenticationFailed) as raised:
            cache.authenticate(bearer(refused))
        assert raised.value.code == "user_disabled"
    with pytest.raises(Conflict) as raised:
        keys.create_key(db, "more", user="sam")
    assert raised.value.param == "user"
    users.update_user(db, "sam", disabled=False)
    cache.refresh(db)
    assert cache.authenticate(bearer(secret)).role == "developer"
    time.sleep(0.6)
    with pytest.raises(AuthenticationFailed) as raised:
        cache.authenticate(bearer(short_secret))
    assert raised.value.code == "expired_api_key"
    keys.revoke_key(db, short.id)
    users.delete_user(db, "sam")
    assert cache.refresh(db)
    for refused in (secret, session, short_secret):
        with pytest.raises(AuthenticationFailed) as raised:
            cache.authenticate(bearer(refused))
        assert raised.value.code == "invalid_api_key"


def test_an_operator_cannot_manage_admin_users():
    keys.check_grant("operator", "developer", what="users")
    with pytest.raises(PermissionDenied) as raised:
        keys.check_grant("operator", "admin", what="users")
    assert raised.value.message == "the operator role cannot manage admin users, only operator, developer, viewer users"


def test_stored_limits_are_json(db):
    team = teams.create_team(db, "j", Settings(rpm=5, pii={"phone": "block"}))
    limits, policy = db.execute("SELECT limits, policy FROM teams WHERE id = ?", [team.id]).fetchone()
    assert msgspec.json.decode(limits) == {"rpm": 5} and msgspec.json.decode(policy) == {"pii": {"phone": "block"}}


def test_every_setting_is_a_cli_option_of_keys_and_teams():
    from appliance.keys_cli import keys as keys_group
    from appliance.users_cli import teams as teams_group

    for command in (keys_group.commands["create"], keys_group.commands["update"], teams_group.commands["create"],
                    teams_group.commands["update"]):
        assert set(Settings.__struct_fields__) <= {p.name for p in command.params}, command.name


def test_a_key_is_found_by_id_prefix_or_unique_active_name(db):
    first, _ = keys.create_key(db, "laptop")
    assert keys.find_key(db, "laptop") == keys.find_key(db, first.prefix) == first
    keys.create_key(db, "laptop")
    with pytest.raises(Conflict) as raised:
        keys.find_key(db, "laptop")
    assert raised.value.param == "key_id" and first.id in raised.value.message
    keys.revoke_key(db, first.id)  # a revoked key's name no longer counts
    assert keys.find_key(db, "laptop").id != first.id
    with pytest.raises(NotFound):
        keys.find_key(db, "desktop")
