"""The datasets view against the real gateway: upload a file from this machine, read a
version's quality and PII report, mask PII into a new version, diff two versions, split one
and delete versions after a confirmation; refusals of the API as notifications."""

from __future__ import annotations

import io

import httpx
import pytest
from rich.console import Console

from tests.gateway.test_dataset_registry import REVIEWS_V1 as V1, REVIEWS_V2 as V2
from tests.tui.conftest import cells, column, fill, notes, select_row, until
from tui.modals import ConfirmScreen, DetailScreen, FormScreen
from tui.views.datasets import DatasetsView, DatasetVersionsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]


def admin(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def register(stack, name: str, *texts: str) -> None:
    with admin(stack) as api:
        for n, text in enumerate(texts, 1):
            answer = api.post(f"/admin/datasets/{name}/upload", params={"filename": f"v{n}.csv"}, content=text.encode())
            assert answer.status_code == 201, answer.text


def versions(stack, name: str) -> list[dict] | None:
    with admin(stack) as api:
        answer = api.get(f"/admin/datasets/{name}")
    return None if answer.status_code == 404 else answer.json()["versions"]


def shown(pilot) -> str:
    """The text of the open detail screen."""
    screen = pilot.app.screen
    assert isinstance(screen, DetailScreen)
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(screen.body)
    return console.export_text()


def heading(pilot) -> str:
    return str(pilot.app.screen.query_one("#heading").render())


async def detail(pilot, what: str) -> str:
    await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), what)
    return shown(pilot)


async def confirm(pilot, answer: str) -> None:
    await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
    await pilot.press(answer)


async def test_upload_a_local_file_read_its_report_and_mask_its_pii(console, stack, unique, tmp_path):
    name = unique("console-ds")
    path = tmp_path / "reviews.csv"
    path.write_text(V1)
    async with console("datasets") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, DatasetsView), "the datasets")
        await pilot.press("u")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the upload form")
        await fill(pilot, {"name": name, "path": str(tmp_path / "absent.csv")})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("no such file on this machine" in n for n in notes(pilot)), "the form's check")
        await fill(pilot, {"path": str(path)})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: name in column(pilot, "name"), "the new dataset listed")
        row = next(r for r in cells(pilot) if r[0] == name)
        assert row[1:7] == ["1", "1", "6", "csv", "253 B", "8"]  # latest, versions, rows, format, size, PII found
        assert [(v["version"], v["rows"], v["source"]) for v in versions(stack, name)] == [(1, 6, "upload reviews.csv")]

        await select_row(pilot, name)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, DatasetVersionsView) and cells(pilot), "the versions")
        with admin(stack) as api:
            me = api.get("/auth/me").json()
        assert column(pilot, "by") == [me["name"]]  # who uploaded it, by the key's name
        await pilot.press("enter")
        report = await detail(pilot, "the version's report")
        assert "6 rows · csv · 253 B" in report and "duplicate rows: 0   empty rows: 0" in report
        assert "5 of 6 rows hold personal data" in report and "900101-1******" in report and "1234568" not in report
        assert "label" in report and "string" in report
        await pilot.press("escape")

        await pilot.press("u")  # the same content again: the registry refuses it
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the upload form")
        await fill(pilot, {"path": str(path)})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any(f"already registered as {name} version 1" in n for n in notes(pilot)),
                    "the API's refusal")
        assert isinstance(pilot.app.screen, FormScreen)
        await pilot.press("escape")

        await pilot.press("x")
        await confirm(pilot, "y")
        await until(pilot, lambda: "2" in column(pilot, "version"), "the masked version")
        masked = versions(stack, name)[1]
        assert masked["pii_found"] == 0 and masked["derivation"].startswith("masked from version 1: ")
        assert any(f"Registered {name} version 2" in n for n in notes(pilot))

        await select_row(pilot, "masked from version 1")
        await pilot.press("x")  # nothing left to mask: refused
        await confirm(pilot, "y")
        await until(pilot, lambda: any("has no PII to mask" in n for n in notes(pilot)), "the API's refusal")
        assert len(versions(stack, name)) == 2


async def test_diff_a_marked_version_with_another_or_through_the_form(console, stack, unique):
    name = unique("console-diff")
    register(stack, name, V1, V2)
    async with console(f"datasets {name}") as pilot:  # `:datasets NAME` opens its versions
        await until(pilot, lambda: isinstance(pilot.app.screen, DatasetVersionsView) and len(cells(pilot)) == 2,
                    "the versions")
        await select_row(pilot, "v1.csv")
        await pilot.press("space")
        assert "version 1 marked" in heading(pilot)
        await select_row(pilot, "v2.csv")
        await pilot.press("f")
        summary = await detail(pilot, "the diff")
        assert "version 1 → 2: 1 added, 1 removed, 1 changed, 4 unchanged" in summary
        assert "rows matched on column 'id'" in summary and "added (id), e.g.: 7" in summary
        await pilot.press("escape")

        await select_row(pilot, "v1.csv")
        await pilot.press("m")  # unmarked: f asks for the other version
        await select_row(pilot, "v2.csv")
        await pilot.press("f")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the diff form")
        assert pilot.app.screen.values() == {"a": "1", "b": "2", "key": ""}
        await fill(pilot, {"key": "label"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("key column 'label' is not unique" in n for n in notes(pilot)), "the refusal")
        await fill(pilot, {"a": "2", "b": "1", "key": "id"})
        await pilot.press("ctrl+s")
        summary = await detail(pilot, "the diff")
        assert "version 2 → 1: 1 added, 1 removed, 1 changed, 4 unchanged" in summary
        assert "added (id), e.g.: 4" in summary


async def test_split_then_delete_versions_after_a_confirmation(console, stack, unique):
    name = unique("console-split")
    register(stack, name, V1, V2)
    async with console(f"datasets {name}") as pilot:
        await until(pilot, lambda: isinstance(pilot.app.screen, DatasetVersionsView) and len(cells(pilot)) == 2,
                    "the versions")
        await select_row(pilot, "v1.csv")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the split form")
        await fill(pilot, {"ratios": "train=0.5,test=0.6", "seed": "3"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("split ratios must add up to 1" in n for n in notes(pilot)), "the refusal")
        await fill(pilot, {"ratios": "train=0.5,test=0.5"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any(n.startswith("Split ds_") for n in notes(pilot)), "the split")
        with admin(stack) as api:
            splits = api.get(f"/admin/datasets/{name}/versions/1").json()["splits"]
        assert [(s["seed"], {p: v["rows"] for p, v in s["parts"].items()}) for s in splits] == [
            (3, {"train": 3, "test": 3})]
        await pilot.press("enter")
        report = await detail(pilot, "the report with its split")
        assert splits[0]["id"] in report and "train 3 rows, test 3 rows" in report
        await pilot.press("escape")

        await select_row(pilot, "v2.csv")
        await pilot.press("ctrl+d")
        await confirm(pilot, "n")  # declined: nothing happens
        await pilot.pause(0.3)
        assert len(versions(stack, name)) == 2
        await pilot.press("ctrl+d")
        await confirm(pilot, "y")
        await until(pilot, lambda: column(pilot, "version") == ["1"], "version 2 gone")
        assert [v["version"] for v in versions(stack, name)] == [1]

        await pilot.press("ctrl+d")
        question = await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen) and pilot.app.screen.question,
                               "the confirmation")
        assert "It is the only version: the dataset goes with it." in question
        await pilot.press("y")
        await until(pilot, lambda: "no versions left" in heading(pilot), "the dataset gone")
        assert versions(stack, name) is None
        assert not [n for n in notes(pilot) if "not loaded" in n or "no registered dataset" in n]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(pilot.app.screen, DatasetVersionsView), "the datasets")
        await pilot.pause(0.5)
        assert name not in column(pilot, "name")
