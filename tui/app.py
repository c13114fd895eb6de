"""The admin console: a Textual app over the admin API alone (no database, no files), so it
works the same on the server and from a laptop on the LAN; the gateway authorises and
audits every change it makes.

Screens stack k9s-style: the dashboard at the bottom, `:name` jumps to a view on top of it,
enter opens a row's detail on top of that, esc goes back one."""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive

from appliance.admin_client import AdminApiError
from tui.client import Api
from tui.views import COMMANDS, Command

STATUS_POLL_S = 5.0


class ConsoleApp(App):
    CSS_PATH = Path(__file__).with_name("console.tcss")
    TITLE = "appliance console"
    ENABLE_COMMAND_PALETTE = False  # `:` is the palette, as in k9s
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    status: reactive[str] = reactive("connecting")

    def __init__(self, api: Api, *, start: str = "dashboard", refresh_s: float = 2.0) -> None:
        super().__init__()
        self.api, self.start, self.refresh_s = api, start, refresh_s
        self.who = "?"

    async def on_mount(self) -> None:
        try:
            me = await self.api.request("GET", "/auth/me")
            self.who = f"{me.get('name') or me.get('key_id')} ({me['role']})"
        except AdminApiError as exc:
            self.who = "not signed in"
            self.notify(str(exc), title="Who am I", severity="error", timeout=10)
        await self.poll_status()
        self.set_interval(STATUS_POLL_S, self.poll_status)
        self.push_screen(Command.find("dashboard").view())
        self.run_command(self.start)

    async def poll_status(self) -> None:
        try:
            self.status = (await self.api.readiness())["status"]
        except AdminApiError:
            self.status = "unreachable"

    async def on_unmount(self) -> None:
        await self.api.close()

    @staticmethod
    def command_names() -> list[str]:
        return [command.name for command in COMMANDS]

    @staticmethod
    def command_help() -> list[tuple[str, str]]:
        return [(" :".join((command.name, *command.aliases)), command.description) for command in COMMANDS]

    def run_command(self, text: str) -> None:
        """`:name [argument]`: show that view over the dashboard; `:q` quits."""
        name, _, argument = text.strip().lstrip(":").partition(" ")
        if name in ("q", "quit"):
            self.exit()
            return
        command = Command.find(name)
        if command is None:
            self.notify(f"no view {name!r}: ? lists them", severity="error")
            return
        while len(self.screen_stack) > 2:  # the default screen, then the dashboard
            self.pop_screen()
        if command.name != "dashboard":
            self.push_screen(command.view(argument.strip()) if argument.strip() else command.view())

    def back(self) -> None:
        if len(self.screen_stack) > 2:
            self.pop_screen()
