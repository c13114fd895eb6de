"""How the CLI shows things: tables, times and sizes."""

from __future__ import annotations

import contextlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.cells import cell_len


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def money(amount: float) -> str:
    """Two decimals, four below one unit of the currency (0.0123)."""
    return f"{amount:.2f}" if amount >= 1 or amount == 0 else f"{amount:.4f}"


def percent(part: float, whole: float) -> str:
    """Rounded down, so 100% means all of it; <1% for a little."""
    share = part / whole * 100
    return "<1%" if 0 < share < 1 else f"{math.floor(share)}%"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(rows: list[dict], columns: list[str], headings: list[str] | None = None) -> str:
    """Rows as aligned columns under their names in capitals (or `headings`, as given)."""
    if not rows:
        return "(none)"
    headings = headings or [c.upper() for c in columns]
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(cell_len(h), *(cell_len(row[i]) for row in cells)) for i, h in enumerate(headings)]
    lines = ["  ".join(h + " " * (w - cell_len(h)) for h, w in zip(headings, widths))]
    lines += ["  ".join(v + " " * (w - cell_len(v)) for v, w in zip(row, widths)) for row in cells]  # Hangul: 2 cells
    return "\n".join(line.rstrip() for line in lines)


def emit(data, as_json: bool, render) -> None:
    """JSON with --json, else what `render(data)` makes of it."""
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


def write_output(content: bytes, output: Path | None) -> None:
    """To standard output, or to the file `output`: complete or not at all."""
    if output is None:
        click.get_binary_stream("stdout").write(content)
        return
    partial = output.with_name(output.name + ".partial")
    try:
        partial.write_bytes(content)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    os.replace(partial, output)
    click.echo(f"written to {output}", err=True)
