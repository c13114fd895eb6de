"""Alerts (GET /admin/alerts): firing ones first in red, pending in yellow, resolved below,
each with where it was sent (enter shows it in full); r shows the rules in force
(GET /admin/alerts/rules) with their thresholds, windows and origin."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.binding import Binding

from tui import format as fmt
from tui.modals import DetailScreen, as_yaml
from tui.view import TableView
from tui.widgets import Column

STATE_STYLES = {"firing": "bold red", "pending": "yellow", "resolved": "green"}
ORDER = {"firing": 0, "pending": 1, "resolved": 2}


def state(row: dict) -> Text:
    return Text(row["state"], style=STATE_STYLES.get(row["state"], ""))


def sent(row: dict) -> Text:
    """hook ok, mail FAILED: each channel's last delivery."""
    text = Text()
    for name, delivery in row["deliveries"].items():
        if text:
            text.append(", ")
        text.append(f"{name} ")
        text.append("FAILED" if delivery["error"] else "ok", style="bold red" if delivery["error"] else "green")
    return text or Text("-")


class AlertsView(TableView):
    TITLE = "alerts"
    REFRESH_S = 5.0
    COLUMNS = (
        Column("state", "STATE", state), Column("severity", "SEVERITY"), Column("rule", "RULE"),
        Column("summary", "SUMMARY"), Column("started_at", "STARTED", lambda r: fmt.age(r["started_at"])),
        Column("resolved_at", "RESOLVED", lambda r: fmt.age(r["resolved_at"]) if r["resolved_at"] else "-"),
        Column("deliveries", "SENT", sent),
    )
    BINDINGS = [Binding("r", "rules", "Rules")]

    async def fetch(self) -> list[dict]:
        rows = await self.api.get("/admin/alerts", limit=200)
        return sorted(rows, key=lambda r: (ORDER.get(r["state"], 3), -r["started_at"]))

    def heading(self) -> str:
        return "alerts · firing, pending, then resolved"

    async def open(self, row: dict) -> None:
        detail = row | {"started": fmt.when(row["started_at"]), "fired": fmt.when(row["fired_at"]),
                        "resolved": fmt.when(row["resolved_at"])}
        await self.app.push_screen(DetailScreen(f"alert {row['id']}: {row['rule']} ({row['state']})", as_yaml(detail)))

    @work(group="action")
    async def action_rules(self) -> None:
        rules = await self.attempt(self.api.get("/admin/alerts/rules"))
        if rules is None:
            return
        lines = {r["name"]: {"kind": r["kind"], "threshold": f"{r['threshold']:g} {r['unit']}",
                             "window": f"{r['window_s']:g} s" if r["window_s"] else None, "for": f"{r['for_s']:g} s",
                             "severity": r["severity"], "model": r.get("model"),
                             "channels": r["channels"] or "every channel", "enabled": r["enabled"],
                             "origin": r["origin"]} for r in rules}
        await self.app.push_screen(DetailScreen("alert rules in force", as_yaml(lines)))
