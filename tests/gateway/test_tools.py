"""The tool runtime on the real stack: tools registered through /admin/tools (bad ones
refused), a command run in bubblewrap's sandbox (no network unless allowed, a read-only
view without the appliance's home, a private /tmp, memory, CPU and time limits), an MCP
server's tool on loopback, and the gateway running the default model's tool calls in a
bounded loop, through the openai SDK, every call audited."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import DEFAULT_MODEL, free_port
from tests.gateway.test_model_registry import api, cli

pytestmark = [pytest.mark.stack,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (.ci/run installs it)")]

PYTHON = "/usr/bin/python3"  # the system's: the sandbox sees /usr, not the test's virtual environment
ADD = f"""import json, sys
args = json.load(sys.stdin)
print(args["a"] + args["b"])
"""
PROBE = """import json, os, socket, sys, time
what, port, home = json.load(sys.stdin)["what"], {port}, {home!r}
if what == "net":
    socket.create_connection(("127.0.0.1", port), timeout=3).close(); print("connected")
elif what == "write":
    open("/etc/appliance-probe", "w")
elif what == "home":
    try:
        hashes = open("/etc/shadow").read()
    except PermissionError:
        hashes = ""
    print(os.path.exists(home), os.path.exists("/root"), hashes == "")
elif what == "tmp":
    open("/tmp/x", "w").write("kept"); print(open("/tmp/x").read())
elif what == "memory":
    block = bytearray(1024 * 1024 * 1024)
elif what == "spin":
    while True: pass
elif what == "sleep":
    time.sleep(60)
"""
NUMBERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "required": ["a", "b"]}


def add_tool(stack, name: str, body: dict, status: int = 201) -> dict:
    answer = api(stack).post(f"/admin/tools/{name}", json=body)
    assert answer.status_code == status, answer.text
    return answer.json()


def call(stack, name: str, arguments: dict) -> dict:
    answer = api(stack).post(f"/admin/tools/{name}/call", json={"arguments": arguments})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory):
    """A real MCP server (the mcp SDK's, Streamable HTTP) on loopback with one tool, `add`."""
    port = free_port()
    script = tmp_path_factory.mktemp("mcp") / "server.py"
    script.write_text("import sys\nfrom mcp.server.mcpserver import MCPServer\nserver = MCPServer('calc')\n\n"
                      "@server.tool()\ndef add(a: int, b: int) -> int:\n    '''Add two numbers.'''\n"
                      "    return a + b\n\nserver.run(transport='streamable-http', host='127.0.0.1', "
                      "port=int(sys.argv[1]))\n")
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, "the MCP server did not start"
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


def test_bad_tools_are_refused_naming_what_is_wrong(stack):
    good = {"description": "Add two numbers.", "parameters": NUMBERS, "command": {"argv": [PYTHON, "-c", ADD]}}
    for body, param, words in [
        ({**good, "command": {"argv": ["python3", "-c", ADD]}}, "command.argv", "absolute path"),
        ({**good, "mcp": {"url": "http://127.0.0.1:1/mcp"}}, "command", "one of them"),
        ({**good, "parameters": {"type": "object", "properties": {"a": {"type": "number!"}}}}, "parameters",
         "not a JSON Schema"),
        ({**good, "parameters": {"type": "string"}}, "parameters", "type 'object'"),
        ({**good, "command": {"argv": [PYTHON], "read_paths": [str(stack.home)]}}, "command.read_paths",
         "appliance's home"),
        ({"description": "x", "mcp": {"url": "ftp://x"}}, "mcp.url", "http(s) URL"),
    ]:
        answer = api(stack).post("/admin/tools/bad-tool", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == param and words in answer.json()["error"]["message"], body
    developer = api(stack).post("/admin/keys", json={"name": "tools-dev", "role": "developer"}).json()["key"]
    assert api(stack, developer).post("/admin/tools/bad-tool", json=good).status_code == 403  # admins register
    assert api(stack).get("/admin/tools/bad-tool").status_code == 404


def test_a_command_runs_in_the_sandbox_within_its_limits(stack):
    add_tool(stack, "add", {"description": "Add two whole numbers.", "parameters": NUMBERS,
                            "command": {"argv": [PYTHON, "-c", ADD]}})
    assert call(stack, "add", {"a": 2, "b": 40}) == {"name": "add", "ok": True, "result": "42\n",
                                                     "seconds": pytest.approx(0.5, abs=5)}
    assert call(stack, "add", {"a": 2}) == {"name": "add", "ok": False, "seconds": 0.0,  # checked, never run
                                            "result": "the arguments do not fit the tool's parameters: "
                                                      "'b' is a required property"}
    probe = {"description": "Probe the sandbox.", "parameters": {"type": "object"},
             "command": {"argv": [PYTHON, "-c", PROBE.format(port=stack.port, home=str(stack.home))],
                         "memory_mb": 256, "cpu_s": 1, "timeout_s": 3}}
    add_tool(stack, "probe", probe)
    refused = call(stack, "probe", {"what": "net"})
    assert not refused["ok"] and "ConnectionRefusedError" in refused["result"]  # its own, empty network
    assert not (written := call(stack, "probe", {"what": "write"}))["ok"] and "Read-only file system" in written["result"]
    assert call(stack, "probe", {"what": "home"})["result"] == "False False True\n"  # no home, no /root, no hashes
    assert call(stack, "probe", {"what": "tmp"})["result"] == "kept\n"
    assert "MemoryError" in call(stack, "probe", {"what": "memory"})["result"]
    assert "SIGXCPU: its CPU time limit, 1 s" in call(stack, "probe", {"what": "spin"})["result"]
    slept = call(stack, "probe", {"what": "sleep"})
    assert slept["result"] == "the tool ran out of time (3 s) and was stopped" and slept["seconds"] < 10
    add_tool(stack, "probe-net", {**probe, "command": {**probe["command"], "network": True}})
    assert call(stack, "probe-net", {"what": "net"}) | {"seconds": 0} == {"name": "probe-net", "ok": True,
                                                                          "result": "connected\n", "seconds": 0}
    audited = api(stack).get("/admin/audit", params={"action": "tool.call", "target": "tool/probe"}).json()
    assert len(audited) >= 7 and audited[0]["detail"]["by"] == "admin"


def test_an_mcp_servers_tool_is_called(stack, mcp_server):
    add_tool(stack, "mcp-add", {"description": "Add two numbers (MCP).", "parameters": NUMBERS,
                                "mcp": {"url": mcp_server, "tool": "add"}})
    assert call(stack, "mcp-add", {"a": 2, "b": 3})["result"] == "5"
    add_tool(stack, "mcp-gone", {"description": "Nobody answers.", "mcp": {"url": f"http://127.0.0.1:{free_port()}/mcp",
                                                                          "timeout_s": 5}})
    gone = call(stack, "mcp-gone", {})
    assert not gone["ok"] and "ConnectError" in gone["result"]
    listed = cli(stack, "tools", "list").stdout
    assert "mcp-add" in listed and f"MCP {mcp_server} (add)" in listed


def test_the_gateway_runs_the_models_tool_calls_in_a_bounded_loop(stack):
    if api(stack).get("/admin/tools/add").status_code == 404:
        add_tool(stack, "add", {"description": "Add two whole numbers.", "parameters": NUMBERS,
                                "command": {"argv": [PYTHON, "-c", ADD]}})
    client = stack.client()
    messages = [{"role": "system", "content": "You are a helpful assistant. Use the add tool for sums."},
                {"role": "user", "content": "What is 2 plus 3?"}]
    reply = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=48, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}},
        extra_body={"server_tools": ["add"], "server_tool_loop": {"max_steps": 3, "timeout_s": 120}})
    answer = reply.parse()
    ran = answer.model_extra["appliance"]["tool_calls"]
    assert ran and ran[0]["name"] == "add" and ran[0]["step"] == 1 and ran[0]["ok"], ran
    arguments = json.loads(ran[0]["arguments"])
    assert ran[0]["result"] == f"{arguments['a'] + arguments['b']}\n"  # what the sandboxed command printed
    steps = answer.model_extra["appliance"]["steps"]
    assert 2 <= steps <= 3 and answer.usage.total_tokens > 0
    audited = api(stack).get("/admin/audit", params={"action": "tool.call", "target": "tool/add"}).json()
    assert any(e["detail"]["request_id"] == reply.headers["x-request-id"] for e in audited)

    # One step only: the loop stops and says so.
    stopped = api(stack).post("/v1/chat/completions", json={
        "model": DEFAULT_MODEL, "messages": messages, "max_tokens": 48,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "server_tools": ["add"], "server_tool_loop": {"max_steps": 1}}).json()
    assert stopped["appliance"]["steps"] == 1 and stopped["appliance"]["stopped"].startswith("max_steps (1)")

    # A prompt template is rendered once, before the loop: every step has the same messages in
    # order (remote-ok echoes what it got and calls no tool, so one step).
    assert api(stack).post("/admin/prompts/tool-prompt/versions", json={
        "system": "Sums by tool.", "user": "{{ q }}", "variables": [{"name": "q"}]}).status_code == 201
    deadline = time.monotonic() + 10
    while (echoed := api(stack).post("/v1/chat/completions", json={
            "model": "remote-ok", "messages": [], "server_tools": ["add"],
            "template": {"name": "tool-prompt", "variables": {"q": "2+3?"}}})).status_code != 200:
        assert time.monotonic() < deadline, echoed.text  # until every gateway worker has read the template
        time.sleep(0.3)
    sent = echoed.json()["echo"]
    assert "template" not in sent and "server_tools" not in sent
    assert sent["messages"] == [{"role": "system", "content": "Sums by tool."}, {"role": "user", "content": "2+3?"}]
    assert [t["function"]["name"] for t in sent["tools"]] == ["add"] and echoed.json()["appliance"]["steps"] == 1

    # A client's mistake is a 400 naming the field.
    for extra, param in [({"server_tools": ["nope"]}, "server_tools"), ({"server_tools": "add"}, "server_tools"),
                         ({"server_tools": ["add"], "stream": True}, "stream"),
                         ({"server_tools": ["add"], "server_tool_loop": {"max_steps": 0}}, "server_tool_loop.max_steps")]:
        refused = api(stack).post("/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": messages, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (extra, refused.text)
