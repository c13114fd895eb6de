"""The audit log (GET /admin/audit): its newest entries, narrowed on the server by action,
target and count (f), each shown in full with its hashes (enter); v checks the hash chain
(GET /admin/audit/verify) and r follows new entries as they are written."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.binding import Binding

from tui import format as fmt
from tui.modals import DetailScreen, Field, FormScreen, as_yaml
from tui.view import TableView
from tui.widgets import Column

DEFAULT_LIMIT = 100
TAIL_S = 2.0
FILTERS = ("action", "target", "limit")
OUTCOME_STYLES = {"ok": "green", "flagged": "yellow", "refused": "bold red", "error": "bold red"}


def outcome(row: dict) -> Text:
    """'refused: why' in red: the style of the word before the colon."""
    text = row.get("outcome") or "-"
    return Text(text, style=OUTCOME_STYLES.get(text.partition(":")[0], ""))


def who(row: dict) -> str:
    return fmt.text(row.get("key_name") or row.get("key_id"))


def query_of(values: dict[str, str]) -> dict:
    """The form's values as /admin/audit's query: empty fields left out, the limit a number."""
    query = {name: values[name] for name in ("action", "target") if values.get(name)}
    limit = values.get("limit", "")
    if limit:
        try:
            query["limit"] = int(limit)
        except ValueError:
            raise ValueError(f"limit must be a whole number, not {limit!r}") from None
    return query


def rows(count: int) -> str:
    return f"{count} row" + ("" if count == 1 else "s")


def verification_text(result: dict) -> str:
    if result["ok"]:
        if result["first_id"] is None:
            return "The audit log is empty."
        text = f"Chain intact: {rows(result['rows'])} checked, ids {result['first_id']} to {result['last_id']}"
        if result.get("pruned_through"):
            text += f" (rows through {result['pruned_through']} removed by retention)"
        if result.get("unsealed"):
            text += f"; {rows(result['unsealed'])} from before the chain, sealed at the next change"
        return text + "."
    return (f"Row {result['bad_id']}: {result['reason']} ({result['problem']}); "
            f"{rows(result['rows'])} before it intact.")


class AuditView(TableView):
    TITLE = "audit"
    COLUMNS = (
        Column("id", "ID"), Column("ts", "TIME", lambda r: fmt.when(r["ts"])),
        Column("who", "WHO", who), Column("role", "ROLE"), Column("action", "ACTION"), Column("target", "TARGET"),
        Column("request_id", "REQUEST"), Column("outcome", "OUTCOME", outcome),
    )
    BINDINGS = [
        Binding("f", "server_filter", "Server filter"),
        Binding("v", "verify", "Verify chain"),
        Binding("r", "tail", "Live tail"),
    ]

    def __init__(self, argument: str = "") -> None:
        """`argument`: server filters as `action=key.create target=key/ limit=20` (sent as given,
        so a bad one is the API's refusal); any other words the table's first filter."""
        self.filters: dict = {}
        words = []
        for word in argument.split():
            name, sep, value = word.partition("=")
            if sep and name in FILTERS:
                self.filters[name] = value
            else:
                words.append(word)
        super().__init__(" ".join(words))
        self.live = False

    def on_mount(self) -> None:  # after View's (Textual calls each class's handler)
        self.tail = self.set_interval(TAIL_S, self.tick, pause=True)

    def heading(self) -> str:
        limit = self.filters.get("limit", DEFAULT_LIMIT)
        text = f"audit · newest {limit}"
        text += "".join(f" · {name} {self.filters[name]}" for name in ("action", "target") if name in self.filters)
        return text + (f" · live every {TAIL_S:g} s" if self.live else "")

    async def fetch(self) -> list[dict]:
        return await self.api.get("/admin/audit", **({"limit": DEFAULT_LIMIT} | self.filters))

    async def open(self, row: dict) -> None:
        detail = {"id": row["id"], "time": fmt.when(row["ts"])} | row
        await self.app.push_screen(DetailScreen(f"audit entry {row['id']}: {row['action']} {row['target']}",
                                                as_yaml(detail)))

    @work(group="action")
    async def action_server_filter(self) -> None:
        async def apply(values: dict[str, str]) -> dict:
            query = query_of(values)
            await self.api.get("/admin/audit", **({"limit": 1} | query))  # asked once: a refusal keeps the form
            self.filters = query
            return query

        fields = [Field("action", "Action (exact, like key.create; empty: every action)",
                        self.filters.get("action", "")),
                  Field("target", "Target starts with (like key/ or model/smollm2; empty: every target)",
                        self.filters.get("target", "")),
                  Field("limit", f"How many of the newest (1-10000; empty: {DEFAULT_LIMIT})",
                        str(self.filters.get("limit", "")))]
        await self.app.push_screen_wait(FormScreen("Audit log: server filter", fields, apply))
        self.rows_shown()  # the heading names the filter at once; the rows come as the view shows again

    def action_back(self) -> None:
        """esc: the local filter goes first, then the server filter, then the view."""
        if not self.table.filter and self.filters:
            self.filters = {}
            self.rows_shown()
            self.reload()
        else:
            super().action_back()

    @work(group="action")
    async def action_verify(self) -> None:
        result = await self.attempt(self.api.get("/admin/audit/verify"))
        if result is None:
            return
        if result["ok"]:
            self.notify(verification_text(result), title="Audit chain verified")
        else:
            self.notify(verification_text(result), title="Audit chain broken", severity="error", timeout=20)

    def action_tail(self) -> None:
        self.live = not self.live
        if self.live:
            self.tail.resume()
            self.reload()
        else:
            self.tail.pause()
        self.rows_shown()
        self.notify(f"Live tail: every {TAIL_S:g} s." if self.live else "Live tail off.")
