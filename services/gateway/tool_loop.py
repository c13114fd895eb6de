"""Server-side tool calls: a chat request that names registered tools (`server_tools`) is
answered in a loop. The gateway offers the model those tools as functions, runs the calls
it makes to them (services/gateway/tool_runtime.py), feeds the results back as `tool`
messages, and asks again, until the model answers without calling one, at most
`max_steps` times and within `timeout_s`.

Each step is a request to the gateway itself, over its own socket, with the caller's
credentials. So every step is authenticated, limited, budgeted, checked by policy, routed
and metered as any request; the loop adds no path of its own to the engines. Every tool
call is audited (`tool.call`). The answer is the last step's, with the usage of all steps
and `appliance.tool_calls`: what ran, how it went and how long it took.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import httpx
import msgspec

from appliance import tools
from appliance.audit import Actor
from appliance.errors import EngineTimeout, InvalidRequest, invalid_value
from appliance.home import gateway_socket_path
from services.gateway.tool_runtime import Outcome, run

TOOL_STEP_HEADER = "x-appliance-tool-step"  # on each step's request: which step of which request


class LoopLimits(msgspec.Struct, forbid_unknown_fields=True):
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4  # requests to the model
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 120.0


class StepFailed(Exception):
    """A step's own error answer, passed on as it came."""

    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body


class ToolLoop:
    def __init__(self, home: Path, audit):
        self.by_name: dict[str, tools.NewTool] = {}
        self._stamp: tuple | None = None
        self._socket = gateway_socket_path(home)
        self._audit = audit

    def refresh(self, db) -> None:
        """Reload the tools when one changed (blocking: called on the refresh thread)."""
        stamp = tools.stamp(db)
        if stamp != self._stamp:
            self.by_name, self._stamp = tools.load_all(db), stamp

    def prepare(self, body: bytes) -> tuple[dict, list[str], LoopLimits]:
        """The request without the loop's own fields, with the tools offered; 400 naming what is wrong."""
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"the request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the request body must be a JSON object")
        names = data.pop("server_tools", None)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidRequest("server_tools: a list of registered tools' names", param="server_tools")
        unknown = [n for n in names if n not in self.by_name]
        if unknown:
            raise InvalidRequest(f"no tool named {unknown[0]!r} (registered: {', '.join(sorted(self.by_name)) or 'none'})",
                                 param="server_tools")
        try:
            limits = msgspec.convert(data.pop("server_tool_loop", {}), LoopLimits)
        except msgspec.ValidationError as exc:
            raise invalid_value(exc, "server_tool_loop") from None
        if data.get("stream"):
            raise InvalidRequest("a request with server_tools is answered whole, once its tools have run: set stream "
                                 "to false", param="stream")
        own = data.get("tools") or []
        clash = {t.get("function", {}).get("name") for t in own if isinstance(t, dict)} & set(names)
        if clash:
            raise InvalidRequest(f"tools and server_tools both name {sorted(clash)[0]!r}", param="tools")
        data["tools"] = [*own, *(tools.function(n, self.by_name[n]) for n in dict.fromkeys(names))]
        return data, list(dict.fromkeys(names)), limits

    async def serve(self, request_id: str, actor: Actor, authorization: str, body: bytes) -> bytes:
        """The loop's answer (JSON), or an error: a step's own error answer as StepFailed."""
        data, names, limits = self.prepare(body)
        ran: list[dict] = []
        stopped = None
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        transport = httpx.AsyncHTTPTransport(uds=str(self._socket))
        try:
            async with asyncio.timeout(limits.timeout_s), httpx.AsyncClient(
                    transport=transport, base_url="http://gateway", timeout=limits.timeout_s) as client:
                for step in range(1, limits.max_steps + 1):
                    answer = await self._step(client, data, authorization, f"{step} of {request_id}")
                    for key in usage:
                        usage[key] += (answer.get("usage") or {}).get(key) or 0
                    message = ((answer.get("choices") or [{}])[0] or {}).get("message") or {}
                    calls = message.get("tool_calls") or []
                    if not calls or any((c.get("function") or {}).get("name") not in names for c in calls):
                        break  # an answer, or calls the client's own tools: the client's to handle
                    data["messages"] = [*data.get("messages", []), {k: v for k, v in message.items()
                                                                     if k in ("role", "content", "tool_calls")}]
                    outcomes = await asyncio.gather(*(self._call(request_id, actor, c) for c in calls))
                    for call, outcome in zip(calls, outcomes):
                        data["messages"].append({"role": "tool", "tool_call_id": call["id"], "content": outcome.text})
                        ran.append({"step": step, "id": call["id"], "name": call["function"]["name"],
                                    "arguments": call["function"].get("arguments"), "ok": outcome.ok,
                                    "seconds": round(outcome.seconds, 3), "result": outcome.text})
                    if data.get("tool_choice") not in (None, "auto", "none"):
                        data["tool_choice"] = "auto"  # a forced first call is not forced again
                else:
                    stopped = f"max_steps ({limits.max_steps}): the model was still calling tools"
        except TimeoutError:
            raise EngineTimeout(f"the tool loop ran past its {limits.timeout_s:g} s (server_tool_loop.timeout_s) "
                                f"after {len(ran)} tool calls") from None
        answer["usage"] = usage
        answer["appliance"] = {"tool_calls": ran, "steps": step, **({"stopped": stopped} if stopped else {})}
        return json.dumps(answer).encode()

    async def _step(self, client: httpx.AsyncClient, data: dict, authorization: str, step: str) -> dict:
        response = await client.post("/v1/chat/completions", content=json.dumps(data).encode(), headers={
            "authorization": authorization, "content-type": "application/json", TOOL_STEP_HEADER: step})
        if response.status_code != 200:
            raise StepFailed(response.status_code, response.content)
        return response.json()

    async def _call(self, request_id: str, actor: Actor, call: dict) -> Outcome:
        name = call["function"]["name"]
        tool = self.by_name[name]
        try:
            arguments = json.loads(call["function"].get("arguments") or "{}")
        except ValueError as exc:
            outcome = Outcome(False, f"the arguments are not JSON: {exc}", 0.0)
        else:
            outcome = await run(name, tool, arguments)
        self._audit.add(actor, "tool.call", f"tool/{name}", outcome="ok" if outcome.ok else "error: the tool failed",
                        detail={"request_id": request_id, "seconds": round(outcome.seconds, 3),
                                "arguments_bytes": len(call["function"].get("arguments") or "")})
        return outcome
