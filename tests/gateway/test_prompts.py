"""Prompt templates on the real stack: versions with declared variables (bad ones refused),
rendered by the gateway into the messages an engine receives (the upstream echoes what it
got) and answered by the default model through the openai SDK; each answer's template
version in its usage row; A/B between versions by weight, changed live; the CLI."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from appliance.db import open_db
from appliance.home import state_db_path
from tests.conftest import DEFAULT_MODEL
from tests.gateway.test_model_registry import api, cli

pytestmark = pytest.mark.stack

SUPPORT = {
    "system": "You are {{ product }}'s support assistant. Answer in {{ language }}, in a few words.",
    "user": "{{ question }}",
    "variables": [{"name": "product"}, {"name": "language", "default": "English"},
                  {"name": "question", "description": "what the customer asked"}],
    "description": "first cut",
}


def chat(stack, template: dict, model: str = "remote-ok", messages: list | None = None):
    return api(stack).post("/v1/chat/completions", json={"model": model, "messages": messages or [],
                                                         "template": template})


def usage_template(stack, request_id: str, timeout: float = 10) -> str | None:
    """The usage row's template, once the gateway has written it (a batch about every second)."""
    deadline = time.monotonic() + timeout
    while True:
        db = open_db(state_db_path(stack.home), migrate=False)
        try:
            row = db.execute("SELECT template FROM usage WHERE request_id = ?", [request_id]).fetchone()
        finally:
            db.conn.close()
        if row is not None or time.monotonic() > deadline:
            return row[0] if row else "(no usage row)"
        time.sleep(0.2)


def live(stack, condition, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"not live within {timeout} s: {what}"
        time.sleep(0.2)
    return found


def test_bad_versions_are_refused_naming_what_is_wrong(stack):
    cases = [
        ("support-bad", {"system": "Hello {{ who }}"}, "system", "does not declare: who"),
        ("support-bad", {"user": "{% if %}"}, "user", "does not parse"),
        ("support-bad", {"variables": []}, "system", "needs a `system` or a `user`"),
        ("support-bad", {"system": "{{ n }}", "variables": [{"name": "n", "type": "integer", "default": "x"}]},
         "variables.n.default", "is not of type integer"),
        ("support-bad", {"system": "{{ n }}", "variables": [{"name": "n"}, {"name": "n"}]}, "variables", "twice"),
        ("Bad Name", {"system": "hi"}, "name", "not valid"),
    ]
    for name, body, param, words in cases:
        answer = api(stack).post(f"/admin/prompts/{name}/versions", json=body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)
    assert api(stack).get("/admin/prompts/support-bad").status_code == 404  # nothing half-made


def test_a_template_is_rendered_into_the_request_and_its_version_metered(stack):
    made = api(stack).post("/admin/prompts/support/versions", json=SUPPORT)
    assert made.status_code == 201 and made.json()["version"] == 1, made.text
    variables = {"product": "Acme", "question": "What is the capital of France?"}
    # What the engine receives: the rendered system text first, the client's messages, the rendered user text last.
    answer = live(stack, lambda: (a := chat(stack, {"name": "support", "variables": variables},
                                            messages=[{"role": "user", "content": "Hello."}])).status_code == 200 and a,
                  "the new template")
    sent = answer.json()["echo"]
    assert "template" not in sent
    assert sent["messages"] == [
        {"role": "system", "content": "You are Acme's support assistant. Answer in English, in a few words."},
        {"role": "user", "content": "Hello."}, {"role": "user", "content": "What is the capital of France?"}]
    assert usage_template(stack, answer.headers["x-request-id"]) == "support:1"

    # The default model answers through the openai SDK, the template named in extra_body.
    reply = stack.client().chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=[], max_tokens=16, temperature=0,
        extra_body={"template": {"name": "support", "version": 1, "variables": variables}})
    assert reply.parse().choices[0].message.content.strip()
    assert usage_template(stack, reply.headers["x-request-id"]) == "support:1"

    # A client's mistake is a 400 naming the field.
    for template, param, words in [
        ({"name": "nope"}, "template.name", "no prompt template named 'nope'"),
        ({"name": "support", "version": 9, "variables": variables}, "template.version", "no version 9"),
        ({"name": "support", "variables": {"question": "Hi"}}, "template.variables.product", "needs variable"),
        ({"name": "support", "variables": {**variables, "tone": "kind"}}, "template.variables.tone", "no variable"),
        ({"name": "support", "variables": {**variables, "product": 7}}, "template.variables.product", "type string"),
        ({"name": 5}, "template.name", "str"),
    ]:
        refused = chat(stack, template)
        assert refused.status_code == 400, (template, refused.text)
        assert refused.json()["error"]["param"] == param and words in refused.json()["error"]["message"], template


def test_requests_are_split_between_versions_by_weight_and_a_change_is_live(stack):
    v1 = {**SUPPORT, "system": "ab-one: {{ product }}"}
    for body in (v1, {**SUPPORT, "system": "ab-two: {{ product }}"}):
        assert api(stack).post("/admin/prompts/ab-test/versions", json=body).status_code == 201
    assert api(stack).put("/admin/prompts/ab-test/ab", json={"weights": {"1": 50, "2": 50}}).status_code == 200
    variables = {"product": "Acme", "question": "Hi"}

    def versions_seen(n: int) -> Counter:
        seen = Counter()
        for _ in range(n):
            answer = chat(stack, {"name": "ab-test", "variables": variables})
            if answer.status_code != 200:  # a gateway worker that has not read the new template yet
                assert answer.json()["error"]["param"] == "template.name", answer.text
                seen["not yet"] += 1
                continue
            system = answer.json()["echo"]["messages"][0]["content"]
            seen[system.split(":")[0]] += 1
            assert usage_template(stack, answer.headers["x-request-id"], timeout=0) in (
                None, "(no usage row)", f"ab-test:{1 if system.startswith('ab-one') else 2}")
        return seen

    live(stack, lambda: set(versions_seen(30)) == {"ab-one", "ab-two"}, "both versions served")
    changed = api(stack).put("/admin/prompts/ab-test/ab", json={"weights": {"2": 1}})
    assert changed.status_code == 200 and changed.json()["ab"] == {"2": 1.0}
    live(stack, lambda: versions_seen(10) == Counter({"ab-two": 10}), "the new weights", timeout=5)
    last = chat(stack, {"name": "ab-test", "variables": variables})
    assert usage_template(stack, last.headers["x-request-id"]) == "ab-test:2"
    by_template = {r["template"]: r for r in api(stack).get("/admin/usage", params={"by": "template"}).json()["rows"]}
    assert {"ab-test:1", "ab-test:2"} <= set(by_template) and by_template["ab-test:2"]["requests"] >= 11
    listed = cli(stack, "usage", "--by", "template").stdout.splitlines()
    assert listed[0].split()[:2] == ["TEMPLATE", "REQUESTS"] and any(line.startswith("ab-test:2 ") for line in listed)
    for weights, param in [({"3": 1}, "ab.3"), ({"1": -1}, "ab.1"), ({"1": 0}, "ab")]:
        refused = api(stack).put("/admin/prompts/ab-test/ab", json={"weights": weights})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    audited = Counter((e["action"], e["outcome"].split(":")[0])
                      for e in api(stack).get("/admin/audit", params={"target": "prompt/ab-test"}).json())
    assert audited == {("prompt.version.create", "ok"): 2, ("prompt.ab.set", "ok"): 2, ("prompt.ab.set", "refused"): 3}


def test_the_cli_pushes_shows_renders_and_deletes(stack, tmp_path):
    file = tmp_path / "greeting.yaml"
    file.write_text("system: |\n  Greet {{ name }} in {{ language }}.\nvariables:\n  - name: name\n"
                    "  - name: language\n    default: 한국어\n")
    assert cli(stack, "prompts", "push", "greeting", str(file)).stdout.strip() == "greeting version 1: variables name, language"
    rendered = cli(stack, "prompts", "render", "greeting", "--var", "name=Kim").stdout
    assert rendered == "greeting version 1\n--- system\nGreet Kim in 한국어.\n"
    assert "greeting" in cli(stack, "prompts", "list").stdout
    shown = cli(stack, "prompts", "show", "greeting:1").stdout
    assert "Greet {{ name }} in {{ language }}." in shown
    assert cli(stack, "prompts", "delete", "greeting").stdout.strip() == "deleted prompt template greeting"
    gone = cli(stack, "prompts", "show", "greeting", check=False)
    assert gone.returncode == 1 and "no prompt template named 'greeting'" in gone.stderr


def test_two_template_versions_are_evaluated_and_compared(stack, tmp_path):
    from tests.gateway.test_finetune import register, wait_job

    register(stack, tmp_path, "prompt-qa", [{"question": "Say pong.", "answer": "pong"},
                                            {"question": "Say ping.", "answer": "ping"}])
    for user in ("Q: {{ question }}", "Question: {{ question }}\nAnswer in one word."):
        made = api(stack).post("/admin/prompts/qa-prompt/versions",
                               json={"user": user, "variables": [{"name": "question"}]})
        assert made.status_code == 201, made.text
    runs = []
    for version in (1, None):  # None: the latest, 2, recorded as such
        answer = api(stack).post("/admin/jobs", json={"kind": "eval", "params": {
            "model": "remote-ok", "dataset": "prompt-qa", "metrics": ["exact_match"],
            "prompt": {"name": "qa-prompt", "version": version}}})
        assert answer.status_code == 202, answer.text
        assert answer.json()["params"]["prompt"] == {"name": "qa-prompt", "version": version or 2}
        runs.append(wait_job(stack, answer.json()["id"], timeout=120))
    assert [r["state"] for r in runs] == ["succeeded", "succeeded"]
    inputs = [[s["input"] for s in api(stack).get(f"/admin/runs/{r['id']}/samples").json()["samples"]] for r in runs]
    assert inputs == [["Q: Say pong.", "Q: Say ping."],
                      ["Question: Say pong.\nAnswer in one word.", "Question: Say ping.\nAnswer in one word."]]
    report = api(stack).get("/admin/evaluations/compare", params={"ids": ",".join(r["id"] for r in runs)}).json()
    assert [r["prompt"] for r in report["runs"]] == [{"name": "qa-prompt", "version": 1},
                                                     {"name": "qa-prompt", "version": 2}]
    out = cli(stack, "eval", "compare", runs[0]["id"], runs[1]["id"]).stdout
    assert "(remote-ok prompt qa-prompt:1)" in out and "(remote-ok prompt qa-prompt:2)" in out
    # A template whose variables the dataset has no columns for is refused before anything is queued.
    assert api(stack).post("/admin/prompts/needs-customer/versions", json={
        "user": "{{ customer }} asks {{ question }}", "variables": [{"name": "customer"}, {"name": "question"}]
    }).status_code == 201
    refused = api(stack).post("/admin/jobs", json={"kind": "eval", "params": {
        "model": "remote-ok", "dataset": "prompt-qa", "prompt": {"name": "needs-customer"}}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "params.prompt"
    assert "has no columns for: customer" in refused.json()["error"]["message"]
