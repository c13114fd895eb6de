"""Experiments: every fine-tuning and evaluation job is a run in one (docs/experiments.md). The
runs, newest first, with what they trained or evaluated and how they ended; a run in full (an
evaluation's samples too); two runs compared side by side (fine-tuning runs: their params,
those that differ first, their final metrics and their loss step by step on one scale;
evaluations: their scores and the samples that changed); a run's tags; and its job's log."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding

from tui import format as fmt
from tui.modals import DetailScreen, Field, FormScreen, as_yaml
from tui.view import MARK_COLUMN, Marking, TableView
from tui.views.jobs import JobLogScreen, state_text
from tui.widgets import Column

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60  # characters of a loss sparkline in a comparison (more steps are averaged into them)
STEP_ROWS = 20  # steps listed in a comparison's loss table (evenly spread when there are more)
DIFFERS = "*"  # marks a param whose values differ, as `appliance runs compare` does
SAMPLE_ROWS = 50  # an evaluation's samples shown in its detail


def number(value) -> str:
    """A metric or param as shown: 6 significant digits for a float, '-' for none."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return fmt.text(value)


def versioned(ref: dict | None, name: str) -> str:
    """{"model": "smollm2", "version": 1} -> 'smollm2 v1' (a dataset's split added)."""
    if not isinstance(ref, dict) or not ref.get(name):
        return "-"
    shown = f"{ref[name]} v{ref['version']}" if ref.get("version") is not None else str(ref[name])
    return shown + (f" split {ref['split']}" if ref.get("split") else "")


def steps_of(params: dict) -> str:
    if params.get("steps") is not None:
        return str(params["steps"])
    if params.get("epochs") is not None:
        return f"{params['epochs']:g} epoch" + ("" if params["epochs"] == 1 else "s")
    return "-"


def final_loss(run: dict) -> str:
    return number((run.get("final_metrics") or {}).get("loss"))


def run_model(params: dict) -> str:
    """What a run trained on (a fine-tune's base) or evaluated."""
    return versioned(params["base"], "model") if "base" in params else versioned(params.get("model"), "name")


def is_evaluation(run: dict) -> bool:
    return "metrics" in run["params"] and isinstance(run["params"].get("model"), dict)


def main_score(run: dict) -> str:
    """An evaluation's headline score: the judge's, else ROUGE-L, token F1 or exact match."""
    final = run.get("final_metrics") or {}
    name = next((m for m in ("judge", "rougeL", "token_f1", "exact_match") if m in final), None)
    return f"{name} {final[name]:.3f}" if name and is_evaluation(run) else "-"


def tags_of(text: str) -> list[str]:
    """'best, baseline  v2' -> ['best', 'baseline', 'v2']."""
    return [t for t in re.split(r"[\s,]+", text) if t]


class RunsView(Marking, TableView):
    """Fine-tuning and evaluation runs, newest first: enter shows a run in full (an evaluation's
    samples too), space marks one and c compares it with another side by side, t tags a run, l
    follows its job's log. `:runs TEXT` lists the
    runs with TEXT in a cell (an experiment, a base, a tag)."""

    TITLE = "runs"
    REFRESH_S = 5.0
    COLUMNS = (
        MARK_COLUMN,
        Column("id", "ID"), Column("experiment", "EXPERIMENT"),
        Column("state", "STATE", lambda r: state_text(r["state"])),
        Column("model", "MODEL", lambda r: run_model(r["params"])),
        Column("dataset", "DATASET", lambda r: versioned(r["params"].get("dataset"), "name")),
        Column("lora_rank", "LORA RANK", lambda r: number((r["params"].get("lora") or {}).get("rank"))),
        Column("learning_rate", "LR", lambda r: number(r["params"].get("learning_rate"))),
        Column("steps", "STEPS", lambda r: steps_of(r["params"])),
        Column("final_loss", "FINAL LOSS", final_loss),
        Column("score", "SCORE", lambda r: main_score(r)),
        Column("tags", "TAGS", lambda r: fmt.text(r["tags"])),
        Column("created_at", "AGE", lambda r: fmt.age(r["created_at"])),
    )
    BINDINGS = [
        Binding("space,m", "mark", "Mark to compare", key_display="space"),
        Binding("c", "compare", "Compare"),
        Binding("t", "tag", "Tags"),
        Binding("l", "log", "Job log"),
    ]

    async def fetch(self) -> list[dict]:
        return self.with_marks(await self.api.get("/admin/runs"))

    async def open(self, row: dict) -> None:
        run = await self.attempt(self.api.get(f"/admin/runs/{row['id']}"))
        if run is None:
            return
        body = as_yaml(run)
        if is_evaluation(run):
            page = await self.attempt(self.api.get(f"/admin/runs/{run['id']}/samples", limit=SAMPLE_ROWS))
            body = Group(evaluation_samples(page["samples"] if page else []), Text(), body)
        await self.app.push_screen(DetailScreen(f"run {run['id']} ({run['experiment']}, {run['state']})", body))

    def mark_note(self) -> str:
        return f"Run {self.marked} marked: c on another run compares them."

    @work(group="action")
    async def action_compare(self) -> None:
        row = self.selected
        if row is None:
            return
        other = self.marked_other(row) or await self.ask_other(row)
        if other is None:
            return
        ids = f"{other},{row['id']}"
        evaluations = is_evaluation(row) and any(r["id"] == other and is_evaluation(r) for r in self.table.all_rows)
        path = "/admin/evaluations/compare" if evaluations else "/admin/runs/compare"
        compared = await self.attempt(self.api.get(path, ids=ids))
        if compared is not None:
            self.mark(None)
            a, b = (r["id"] for r in compared["runs"])
            shown = evaluation_comparison(compared) if evaluations else comparison(compared)
            await self.app.push_screen(DetailScreen(f"run {a} and run {b}", shown))

    async def ask_other(self, row: dict) -> str | None:
        """The run to compare `row` with, when none is marked: the next older one is offered."""
        async def check(values: dict[str, str]) -> str:
            if not values["run"] or values["run"] == row["id"]:
                raise ValueError(f"give another run than {row['id']} (or mark one with space)")
            return values["run"]

        ids = [r["id"] for r in self.table.all_rows]
        position = ids.index(row["id"]) if row["id"] in ids else -1
        older = ids[position + 1] if 0 <= position < len(ids) - 1 else ""
        fields = [Field("run", "The other run (its id; space marks one in the list)", older)]
        return await self.app.push_screen_wait(FormScreen(f"Compare run {row['id']} with", fields, check))

    @work(group="action")
    async def action_tag(self) -> None:
        row = self.selected
        if row is None:
            return

        async def save(values: dict[str, str]) -> dict:
            add, remove = tags_of(values["add"]), tags_of(values["remove"])
            if not add and not remove:
                raise ValueError("nothing to change: give tags to add or to remove")
            return await self.api.patch(f"/admin/runs/{row['id']}", {"add_tags": add, "remove_tags": remove})

        fields = [Field("add", "Add tags (separated by spaces or commas; no spaces in a tag)", placeholder="best"),
                  Field("remove", f"Remove tags (it has: {fmt.text(row['tags'])})")]
        await self.form(f"Tags of run {row['id']}", fields, save,
                        done=lambda run: f"Run {run['id']}: tags {fmt.text(run['tags'])}.")

    def action_log(self) -> None:
        row = self.selected
        if row is not None:
            self.app.push_screen(JobLogScreen(row["id"]))


def grid(*headings: str) -> Table:
    """A borderless table as wide as what it holds (a header row where headings are given)."""
    table = Table(show_header=bool(headings), box=None, padding=(0, 2, 0, 0))
    for heading in headings or ("", ""):
        table.add_column(heading, overflow="fold")
    return table


def sparkline(values: Sequence[float | None], low: float, high: float, width: int = SPARK_WIDTH) -> str:
    """Block characters from `low` to `high` (the same scale for every run compared), one per
    step or, for more steps than `width`, per run of steps averaged; a blank where there is no value."""
    n = len(values)
    if n > width:
        buckets = [[v for v in values[i * n // width:(i + 1) * n // width] if v is not None] for i in range(width)]
        values = [sum(b) / len(b) if b else None for b in buckets]
    top = len(SPARK) - 1
    return "".join(" " if v is None else SPARK[top // 2 if high <= low else round((v - low) / (high - low) * top)]
                   for v in values)


def spread(count: int, most: int) -> list[int]:
    """Up to `most` indices out of `count`, evenly spread, the first and the last among them."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def comparison(compared: dict) -> Group:
    """Runs side by side: params (those that differ first, highlighted and marked), final
    metrics, and the loss per step as sparklines on one scale and a table."""
    ids = [r["id"] for r in compared["runs"]]
    runs = grid("RUN", "EXPERIMENT", "STATE", "TAGS", "CREATED")
    for r in compared["runs"]:
        runs.add_row(r["id"], r["experiment"], state_text(r["state"]), fmt.text(r["tags"]), fmt.when(r["created_at"]))

    params = grid("PARAM", *ids, "DIFFERS")
    rows = sorted(compared["params"], key=lambda p: not p["differs"])
    for p in rows:
        style = "bold yellow" if p["differs"] else ""
        params.add_row(Text(p["param"], style=style or "bold"), *(Text(number(v), style=style) for v in p["values"]),
                       Text(DIFFERS if p["differs"] else "", style=style))
    differ = sum(p["differs"] for p in rows)

    finals = grid("FINAL METRIC", *ids)
    for m in compared["final_metrics"]:
        finals.add_row(Text(m["metric"], style="bold"), *(number(v) for v in m["values"]))

    parts = [runs, Text(), Text(f"{differ} of {len(rows)} params differ", style="bold"), params, Text(), finals,
             Text()]
    steps, losses = compared["steps"], compared["series"].get("loss", {})
    known = [v for series in losses.values() for v in series if v is not None]
    if not known:
        return Group(*parts, Text("No loss recorded yet.", style="dim"))
    low, high = min(known), max(known)
    parts.append(Text(f"LOSS PER STEP (steps {steps[0]}-{steps[-1]}; one scale, {number(low)} to {number(high)})",
                      style="bold"))
    curves = grid()
    for run_id in ids:
        curves.add_row(Text(run_id, style="bold"), Text(sparkline(losses.get(run_id, []), low, high), style="cyan"))
    table = grid("STEP", *ids)
    for i in spread(len(steps), STEP_ROWS):
        table.add_row(str(steps[i]), *(number(losses.get(run_id, [None] * len(steps))[i]) for run_id in ids))
    return Group(*parts, curves, Text(), table)


def evaluation_samples(samples: list[dict]) -> Table:
    """An evaluation's samples: input, answer (or error), each score, what the judge said."""
    names = list(dict.fromkeys(m for s in samples for m in s["scores"]))
    table = grid("#", "INPUT", "ANSWER", *(n.upper() for n in names), "JUDGE SAID")
    for s in samples:
        answer = Text(s["error"], style="red") if s["error"] else Text(s["answer"] or "")
        table.add_row(str(s["idx"]), s["input"], answer, *(number(s["scores"].get(n)) for n in names),
                      s["judge_output"] or "-")
    return table


def evaluation_comparison(report: dict) -> Group:
    """Evaluations side by side: their scores, then the samples whose score changed, most first."""
    ids = [r["id"] for r in report["runs"]]
    runs = grid("RUN", "MODEL", "STATE")
    for r in report["runs"]:
        runs.add_row(r["id"], versioned(r["model"], "name"), state_text(r["state"]))
    scores = grid("METRIC", *ids)
    for m in report["metrics"]:
        scores.add_row(Text(m["metric"], style="bold"), *(number(v) for v in m["values"]))
    summary = Text(f"{report['metric']} on {report['samples_compared']} samples, {ids[-1]} against {ids[0]}: "
                   f"{report['improved']} improved, {report['regressed']} regressed, {report['same']} the same",
                   style="bold")
    changed = grid("ROW", "INPUT", *ids)
    for c in report["changed"]:
        changed.add_row(str(c["row"]), c["input"], *(Text(f"{number(r['score'])}  {r['answer'] or ''}")
                                                      for r in c["runs"]))
    return Group(runs, Text(), scores, Text(), summary, changed if report["changed"] else Text("No sample changed."))
