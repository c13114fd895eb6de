"""Tools in the admin API: /admin/tools (appliance/tools.py). A chat request names the ones the
gateway may run for it (`server_tools`, services/gateway/tool_loop.py); every worker sees a
change within a second or so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put

from appliance import tools
from appliance.audit import Actor
from appliance.errors import NotFound
from services.gateway.admin import decoded, gateway_of, perform, request_body, run
from services.gateway.tool_runtime import run as run_tool


class Call(msgspec.Struct, forbid_unknown_fields=True):
    arguments: dict[str, Any] = {}


def _detail(tool: dict) -> dict:
    return {"kind": tool["kind"], **({"argv": tool["command"]["argv"], "network": tool["command"]["network"]}
                                     if tool["command"] else {"url": tool["mcp"]["url"]})}


class ToolController(Controller):
    path = "/tools"
    tags = ["tools"]

    @get()
    async def list_tools(self, request: Request, actor: Actor) -> Response:
        return await run(request, actor, tools.list_tools)

    @get("/{name:str}")
    async def get_tool(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: tools.get(db, name))

    @post("/{name:str}", opt=request_body(tools.NewTool))
    async def create_tool(self, request: Request, actor: Actor, name: str) -> Response:
        """Register a tool: a `command` run in the sandbox, or an `mcp` server's tool (409 if the name is taken)."""
        return await self._save(request, actor, name, replace=False)

    @put("/{name:str}", opt=request_body(tools.NewTool))
    async def replace_tool(self, request: Request, actor: Actor, name: str) -> Response:
        return await self._save(request, actor, name, replace=True)

    async def _save(self, request: Request, actor: Actor, name: str, *, replace: bool) -> Response:
        body = await decoded(request)
        home = Path(gateway_of(request).runtime.home)
        return await run(request, actor, lambda db: tools.create(db, name, body, created_by=actor.key_id,
                                                                 replace=replace, home=home),
                         action="tool.save", target=f"tool/{name}", detail=_detail, status=200 if replace else 201)

    @delete("/{name:str}", status_code=200)
    async def delete_tool(self, request: Request, actor: Actor, name: str) -> Response:
        return await run(request, actor, lambda db: tools.delete(db, name), action="tool.delete",
                         target=f"tool/{name}", detail=_detail)

    @post("/{name:str}/call", opt=request_body(Call), status_code=200)
    async def call_tool(self, request: Request, actor: Actor, name: str) -> Response:
        """Run the tool once with `arguments`, as the gateway would for a model: {"ok", "result", "seconds"}."""
        body = await decoded(request)
        tool = (await perform(request, actor, lambda db: tools.load_all(db))).get(name)
        if tool is None:
            raise NotFound(f"no tool named {name!r}", param="name")
        outcome = await run_tool(name, tool, body.arguments)
        answer = {"name": name, "ok": outcome.ok, "result": outcome.text, "seconds": round(outcome.seconds, 3)}
        await perform(request, actor, lambda db: answer, action="tool.call", target=f"tool/{name}",
                      detail=lambda a: {"ok": a["ok"], "seconds": a["seconds"], "by": "admin"})
        return Response(msgspec.json.encode(answer), media_type="application/json",
                        headers={"x-request-id": actor.request_id})
