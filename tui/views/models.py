"""The model registry and its deployments: models with their versions, a version's card
(shown, edited, compared with another's), uploading a file from this machine as a new
version, deploying a version and undeploying it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from appliance.admin_client import AdminApiError
from tui import format as fmt
from tui.client import local_file
from tui.modals import DetailScreen, Field, FormScreen, as_yaml
from tui.view import MARK_COLUMN, Marking, TableView
from tui.widgets import Column

# The card fields an admin may change (appliance.model_card.EDITABLE); tags are a list.
CARD_LABELS = {
    "description": "Description", "license": "License", "tags": "Tags (comma-separated)",
    "intended_use": "Intended use", "limitations": "Limitations", "notes": "Notes",
}
DEPLOYMENT_STYLES = {"running": "green", "pending": "yellow", "starting": "yellow", "failed": "bold red",
                     "stopping": "dim"}
LONG = 300  # characters of a card value shown in a comparison (chat templates run to thousands)


def count(n: int | None) -> str:
    """134515008 -> 134.5M."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def card_summary(card: dict | None) -> str:
    """'llama 134.5M Q4_1 ctx 8192 · description'."""
    if not card:
        return "-"
    parts = [card.get("architecture"), card.get("parameters") and count(card["parameters"]),
             card.get("quantization"), card.get("context_length") and f"ctx {card['context_length']}"]
    line = " ".join(str(p) for p in parts if p)
    if card.get("description"):
        line += f" · {card['description'][:40]}"
    return line or "-"


def deployed(row: dict) -> Text:
    return Text(fmt.text(row.get("deployed_as")), style="green" if row.get("deployed_as") else "")


def whole(name: str, text: str, *, low: int, high: int | None = None) -> int | None:
    """A form's whole number (empty: None); ValueError naming the field otherwise."""
    if not text:
        return None
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        raise ValueError(f"{name}: {text!r} is not a whole number from {low}" + (f" to {high}" if high else " up"))
    return int(text)


def model_file(text: str) -> Path:
    if Path(text).expanduser().is_dir():
        raise ValueError(f"{text} is a directory: only a file (GGUF) can be uploaded; register a directory "
                         "on the gateway's machine with `appliance models register --server-path`")
    return local_file(text)


class UploadBar(Horizontal):
    """An upload's progress, shown while one runs."""

    DEFAULT_CSS = """
    UploadBar { height: 1; display: none; padding: 0 1; }
    UploadBar Label { width: auto; margin-right: 2; }
    """

    def compose(self):
        yield Label()
        yield ProgressBar(show_eta=True)

    def start(self, what: str, total: int) -> None:
        self.query_one(Label).update(what)
        self.query_one(ProgressBar).update(total=total, progress=0)
        self.display = True

    def advance(self, done: int) -> None:
        self.query_one(ProgressBar).update(progress=done)

    def stop(self) -> None:
        self.display = False


class RegistryView(TableView):
    """A list in the registry, where `u` uploads a file from this machine as a model's next version."""

    BINDINGS = [Binding("u", "upload", "Upload a version")]

    def body(self):
        yield from super().body()
        yield UploadBar()

    def upload_model(self) -> str:
        """The model an upload goes to unless the admin names another."""
        return ""

    @work(group="action")
    async def action_upload(self) -> None:
        async def check(values: dict[str, str]) -> tuple[str, Path, str]:
            if not values["name"]:
                raise ValueError("name: give the model's name (a new name registers a new model)")
            return values["name"], model_file(values["path"]), values["sha256"]

        fields = [Field("name", "Model (a new name registers a new model)", self.upload_model()),
                  Field("path", "File on this machine (a GGUF file)", placeholder="~/models/model.gguf"),
                  Field("sha256", "Expected SHA-256 (optional: a mismatch registers nothing)")]
        answer = await self.app.push_screen_wait(FormScreen("Upload a model version", fields, check))
        if answer is None:
            return
        name, path, sha256 = answer
        size = path.stat().st_size
        bar = self.query_one(UploadBar)
        bar.start(f"uploading {path.name} ({fmt.size(size)}) to {name}; leaving this view cancels it", size)
        try:
            row = await self.attempt(self.api.upload(f"/admin/models/{name}/upload", path,
                                                     {"filename": path.name, "sha256": sha256}, bar.advance))
        finally:
            bar.stop()
        if row is not None:
            self.notify(f"{name} version {row['version']}: {fmt.size(row['size'])}, sha256 {row['sha256']}",
                        title="Uploaded", timeout=10)
            self.reload()


class ModelsView(RegistryView):
    TITLE = "models"
    COLUMNS = (
        Column("name", "NAME"), Column("latest", "LATEST", lambda r: f"v{r['latest']}" if r["latest"] else "-"),
        Column("versions", "VERSIONS"), Column("size", "SIZE", lambda r: fmt.size(r["size"]) if r.get("size") else "-"),
        Column("card", "LATEST CARD", lambda r: card_summary(r.get("card"))),
        Column("deployed_as", "DEPLOYED AS", deployed),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )

    def key(self, row: dict) -> str:
        return row["name"]

    async def fetch(self) -> list[dict]:
        models = await self.api.get("/admin/models")
        details = await asyncio.gather(*(self.api.get(f"/admin/models/{m['name']}") for m in models),
                                       return_exceptions=True)
        for model, detail in zip(models, details):
            versions = [] if isinstance(detail, BaseException) else detail["versions"]
            latest = next((v for v in versions if v["version"] == model["latest"]), {})
            model |= {"size": latest.get("size"), "card": latest.get("card")}
        return models

    def upload_model(self) -> str:
        return self.selected["name"] if self.selected else ""

    async def open(self, row: dict) -> None:
        await self.app.push_screen(VersionsView(row["name"]))

    def action_delete(self) -> None:
        self.notify("Open the model (enter) and delete its versions there: the model goes with its last one.",
                    severity="warning")


class VersionsView(Marking, RegistryView):
    """The versions of one model: enter shows a card, e edits it, space marks one and c compares
    it with another, d deploys, ctrl-d deletes."""

    TITLE = "versions"
    MARK_KEY = "version"
    COLUMNS = (
        MARK_COLUMN,
        Column("version", "VERSION", lambda r: f"v{r['version']}"), Column("format", "FORMAT"),
        Column("size", "SIZE", lambda r: fmt.size(r["size"])), Column("sha256", "SHA256", lambda r: r["sha256"][:12]),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
        Column("card", "CARD", lambda r: card_summary(r["card"])),
        Column("edited_fields", "EDITED"), Column("deployed_as", "DEPLOYED AS", deployed),
    )
    BINDINGS = [
        Binding("e", "edit", "Edit card"),
        Binding("space,m", "mark", "Mark to compare", key_display="space"),
        Binding("c", "compare", "Compare"),
        Binding("d", "deploy", "Deploy"),
    ]

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def heading(self) -> str:
        return f"{self.model}: versions"

    def key(self, row: dict) -> str:
        return str(row["version"])

    def path(self, version: int | None = None) -> str:
        return f"/admin/models/{self.model}" + ("" if version is None else f"/versions/{version}")

    async def fetch(self) -> list[dict]:
        try:
            versions = (await self.api.get(self.path()))["versions"]
        except AdminApiError as exc:
            if exc.status != 404:
                raise
            versions = []  # its last version was deleted: the model is gone
        return self.with_marks(versions)

    def upload_model(self) -> str:
        return self.model

    async def open(self, row: dict) -> None:
        version = await self.attempt(self.api.get(self.path(row["version"])))
        if version is not None:
            await self.app.push_screen(DetailScreen(f"{self.model} version {version['version']}", version_page(version)))

    @work(group="action")
    async def action_edit(self) -> None:
        row = self.selected
        if row is None:
            return
        card = row["card"]

        async def save(values: dict[str, str]) -> dict | None:
            edits = card_edits(values, card)
            if not edits:
                raise ValueError("nothing changed")
            return await self.api.patch(self.path(row["version"]) + "/card", edits)

        fields = [Field(name, label + (" (edited)" if name in row["edited_fields"] else ""), card_text(card.get(name)))
                  for name, label in CARD_LABELS.items()]
        title = f"Card of {self.model} version {row['version']} (a field emptied shows what the files say again)"
        if await self.app.push_screen_wait(FormScreen(title, fields, save)):
            self.notify(f"Card of {self.model} version {row['version']} updated.")
            self.reload()

    def mark_note(self) -> str:
        return f"Version {self.marked} marked: c on another version compares them."

    @work(group="action")
    async def action_compare(self) -> None:
        row = self.selected
        if row is None:
            return
        other = self.marked_other(row) or await self.ask_other(row["version"])
        if other is None:
            return
        a, b = sorted((other, row["version"]))
        compared = await self.attempt(self.api.get(self.path() + "/compare", a=a, b=b))
        if compared is not None:
            self.mark(None)
            await self.app.push_screen(DetailScreen(f"{self.model}: version {a} and version {b}", comparison(compared)))

    async def ask_other(self, version: int) -> int | None:
        async def check(values: dict[str, str]) -> int:
            other = whole("version", values["version"], low=1)
            if other is None or other == version:
                raise ValueError(f"give another version than {version}")
            return other

        previous = max((r["version"] for r in self.table.all_rows if r["version"] < version), default=None)
        fields = [Field("version", "The other version", "" if previous is None else str(previous))]
        return await self.app.push_screen_wait(FormScreen(f"Compare version {version} with", fields, check))

    @work(group="action")
    async def action_deploy(self) -> None:
        row = self.selected
        if row is None:
            return

        async def deploy(values: dict[str, str]) -> dict:
            body = {"model": self.model, "version": row["version"], "name": values["name"] or None,
                    "replicas": whole("replicas", values["replicas"], low=1, high=16),
                    "context_length": whole("context_length", values["context_length"], low=128)}
            return await self.api.post("/admin/deployments", {k: v for k, v in body.items() if v is not None})

        context = row["card"].get("context_length")
        fields = [Field("name", "Served as (the model id clients ask for)", self.model),
                  Field("replicas", "Replicas (1 to 16)", "1"),
                  Field("context_length", f"Context length (empty: the model's{f' {context}' if context else ''}, "
                                          "at most 4096)")]
        await self.form(f"Deploy {self.model} version {row['version']}", fields, deploy,
                        done=lambda made: f"{self.model} version {row['version']} is {made['state']} as {made['name']}: "
                        ":deployments follows it.")

    def delete_question(self, row: dict) -> str | None:
        last = " It is the model's last version: the model goes too." if len(self.table.all_rows) == 1 else ""
        return f"Delete {self.model} version {row['version']} ({fmt.size(row['size'])}) and its files?{last}"

    async def delete(self, row: dict) -> None:
        await self.attempt(self.api.delete(self.path(row["version"])),
                           done=f"{self.model} version {row['version']} deleted.")


def card_text(value) -> str:
    if value is None:
        return ""
    return ", ".join(value) if isinstance(value, list) else str(value)


def card_edits(values: dict[str, str], card: dict) -> dict:
    """The card fields changed in the form: emptied ones as None (the files' value again)."""
    edits = {}
    for name, text in values.items():
        if text == card_text(card.get(name)):
            continue
        if not text:
            edits[name] = None
        elif name == "tags":
            edits[name] = [t.strip() for t in text.split(",") if t.strip()]
        else:
            edits[name] = text
    return edits


def grid(*headings: str) -> Table:
    """A borderless table: the first column as wide as its longest entry, the others share the rest."""
    table = Table(show_header=bool(headings), box=None, padding=(0, 2, 0, 0), expand=True)
    for i, heading in enumerate(headings or ("", "")):
        table.add_column(heading, overflow="fold", no_wrap=not i, ratio=i and 1 or None)
    return table


def version_page(v: dict) -> Group:
    """A version: its facts, its card (edited fields marked) and its files."""
    facts = grid()
    for label, value in (("format", v["format"]), ("size", fmt.size(v["size"])), ("sha256", v["sha256"]),
                         ("source", v["source"]), ("registered", f"{fmt.when(v['created_at'])} by {v['created_by'] or '-'}"),
                         ("deployed as", fmt.text(v["deployed_as"]))):
        facts.add_row(Text(label, style="bold"), value)
    card = grid("CARD", "")
    for field, value in v["card"].items():
        edited = field in v["edited_fields"]
        card.add_row(Text(field + (" (edited)" if edited else ""), style="bold yellow" if edited else "bold"),
                     as_yaml(value) if field == "chat_template" else fmt.text(value))
    files = grid("FILE", "SIZE", "SHA256")
    for f in v["files"]:
        files.add_row(f["path"], fmt.size(f["size"]), f["sha256"])
    return Group(facts, Text(), card, Text(), files)


def comparison(compared: dict) -> Group:
    """Two columns, one per version; the fields that differ highlighted, first."""
    table = grid("FIELD", f"VERSION {compared['a']}", f"VERSION {compared['b']}")
    seen, rows = set(), []
    for f in compared["fields"]:
        if f["field"] not in seen:  # `format` is both a card field and a fact
            seen.add(f["field"])
            rows.append(f)
    rows.sort(key=lambda f: f["same"])
    for f in rows:
        show = {"created_at": fmt.when, "size": fmt.size}.get(f["field"], fmt.text)
        shown = [show(x) for x in (f["a"], f["b"])]
        shown = [s if len(s) <= LONG else s[:LONG] + "…" for s in shown]
        style = "" if f["same"] else "bold yellow"
        table.add_row(Text(f["field"], style=style or "bold"), Text(shown[0], style=style), Text(shown[1], style=style))
    differ = sum(not f["same"] for f in rows)
    return Group(Text(f"{differ} of {len(rows)} fields differ", style="bold"), Text(), table)


class DeploymentsView(TableView):
    TITLE = "deployments"
    REFRESH_S = 2.0
    COLUMNS = (
        Column("name", "NAME"), Column("model", "MODEL"), Column("version", "VERSION", lambda r: f"v{r['version']}"),
        Column("engine", "ENGINE"), Column("replicas", "REPLICAS"), Column("context_length", "CONTEXT"),
        Column("state", "STATE", lambda r: Text(r["state"], style=DEPLOYMENT_STYLES.get(r["state"], ""))),
        Column("endpoints", "ENDPOINTS", lambda r: str(len(r["endpoints"]))), Column("message", "MESSAGE"),
        Column("updated_at", "SINCE", lambda r: fmt.age(r["updated_at"])),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [Binding("ctrl+d", "delete", "Undeploy")]

    def key(self, row: dict) -> str:
        return row["name"]

    async def fetch(self) -> list[dict]:
        return await self.api.get("/admin/deployments")

    async def open(self, row: dict) -> None:
        deployment = await self.attempt(self.api.get(f"/admin/deployments/{row['name']}"))
        if deployment is not None:
            await self.app.push_screen(DetailScreen(f"deployment {deployment['name']}", as_yaml(deployment)))

    def delete_question(self, row: dict) -> str | None:
        return (f"Undeploy {row['name']} ({row['model']} version {row['version']})? Its engines stop and clients "
                "asking for it get 404 (routes naming it fail over to their other models).")

    async def delete(self, row: dict) -> None:
        await self.attempt(self.api.delete(f"/admin/deployments/{row['name']}"), done=f"Undeploying {row['name']}.")
