"""Request logs (GET /admin/request-logs): the kept requests of callers whose policy logs
them, newest first; enter opens one with its request and answer, PII masked (reading one is
audited). `:logs REQUEST_ID` opens that request at once; f finds one by its id."""

from __future__ import annotations

from textual import work
from textual.binding import Binding

from tui import format as fmt
from tui.modals import DetailScreen, Field, FormScreen, as_yaml
from tui.view import TableView
from tui.widgets import Column


class RequestLogsView(TableView):
    TITLE = "logs"
    REFRESH_S = 10.0
    COLUMNS = (
        Column("request_id", "REQUEST"), Column("ts", "TIME", lambda r: fmt.when(r["ts"])), Column("model", "MODEL"),
        Column("endpoint", "ENDPOINT"), Column("status", "STATUS"),
        Column("latency_ms", "LATENCY", lambda r: fmt.seconds((r["latency_ms"] or 0) / 1000)),
        Column("key_id", "KEY"), Column("team_id", "TEAM"),
    )
    BINDINGS = [Binding("f", "find", "Find by id")]

    def __init__(self, argument: str = "") -> None:
        """`argument`: a request id (req_...) to open at once; other words the table's first filter."""
        self.wanted = argument.strip() if argument.strip().startswith("req_") else None
        super().__init__("" if self.wanted else argument)

    def key(self, row: dict) -> str:
        return row["request_id"]

    async def fetch(self) -> list[dict]:
        return await self.api.get("/admin/request-logs", limit=500)

    def heading(self) -> str:
        return "request logs · newest 500"

    async def load(self) -> None:
        await super().load()
        if self.wanted:
            wanted, self.wanted = self.wanted, None
            await self.show_request(wanted)

    async def open(self, row: dict) -> None:
        await self.show_request(row["request_id"])

    async def show_request(self, request_id: str) -> None:
        entry = await self.attempt(self.api.get(f"/admin/request-logs/{request_id}"))
        if entry is not None:
            entry = {"time": fmt.when(entry["ts"])} | entry
            await self.app.push_screen(DetailScreen(f"request {request_id}: {entry['model']} -> {entry['status']}",
                                                    as_yaml(entry)))

    @work(group="action")
    async def action_find(self) -> None:
        async def find(values: dict[str, str]) -> str:
            request_id = values["request_id"].strip()
            await self.api.get(f"/admin/request-logs/{request_id}")  # a refusal (404) keeps the form
            return request_id

        found = await self.app.push_screen_wait(
            FormScreen("Find a request", [Field("request_id", "Request id (an answer's x-request-id)", "")], find))
        if found:
            await self.show_request(found)
