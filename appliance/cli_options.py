"""The command line's shared options, each defined once: the commands differ only in what
their help says the option is for."""

from __future__ import annotations

import click

from appliance.config import DEFAULT_PROFILE
from appliance.home import HOME_ENV, RUNTIME_ENV

PROFILE_ENV = "APPLIANCE_PROFILE"
URL_ENV = "APPLIANCE_URL"
KEY_ENV = "APPLIANCE_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"  # where no --url, APPLIANCE_URL or running gateway says otherwise


def home_option(help: str = "State directory (database, keys, logs). Default: ./var"):
    return click.option("--home", type=click.Path(file_okay=False), envvar=HOME_ENV, show_envvar=True, help=help)


def json_option(help: str = "Print JSON instead of a table."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def profile_option(default: str = DEFAULT_PROFILE, *, envvar: str | None = None, note: str = ""):
    """--profile: a built-in name or a YAML file, and `auto` where that is the default."""
    if default == "auto":
        help = "`auto` (chosen from the hardware), a built-in profile name or a profile YAML file."
    else:
        help = "Built-in profile name or path to a profile YAML file."
    return click.option("--profile", "profile_name", default=default, envvar=envvar, show_envvar=envvar is not None,
                        show_default=True, help=help + note)


runtime_option = click.option(
    "--runtime", "runtime_file", type=click.Path(dir_okay=False, exists=True), required=True,
    envvar=RUNTIME_ENV, show_envvar=True,
    help="The gateway's runtime file (gateway.json), which names the home and the object store.",
)


def client_options(function):
    """--url, --key and --home for the commands that are clients of the admin API."""
    function = home_option("Local home: the gateway it runs (`appliance up`, a bare-metal install) and its admin.key "
                           "are used when --url or --key is not given. Default: ./var")(function)
    function = click.option("--key", envvar=KEY_ENV, show_envvar=True,
                            help="An API key or session token. Default: the session of `appliance login`, else the home's admin.key.")(function)
    function = click.option("--url", envvar=URL_ENV, show_envvar=True,
                            help=f"The gateway's base URL. Default: the gateway serving the home, else {DEFAULT_URL}.")(function)
    return function


def name_and_version(value: str, option: str) -> tuple[str, int | None]:
    """NAME or NAME:VERSION, as options that name a registered model or dataset take them."""
    name, _, version = value.partition(":")
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise click.BadParameter(f"{value!r}: the version after ':' is a number from 1", param_hint=option)
    return name, int(version)


class MappingFile(click.File):
    """A YAML (or JSON) file holding one mapping, e.g. a prompt template's or a tool's fields."""

    name = "file"

    def __init__(self, fields: str):
        super().__init__()
        self.fields = fields  # what the mapping holds, for the error

    def convert(self, value, param, ctx) -> dict:
        import yaml

        file = super().convert(value, param, ctx)
        try:
            body = yaml.safe_load(file)
        except yaml.YAMLError as exc:
            self.fail(f"not YAML or JSON: {exc}", param, ctx)
        if not isinstance(body, dict):
            self.fail(f"a mapping of {self.fields}", param, ctx)
        return body
