"""The models and deployments views against the real gateway and its S3 store: upload files
from this machine as versions, read a version's card, edit it, compare two versions, delete
versions after a confirmation, deploy a version (a real engine starts) and undeploy it; and
the API's refusals as notifications."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from rich.console import Console

from tests.conftest import DEFAULT_MODEL, default_gguf
from tests.tui.conftest import cells, column, fill, loaded, make_key, notes, select_row, until
from tui import format as fmt
from tui.modals import ConfirmScreen, DetailScreen, FormScreen
from tui.views.models import DeploymentsView, VersionsView

pytestmark = [pytest.mark.stack, pytest.mark.anyio]

DEPLOY_S = 180.0  # an engine's start on a busy machine


def tiny_gguf(path: Path, name: str) -> Path:
    """A small real GGUF file (one tensor) whose card names it `name`."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def api(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.root, headers={"Authorization": f"Bearer {key or stack.admin_key}"}, timeout=120)


def register(stack, name: str, *files: Path) -> None:
    for file in files:
        api(stack).post(f"/admin/models/{name}/upload", params={"filename": file.name},
                        content=file.read_bytes()).raise_for_status()


def versions(stack, name: str) -> list[dict]:
    answer = api(stack).get(f"/admin/models/{name}")
    return [] if answer.status_code == 404 else answer.raise_for_status().json()["versions"]


def page(pilot) -> str:
    """The open detail page as text."""
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(pilot.app.screen.body)
    return console.export_text()


async def form(pilot, key: str) -> FormScreen:
    await pilot.press(key)
    return await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen) and pilot.app.screen, f"the {key} form")


async def confirm(pilot, answer: str) -> None:
    await pilot.press("ctrl+d")
    await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the confirmation")
    await pilot.press(answer)


async def open_versions(pilot, name: str) -> None:
    await select_row(pilot, name)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(pilot.app.screen, VersionsView) and loaded(pilot), f"{name}'s versions")


async def test_upload_from_this_machine_then_read_the_card(console, stack, unique, tmp_path):
    name = unique("console-model")
    first, second = tiny_gguf(tmp_path / "first.gguf", "tiny first"), tiny_gguf(tmp_path / "second.gguf", "tiny second")
    async with console("models") as pilot:
        await until(pilot, lambda: loaded(pilot), "the models")
        await form(pilot, "u")
        await fill(pilot, {"name": name, "path": str(tmp_path / "missing.gguf")})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("no such file on this machine" in n for n in notes(pilot)), "the form's check")
        await fill(pilot, {"path": str(first)})
        await pilot.press("ctrl+s")
        digest = hashlib.sha256(first.read_bytes()).hexdigest()
        await until(pilot, lambda: any(digest in n for n in notes(pilot)), "the upload's size and sha256")
        assert [(v["version"], v["sha256"], v["source"]) for v in versions(stack, name)] == [(1, digest, "upload first.gguf")]
        await until(pilot, lambda: name in column(pilot, "name"), "the new model listed")
        row = next(r for r in cells(pilot) if r[0] == name)
        assert row[1] == "v1" and fmt.size(first.stat().st_size) in row and "llama" in row[4]

        # The same content again: the API's refusal.
        await form(pilot, "u")
        await fill(pilot, {"name": name, "path": str(first)})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("already registered" in n and "HTTP 409" in n for n in notes(pilot)),
                    "the conflict")

        # From the model's versions, `u` uploads to that model.
        await open_versions(pilot, name)
        screen = await form(pilot, "u")
        assert screen.query_one("#field-name").value == name
        await fill(pilot, {"path": str(second)})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: column(pilot, "version") == ["v1", "v2"], "version 2 listed")
        assert [v["card"]["name"] for v in versions(stack, name)] == ["tiny first", "tiny second"]

        await select_row(pilot, "v1")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the version's page")
        text = page(pilot)
        assert "tiny first" in text and digest in text and "first.gguf" in text and "context_length" in text
        await pilot.press("escape")
        await pilot.press("escape")
        await until(pilot, lambda: "v2" in next((r[1] for r in cells(pilot) if r[0] == name), ""), "v2 the latest")


async def test_edit_a_card_and_compare_two_versions(console, stack, unique, tmp_path):
    name = unique("console-card")
    register(stack, name, tiny_gguf(tmp_path / "a.gguf", "tiny a"), tiny_gguf(tmp_path / "b.gguf", "tiny b"))
    async with console(f"models {name}") as pilot:  # the view opens filtered
        await until(pilot, lambda: column(pilot, "name") == [name], "the model alone")
        await open_versions(pilot, name)

        await select_row(pilot, "v2")
        await form(pilot, "e")
        await fill(pilot, {"description": "the second try", "tags": "chat, tiny"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("Card of" in n for n in notes(pilot)), "the card saved")
        card = versions(stack, name)[1]
        assert card["card"]["description"] == "the second try" and card["card"]["tags"] == ["chat", "tiny"]
        assert card["edited_fields"] == ["description", "tags"]
        await until(pilot, lambda: "description, tags" in next((r for r in cells(pilot) if "v2" in r), []), "EDITED")
        await form(pilot, "e")  # emptied: the edit is dropped
        await fill(pilot, {"description": ""})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: versions(stack, name)[1]["edited_fields"] == ["tags"], "the description's edit gone")

        # Mark v1 (space), then c on v2: side by side, the differences first.
        await select_row(pilot, "v1")
        await pilot.press("space")
        await select_row(pilot, "v2")
        await pilot.press("c")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the comparison")
        lines = page(pilot).splitlines()
        assert any("VERSION 1" in line and "VERSION 2" in line for line in lines)
        differing = next(line for line in lines if line.strip().startswith("name"))
        assert "tiny a" in differing and "tiny b" in differing
        assert any("fields differ" in line for line in lines)
        await pilot.press("escape")

        # Without a mark, c asks for the other version: a missing one is the API's 404.
        screen = await form(pilot, "c")
        assert screen.query_one("#field-version").value == "1"
        await fill(pilot, {"version": "9"})
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("has no version 9" in n for n in notes(pilot)), "the refusal")


async def test_delete_versions_after_a_confirmation(console, stack, unique, tmp_path):
    name = unique("console-delete")
    register(stack, name, tiny_gguf(tmp_path / "a.gguf", "a"), tiny_gguf(tmp_path / "b.gguf", "b"))
    async with console("models") as pilot:
        await until(pilot, lambda: name in column(pilot, "name"), "the model")
        await select_row(pilot, name)
        await pilot.press("ctrl+d")  # a model goes with its last version, from its versions view
        await until(pilot, lambda: any("delete its versions there" in n for n in notes(pilot)), "the hint")
        await open_versions(pilot, name)
        await select_row(pilot, "v1")
        await confirm(pilot, "n")
        await pilot.pause(0.3)
        assert [v["version"] for v in versions(stack, name)] == [1, 2]
        await confirm(pilot, "y")
        await until(pilot, lambda: column(pilot, "version") == ["v2"], "v1 gone from the list")
        assert [v["version"] for v in versions(stack, name)] == [2]
        await confirm(pilot, "y")
        await until(pilot, lambda: column(pilot, "version") == [], "no version left")
        assert api(stack).get(f"/admin/models/{name}").status_code == 404
        assert any(f"{name} version 2 deleted" in n for n in notes(pilot))
        await pilot.press("escape")
        await until(pilot, lambda: name not in column(pilot, "name"), "the model gone from the registry")


async def test_deploy_then_undeploy(console, stack, unique):
    name, served = unique("console-deploy"), unique("console-served")
    api(stack).post(f"/admin/models/{name}/versions", json={"path": str(default_gguf())}).raise_for_status()
    try:
        async with console(f"models {name}") as pilot:
            await open_versions(pilot, name)
            screen = await form(pilot, "d")
            assert screen.query_one("#field-name").value == name
            await fill(pilot, {"name": DEFAULT_MODEL, "context_length": "512"})  # the profile's own model
            await pilot.press("ctrl+s")
            await until(pilot, lambda: any("already served by the profile" in n for n in notes(pilot)), "the refusal")
            assert isinstance(pilot.app.screen, FormScreen)
            await fill(pilot, {"name": served})
            await pilot.press("ctrl+s")
            await until(pilot, lambda: any(f"as {served}" in n for n in notes(pilot)), "the deployment asked for")
            deployment = api(stack).get(f"/admin/deployments/{served}").json()
            assert deployment["model"] == name and deployment["version"] == 1 and deployment["context_length"] == 512
            await until(pilot, lambda: served in " ".join(column(pilot, "deployed_as")), "DEPLOYED AS")

            # A deployed version cannot be deleted: the API says so.
            await confirm(pilot, "y")
            await until(pilot, lambda: any("undeploy it first" in n for n in notes(pilot)), "the refusal")

            deadline = time.monotonic() + DEPLOY_S
            while served not in [m["id"] for m in api(stack).get("/v1/models").json()["data"]]:
                state = api(stack).get(f"/admin/deployments/{served}").json()
                assert state["state"] != "failed" and time.monotonic() < deadline, state
                await pilot.pause(0.5)

        viewer = make_key(stack, unique("console-viewer"), role="viewer")["key"]
        async with console("deployments", key=viewer) as pilot:
            await select_row(pilot, served)
            await confirm(pilot, "y")
            await until(pilot, lambda: any("HTTP 403" in n for n in notes(pilot)), "the viewer refused")

        async with console("deployments") as pilot:
            await until(pilot, lambda: isinstance(pilot.app.screen, DeploymentsView), "the deployments")
            await until(pilot, lambda: "running" in next((r for r in cells(pilot) if r[0] == served), []), "running")
            await select_row(pilot, served)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(pilot.app.screen, DetailScreen), "the deployment's page")
            assert "base_url" in page(pilot) and "llamacpp" in page(pilot)
            await pilot.press("escape")
            await confirm(pilot, "y")
            await until(pilot, lambda: any(f"Undeploying {served}" in n for n in notes(pilot)), "the undeploy")
            await until(pilot, lambda: served not in column(pilot, "name"), "the deployment gone", timeout=60)
        assert api(stack).get(f"/admin/deployments/{served}").status_code == 404
        assert served not in [m["id"] for m in api(stack).get("/v1/models").json()["data"]]
    finally:
        client = api(stack)
        if client.get(f"/admin/deployments/{served}").status_code == 200:
            client.delete(f"/admin/deployments/{served}")
        deadline = time.monotonic() + 60
        while client.delete(f"/admin/models/{name}/versions/1").status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.5)
