"""Merging a key's policy with its team's: the stricter rule wins, detector by detector."""

from __future__ import annotations

from appliance.governance import NO_POLICY, Limits, Policy, Principal, merge_policies


def test_an_allow_exception_to_mask_everything_survives_a_merge():
    key = Policy(pii={"*": "mask", "email": "allow"})
    assert merge_policies(key, NO_POLICY).pii == {"*": "mask", "email": "allow"}
    assert merge_policies(key, NO_POLICY).pii_action("email") == "allow"


def test_the_stricter_action_wins_for_each_detector():
    merged = merge_policies(Policy(pii={"*": "mask", "email": "allow"}), Policy(pii={"email": "block"}))
    assert (merged.pii_action("email"), merged.pii_action("phone")) == ("block", "mask")
    team = Policy(pii={"*": "block"}, injection="flag", deny=["secret project"], no_external=True)
    merged = merge_policies(Policy(pii={"kr_rrn": "mask"}, injection="block"), team)
    assert (merged.pii_action("kr_rrn"), merged.injection, merged.deny, merged.no_external) == \
        ("block", "block", ["secret project"], True)


def test_nothing_to_do_is_nothing_to_inspect():
    assert not merge_policies(Policy(pii={"email": "allow"}), NO_POLICY).inspects
    assert merge_policies(Policy(deny=["x"]), NO_POLICY).inspects


def test_both_model_lists_must_allow_a_model():
    caller = Principal(key_id="k", name="k", role="developer", limits=Limits(models=["remote-*"]),
                       team_limits=Limits(models=["remote-ok", "local"]))
    assert caller.allows_model("remote-ok") and not caller.allows_model("remote-other")
    assert not caller.allows_model("local")
