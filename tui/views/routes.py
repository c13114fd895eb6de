"""Routes: the names clients ask for, served by weighted targets (a canary split), fallbacks
and a shadow; each with where it comes from (the profile, or stored through the API) and
the state of its models in the gateway now."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding

from tui import format as fmt
from tui.modals import DetailScreen, Field
from tui.view import TableView
from tui.widgets import Column

STATE_STYLES = {"ready": "green", "degraded": "yellow", "down": "bold red", "unavailable": "bold red",
                "not served": "bold red"}
LABELS = {
    "targets": "Targets: MODEL=WEIGHT, comma-separated (weights are relative: a=95, b=5 is a 95/5 canary)",
    "fallbacks": "Fallbacks: models tried in this order when the targets fail (comma-separated)",
    "shadow": "Shadow: MODEL=PERCENT of the answered requests copied to MODEL and compared (empty: none)",
}


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_targets(text: str) -> list[dict]:
    """'a=95, b=5' (a bare model weighs 1; a trailing % is allowed) -> the API's targets."""
    targets = []
    for part in split(text):
        model, sign, weight = (s.strip() for s in part.partition("="))
        weight = weight.removesuffix("%").strip()
        if not model or (sign and not weight.isdigit()):
            raise ValueError(f"targets: {part!r} is not MODEL=WEIGHT with a whole number (like {model or 'chat'}=95)")
        targets.append({"model": model, "weight": int(weight) if sign else 1})
    if not targets:
        raise ValueError("targets: give at least one served model, like chat-v1=95, chat-v2=5")
    return targets


def parse_shadow(text: str) -> dict | None:
    if not text:
        return None
    model, sign, percent = (s.strip() for s in text.partition("="))
    try:
        share = float(percent.removesuffix("%"))
    except ValueError:
        share = None
    if not sign or not model or share is None:
        raise ValueError(f"shadow: {text!r} is not MODEL=PERCENT (like chat-v3=10)")
    return {"model": model, "percent": share}


def route_body(values: dict[str, str]) -> dict:
    return {"targets": parse_targets(values["targets"]), "fallbacks": split(values["fallbacks"]),
            "shadow": parse_shadow(values["shadow"])}


def route_fields(route: dict | None = None) -> list[Field]:
    route = route or {"targets": [], "fallbacks": [], "shadow": None}
    shadow = route["shadow"]
    values = {"targets": ", ".join(f"{t['model']}={t['weight']}" for t in route["targets"]),
              "fallbacks": ", ".join(route["fallbacks"]),
              "shadow": f"{shadow['model']}={shadow['percent']:g}" if shadow else ""}
    return [Field(name, label, values[name], placeholder="smollm2=95, smollm2-v2=5" if name == "targets" else "")
            for name, label in LABELS.items()]


def shares(route: dict) -> str:
    return " / ".join(f"{t['model']} {t['share']:g}%" for t in route["targets"])


def source(route: dict) -> str:
    if route["source"] == "profile":
        return "profile"
    return "stored, over the profile's" if route.get("replaces_profile_route") else "stored"


def states(route: dict) -> dict[str, str]:
    """Each model's state in the gateway now: ready, unavailable or not served."""
    live = route.get("live") or {"targets": [], "fallbacks": []}
    return {m["model"]: m["state"] for m in live["targets"] + live["fallbacks"]}


def health(route: dict) -> Text:
    """ready; degraded (naming the models that cannot answer); down when no target can; '-' until served."""
    if not route.get("live"):
        return Text("-", style="dim")
    now = states(route)
    failing = [f"{model} {state}" for model, state in now.items() if state != "ready"]
    targets_ready = any(now.get(t["model"]) == "ready" for t in route["targets"] if t["weight"])
    state = "ready" if not failing else "degraded" if targets_ready else "down"
    return Text(state + (f": {', '.join(failing)}" if failing else ""), style=STATE_STYLES[state])


def route_page(route: dict) -> Group:
    """A route: where it comes from, each model with its weight and state, and its shadow traffic."""
    head = f"source: {source(route)}"
    if route["source"] == "admin":
        head += f", set {fmt.when(route['updated_at'])} by {route['updated_by'] or '-'}"
    models = Table(box=None, padding=(0, 2, 0, 0))
    for heading in ("ROLE", "MODEL", "WEIGHT", "SHARE", "STATE"):
        models.add_column(heading)
    now = states(route)

    def state(model: str) -> Text:
        value = now.get(model, "-")
        return Text(value, style=STATE_STYLES.get(value, ""))

    for t in route["targets"]:
        models.add_row("target", t["model"], str(t["weight"]), f"{t['share']:g}%", state(t["model"]))
    for i, model in enumerate(route["fallbacks"], 1):
        models.add_row(f"fallback {i}", model, "", "", state(model))
    if route["shadow"]:
        models.add_row("shadow", route["shadow"]["model"], "", f"{route['shadow']['percent']:g}% copied",
                       state(route["shadow"]["model"]))
    parts = [Text(head), Text(), models]
    results = route.get("shadow_results") or []
    if results:
        shadow = Table(title="shadow traffic, last 24 h", box=None, padding=(0, 2, 0, 0))
        columns = ("primary_model", "shadow_model", "requests", "shadow_errors", "similarity", "primary_ms", "shadow_ms")
        for column in columns:
            shadow.add_column(column.upper().replace("_", " "))
        for row in results:
            shadow.add_row(*(fmt.text(row[c]) for c in columns))
        parts += [Text(), shadow]
    return Group(*parts)


class RoutesView(TableView):
    TITLE = "routes"
    REFRESH_S = 3.0
    COLUMNS = (
        Column("name", "NAME"), Column("targets", "TARGETS", shares),
        Column("fallbacks", "FALLBACKS"),
        Column("shadow", "SHADOW", lambda r: f"{r['shadow']['model']} {r['shadow']['percent']:g}%" if r["shadow"] else "-"),
        Column("source", "SOURCE", source), Column("live", "STATE", health),
        Column("updated_at", "CHANGED", lambda r: fmt.age(r.get("updated_at"))),
    )
    BINDINGS = [
        Binding("n", "create", "New"),
        Binding("e", "edit", "Edit"),
        Binding("w", "weights", "Shift weights"),
    ]

    def key(self, row: dict) -> str:
        return row["name"]

    async def fetch(self) -> list[dict]:
        return await self.api.get("/admin/routes")

    async def open(self, row: dict) -> None:
        route = await self.attempt(self.api.get(f"/admin/routes/{row['name']}"))
        if route is not None:
            await self.app.push_screen(DetailScreen(f"route {route['name']}", route_page(route)))

    async def put(self, name: str, body: dict) -> dict:
        return await self.api.put(f"/admin/routes/{name}", body)

    @work(group="action")
    async def action_create(self) -> None:
        async def create(values: dict[str, str]) -> dict:
            if not values["name"]:
                raise ValueError("name: give the route a name (the model name clients will ask for)")
            return await self.put(values["name"], route_body(values))

        fields = [Field("name", "Name (what clients send as `model`)"), *route_fields()]
        await self.form("New route", fields, create,
                        done=lambda route: f"Route {route['name']} set: {shares(route)}; served within a second.")

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return

        async def save(values: dict[str, str]) -> dict:
            return await self.put(row["name"], route_body(values))

        title = f"Route {row['name']}"
        if row["source"] == "profile":
            title += " (saved, it replaces the profile's route until deleted)"
        await self.form(title, route_fields(row), save,
                        done=lambda route: f"Route {route['name']} set: {shares(route)}.")

    @work(group="action")
    async def action_weights(self) -> None:
        """Each target's share in percent (adding up to 100), the rest of the route as it is."""
        row = self.selected
        if row is None:
            return
        targets = row["targets"]

        async def save(values: dict[str, str]) -> dict:
            weights = []
            for i, target in enumerate(targets):
                text = values[f"t{i}"].removesuffix("%").strip()
                if not text.isdigit():
                    raise ValueError(f"{target['model']}: {text!r} is not a whole percent")
                weights.append(int(text))
            if sum(weights) != 100:
                raise ValueError(f"the shares add up to {sum(weights)}%, not 100%")
            body = {"targets": [{"model": t["model"], "weight": w} for t, w in zip(targets, weights)],
                    "fallbacks": row["fallbacks"], "shadow": row["shadow"]}
            return await self.put(row["name"], body)

        fields = [Field(f"t{i}", f"{t['model']}: percent of the requests (now {t['share']:g}%)", str(round(t["share"])))
                  for i, t in enumerate(targets)]
        await self.form(f"Shares of route {row['name']}", fields, save,
                        done=lambda route: f"Route {route['name']}: {shares(route)}.")

    def delete_question(self, row: dict) -> str | None:
        if row.get("replaces_profile_route"):
            return f"Delete the stored route {row['name']}? The profile's route {row['name']} is served again."
        return f"Delete route {row['name']}? Clients asking for it get 404 from then on."

    async def delete(self, row: dict) -> None:
        deleted = await self.attempt(self.api.delete(f"/admin/routes/{row['name']}"))
        if deleted is not None:
            again = "; the profile's route is served again" if deleted["serving"] else ""
            self.notify(f"Route {row['name']} deleted{again}.")
