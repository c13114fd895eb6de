"""The dataset registry: every dataset with its latest version, a dataset's versions, and a
version's schema, quality report and PII scan; diff two versions, mask PII into a new
version, split one, delete one, and upload a file from the admin's own machine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding

from appliance.admin_client import AdminApiError
from tui import format as fmt
from tui.client import local_file
from tui.modals import DetailScreen, Field, FormScreen
from tui.view import MARK_COLUMN, Marking, TableView
from tui.widgets import Column

FORMATS = ("csv", "jsonl", "parquet")
PARALLEL_READS = 8  # versions asked for at once when listing datasets
DEFAULT_RATIOS = "train=0.8,validation=0.1,test=0.1"


def upload_fields(name: str | None) -> list[Field]:
    """The upload form's fields; with `name` None, the dataset is not asked for."""
    fields = [Field("name", "Dataset (an existing one gets a new version)", name)] if name is not None else []
    return [*fields,
            Field("path", "File on this machine (CSV, JSON Lines or Parquet)", placeholder="~/data/train.jsonl"),
            Field("format", "Format (empty: from the file's extension, else its content)", choices=FORMATS),
            Field("sha256", "Expected SHA-256 (optional: a mismatch registers nothing)")]


def upload_params(path: Path, values: dict[str, str]) -> dict[str, str | None]:
    return {"filename": path.name, "format": values.get("format"), "sha256": values.get("sha256")}


def uploaded_note(row: dict) -> str:
    found = sum(row["pii"]["counts"].values())
    return (f"Registered {row['dataset']} version {row['version']}: {row['rows']} rows, {row['format']}, "
            f"{fmt.size(row['size'])}" + (f"; {found} PII matches found" if found else "; no PII found"))


def ratios(text: str) -> dict[str, float]:
    parsed = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        part, sign, share = item.partition("=")
        try:
            parsed[part.strip()] = float(share)
        except ValueError:
            raise ValueError(f"ratios: {item!r} is not PART=SHARE, like train=0.8") from None
        if not sign or not part.strip():
            raise ValueError(f"ratios: {item!r} is not PART=SHARE, like train=0.8")
    return parsed


def _table(title: str, *headers: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold", box=None,
                  padding=(0, 2, 0, 0))
    for header in headers:
        table.add_column(header)
    return table


def version_report(row: dict, by: str) -> Group:
    """A version as an admin reads it: what it is, its columns and quality, its PII and its splits."""
    quality, scan = row["quality"], row["pii"]
    about = Text.assemble(
        (f"{row['rows']} rows", "bold"), f" · {row['format']} · {fmt.size(row['size'])} · sha256 {row['sha256']}\n",
        f"source: {row['source']}", f"  ({row['derivation']})" if row.get("derivation") else "",
        f"\ncreated {fmt.when(row['created_at'])} by {by or '-'}\n")
    columns = _table("Columns", "COLUMN", "TYPE", "NULLS", "DISTINCT", "LENGTH min/p50/p90/max")
    for c in quality["columns"]:
        length = c["length"]
        columns.add_row(c["name"], c["type"], f"{c['nulls']} ({fmt.percent(c['null_fraction'])})", str(c["distinct"]),
                        "/".join(str(length[k]) for k in ("min", "p50", "p90", "max")) if length else "-")
    checks = Text(f"\nduplicate rows: {quality['duplicate_rows']}   empty rows: {quality['empty_rows']}\n",
                  style="yellow" if quality["duplicate_rows"] or quality["empty_rows"] else "")
    parts = [about, columns, checks, *pii_report(scan)]
    if row.get("splits"):
        splits = _table("\nSplits", "ID", "SEED", "PARTS", "CREATED")
        for s in row["splits"]:
            splits.add_row(s["id"], str(s["seed"]), ", ".join(f"{p} {v['rows']} rows" for p, v in s["parts"].items()),
                           fmt.when(s["created_at"]))
        parts.append(splits)
    return Group(*parts)


def pii_report(scan: dict) -> list:
    found = {kind: n for kind, n in scan["counts"].items() if n}
    if not found:
        return [Text(f"PII scan: nothing found in {scan['rows_scanned']} rows", style="green")]
    summary = Text(f"PII scan: {scan['rows_with_pii']} of {scan['rows_scanned']} rows hold personal data "
                   f"(x masks it into a new version)\n", style="bold red")
    detectors = _table("", "DETECTOR", "FOUND", "BY COLUMN")
    for kind, n in found.items():
        by_column = {column: counts.get(kind, 0) for column, counts in scan["by_column"].items()}
        detectors.add_row(kind, str(n), ", ".join(f"{column} {k}" for column, k in by_column.items() if k))
    samples = _table("\nExamples (redacted)", "ROW (from 0)", "WHERE", "DETECTOR", "VALUE")
    for s in scan["samples"]:
        samples.add_row(str(s["row"]), s["path"], s["kind"], s["value"])
    return [summary, detectors, samples]


def diff_report(d: dict) -> Group:
    """GET /admin/datasets/{name}/diff as a summary: counts, how rows were matched, schema changes, examples."""
    lines = [Text.assemble((f"version {d['a']} → {d['b']}: ", "bold"), (f"{d['added']} added", "green"), ", ",
                           (f"{d['removed']} removed", "red"), ", ", (f"{d['changed']} changed", "yellow"),
                           f", {d['unchanged']} unchanged"),
             Text(f"rows {d['rows']['old']} → {d['rows']['new']}; "
                  + (f"rows matched on column {d['key']!r}" if d["key"] else "no key column"))]
    if d.get("note"):
        lines.append(Text(d["note"], style="italic"))
    schema = d["schema"]
    for what in ("added", "removed"):
        if schema[what]:
            lines.append(Text(f"columns {what}: " + ", ".join(f"{c['name']} ({c['type']})" for c in schema[what])))
    for c in schema["type_changed"]:
        lines.append(Text(f"column {c['name']}: {c['old']} → {c['new']}"))
    if not any(schema.values()):
        lines.append(Text("same columns and types"))
    for what, samples in d["samples"].items():
        if samples and d["key"]:  # the keys of the rows
            lines.append(Text.assemble((f"\n{what} ({d['key']}), e.g.: ", "bold"), ", ".join(map(str, samples))))
        elif samples:  # whole rows
            lines.append(Text(f"\n{what} rows, e.g.:", style="bold"))
            lines.extend(Text(f"  {json.dumps(s, ensure_ascii=False)}", overflow="ellipsis", no_wrap=True)
                         for s in samples)
    return Group(*lines)


def size_cell(row: dict) -> str:
    return "-" if row.get("size") is None else fmt.size(row["size"])


class DatasetsView(TableView):
    """Datasets with their latest version; enter lists a dataset's versions, u uploads a file.
    `:datasets NAME` opens that dataset's versions."""

    TITLE = "datasets"
    COLUMNS = (
        Column("name", "NAME"), Column("latest", "LATEST"), Column("versions", "VERSIONS"), Column("rows", "ROWS"),
        Column("format", "FORMAT"), Column("size", "SIZE", size_cell), Column("pii_found", "PII"),
        Column("updated", "UPDATED", lambda r: fmt.age(r.get("updated"))),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [Binding("u", "upload", "Upload a file")]

    def __init__(self, dataset: str | None = None) -> None:
        super().__init__()
        self.dataset = dataset

    def key(self, row: dict) -> str:
        return row["name"]

    def on_mount(self) -> None:  # after View's (Textual calls each class's handler)
        if self.dataset:
            self.app.push_screen(DatasetVersionsView(self.dataset))

    def on_screen_resume(self) -> None:
        self.reload()  # back from a dataset's versions, which may have changed

    async def fetch(self) -> list[dict]:
        datasets = await self.api.get("/admin/datasets")
        gate = asyncio.Semaphore(PARALLEL_READS)

        async def latest(name: str) -> dict:
            async with gate:
                try:
                    versions = (await self.api.get(f"/admin/datasets/{name}"))["versions"]
                except AdminApiError:  # deleted meanwhile, say: the row shows what the list said
                    return {}
            return versions[-1] if versions else {}

        latests = await asyncio.gather(*(latest(d["name"]) for d in datasets))
        return [d | {k: v.get(k) for k in ("rows", "format", "size", "pii_found")} | {"updated": v.get("created_at")}
                for d, v in zip(datasets, latests)]

    async def open(self, row: dict) -> None:
        await self.app.push_screen(DatasetVersionsView(row["name"]))

    @work(group="action")
    async def action_upload(self) -> None:
        async def send(values: dict[str, str]) -> dict:
            if not values["name"]:
                raise ValueError("name: which dataset the file is a version of")
            path = local_file(values["path"])
            self.notify(f"Uploading {path.name} ({fmt.size(path.stat().st_size)})…")
            return await self.api.upload(f"/admin/datasets/{values['name']}/upload", path, upload_params(path, values))

        selected = self.selected
        row = await self.app.push_screen_wait(
            FormScreen("Upload a dataset file", upload_fields(selected["name"] if selected else ""), send))
        if row is not None:
            self.notify(uploaded_note(row))
            self.reload()


class DatasetVersionsView(Marking, TableView):
    """One dataset's versions: enter shows a version's report; mark one (space or m) and f
    diffs it with another; x masks PII into a new version, s splits, ctrl-d deletes, u uploads."""

    TITLE = "dataset versions"
    MARK_KEY = "version"
    COLUMNS = (
        MARK_COLUMN,
        Column("version", "VERSION"), Column("format", "FORMAT"), Column("rows", "ROWS"),
        Column("size", "SIZE", size_cell), Column("pii_found", "PII"),
        Column("source", "SOURCE", lambda r: r.get("derivation") or r["source"]),
        Column("sha256", "SHA256", lambda r: r["sha256"][:12]), Column("by", "BY"),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [
        Binding("space,m", "mark", "Mark for diff", key_display="space/m"),
        Binding("f", "diff", "Diff"),
        Binding("x", "mask", "Mask PII"),
        Binding("s", "split", "Split"),
        Binding("u", "upload", "Upload a file"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.dataset = name
        self.emptied = False  # its last version deleted here: the dataset is gone

    def heading(self) -> str:
        marked = f", version {self.marked} marked: f on another diffs them" if self.marked is not None else ""
        return f"dataset {self.dataset}" + (" (no versions left)" if self.emptied else "") + marked

    def key(self, row: dict) -> str:
        return str(row["version"])

    @property
    def path(self) -> str:
        return f"/admin/datasets/{self.dataset}"

    async def fetch(self) -> list[dict]:
        dataset, keys = await asyncio.gather(  # keys name who made each version, where this caller may list them
            self.api.get(self.path), self.api.get("/admin/keys", include_revoked="true"), return_exceptions=True)
        if isinstance(dataset, AdminApiError) and self.emptied and dataset.status == 404:
            return []
        if isinstance(dataset, BaseException):
            raise dataset
        self.emptied = False
        key_names = {k["id"]: k["name"] for k in keys} if isinstance(keys, list) else {}
        return self.with_marks([v | {"by": key_names.get(v["created_by"], v["created_by"])}
                                for v in dataset["versions"]])

    async def open(self, row: dict) -> None:
        version = await self.attempt(self.api.get(f"{self.path}/versions/{row['version']}"))
        if version is not None:
            await self.app.push_screen(DetailScreen(f"dataset {self.dataset} version {row['version']}",
                                                    version_report(version, row["by"])))

    @work(group="action")
    async def action_diff(self) -> None:
        row = self.selected
        if row is None:
            return
        if self.marked_other(row) is not None:
            diff = await self.attempt(self.api.get(f"{self.path}/diff", a=self.marked, b=row["version"]))
        else:
            async def ask(values: dict[str, str]) -> dict:
                try:
                    a, b = int(values["a"]), int(values["b"])
                except ValueError:
                    raise ValueError("versions are whole numbers") from None
                return await self.api.get(f"{self.path}/diff", a=a, b=b, key=values["key"] or None)

            fields = [Field("a", "From version", str(max(1, row["version"] - 1))),
                      Field("b", "To version", str(row["version"])),
                      Field("key", "Column that identifies a row (empty: id when unique, else whole rows)")]
            diff = await self.app.push_screen_wait(FormScreen(f"Diff versions of {self.dataset}", fields, ask))
        if diff is not None:
            await self.app.push_screen(DetailScreen(f"dataset {self.dataset}: diff", diff_report(diff)))

    @work(group="action")
    async def action_mask(self) -> None:
        row = self.selected
        if row is None or not await self.confirm(
                f"Mask the PII of {self.dataset} version {row['version']} ({row['pii_found']} matches found) into a "
                "new version? Every match becomes a placeholder such as [EMAIL]; this version stays as it is."):
            return
        new = await self.attempt(self.api.post(f"{self.path}/versions/{row['version']}/mask"))
        if new is not None:
            self.notify(f"Registered {self.dataset} version {new['version']}: {new['derivation']}")
            self.reload()

    @work(group="action")
    async def action_split(self) -> None:
        row = self.selected
        if row is None:
            return

        async def split(values: dict[str, str]) -> dict:
            try:
                seed = int(values["seed"] or 0)
            except ValueError:
                raise ValueError(f"seed: {values['seed']!r} is not a whole number") from None
            body = {"ratios": ratios(values["ratios"] or DEFAULT_RATIOS), "seed": seed}
            return await self.api.post(f"{self.path}/versions/{row['version']}/split", body)

        fields = [Field("ratios", "Parts and their shares, adding up to 1", DEFAULT_RATIOS),
                  Field("seed", "Seed (the same seed and shares give the same split)", "0")]
        done = await self.app.push_screen_wait(
            FormScreen(f"Split {self.dataset} version {row['version']}", fields, split))
        if done is not None:
            parts = ", ".join(f"{p} {v['rows']} rows" for p, v in done["parts"].items())
            self.notify(f"Split {done['id']} of {self.dataset} version {row['version']}: {parts}")

    def delete_question(self, row: dict) -> str | None:
        last = " It is the only version: the dataset goes with it." if len(self.table.all_rows) == 1 else ""
        return f"Delete {self.dataset} version {row['version']}, its splits and their files?{last}"

    async def delete(self, row: dict) -> None:
        gone = await self.attempt(self.api.delete(f"{self.path}/versions/{row['version']}"),
                                  done=f"Deleted {self.dataset} version {row['version']}.")
        if gone is not None:
            self.marked = None if self.marked == row["version"] else self.marked
            self.emptied = len(self.table.all_rows) == 1

    @work(group="action")
    async def action_upload(self) -> None:
        async def send(values: dict[str, str]) -> dict:
            path = local_file(values["path"])
            self.notify(f"Uploading {path.name} ({fmt.size(path.stat().st_size)})…")
            return await self.api.upload(f"/admin/datasets/{self.dataset}/upload", path, upload_params(path, values))

        await self.form(f"Upload a new version of {self.dataset}",
                                                         upload_fields(None), send,
                        done=lambda row: uploaded_note(row))
