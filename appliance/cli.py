"""The `appliance` command line."""

from __future__ import annotations

import json
import sys

import click

from appliance import __version__
from appliance.alerts_cli import alerts
from appliance.cli_format import table
from appliance.cli_options import PROFILE_ENV, home_option, json_option, profile_option, runtime_option
from appliance.config import builtin_profiles, load_profile, profile_schema
from appliance.errors import ApplianceError
from appliance.home import resolve_home
from appliance.keys_cli import keys
from appliance.users_cli import teams, users
from appliance.login_cli import login_command, logout_command
from appliance.logs_cli import logs
from appliance.backup_cli import backup, restore_command
from appliance.dataset_cli import datasets
from appliance.eval_cli import eval_group
from appliance.finetune_cli import finetune
from appliance.prompts_cli import prompts
from appliance.tools_cli import tools_group
from appliance.jobs_cli import jobs
from appliance.experiments_cli import experiments, runs
from appliance.objects_cli import objects
from appliance.audit_cli import audit
from appliance.gate_cli import models_gate
from appliance.registry_cli import REGISTRY_COMMANDS
from appliance.routes_cli import routes
from appliance.usage_cli import usage
from installer.bundle_cli import bundle
from installer.render_cli import render
from appliance.planning_cli import plan_command, probe_command
from installer.install import install_command, uninstall_command
from installer.upgrade import upgrade_command
from tui.command import console_command

PORT_ENV = "APPLIANCE_PORT"
served_profile_option = profile_option(envvar=PROFILE_ENV)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def cli() -> None:
    """On-prem LLM appliance: an OpenAI-compatible, governed and metered endpoint on your LAN."""


@cli.command()
@served_profile_option
@home_option()
@click.option("--host", default=None, help="Address the gateway listens on. Default: the profile's (0.0.0.0).")
@click.option("--port", type=click.IntRange(1, 65535), envvar=PORT_ENV, show_envvar=True, default=None,
              help="Port of the gateway. Default: 8080 (the profile's gateway.port).")
def up(profile_name: str, home: str | None, host: str | None, port: int | None) -> None:
    """Run the whole stack in the foreground until Ctrl-C or SIGTERM.

    Plans the profile for this machine (as `appliance plan` shows), starts the
    engines, waits until each is healthy, then serves the OpenAI-compatible API. On first start an admin key is created and printed once.

    Runs on this machine, not through the admin API: it starts the gateway that serves
    that API. While it runs, the home records the gateway's URL, so the CLI on this
    machine finds it whatever --port says.
    """
    from appliance.planning.engine_builds import check_engine_builds
    from appliance.planning.planner import make_plan
    from appliance.planning.probe import probe
    from services.supervisor import Supervisor

    profile = load_profile(profile_name)
    home_dir = resolve_home(home)
    machine = probe(home_dir)
    plan = make_plan(profile, [machine])  # refuses a model that does not fit, with the numbers
    check_engine_builds(plan, machine)
    supervisor = Supervisor(
        profile,
        plan,
        home_dir,
        host or profile.gateway.host,
        port or profile.gateway.port,
        say=lambda line: click.echo(line),
    )
    sys.exit(supervisor.run())


def _read_runtime(runtime_file: str):
    from pathlib import Path

    import msgspec

    from services.gateway.runtime import read_runtime

    try:
        return read_runtime(Path(runtime_file))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise click.BadParameter(f"{runtime_file} is not a gateway runtime file: {exc}", param_hint="--runtime") from None


@cli.command("controller")
@runtime_option
@click.option("--kubernetes", "cluster_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Run on k3s: make engine Deployments through the Kubernetes API, for the cluster this "
                   "file describes (the rendered `cluster` ConfigMap's cluster.json).")
def controller(runtime_file: str, cluster_file: str | None) -> None:
    """Run the deployment controller on its own until SIGTERM.

    It starts the engines of model versions deployed through /admin and stops those
    undeployed. `appliance up` runs it in-process; a bare-metal install runs it as
    appliance-controller.service; on k3s it runs in the control pod with --kubernetes.
    """
    from pathlib import Path

    runtime = _read_runtime(runtime_file)
    say = lambda line: click.echo(line)  # noqa: E731
    if cluster_file:
        from services.engines.kube_controller import run_kube_controller

        run_kube_controller(Path(runtime.home), runtime.storage, Path(cluster_file), say)
    else:
        from services.engines.deployments import run_controller

        run_controller(Path(runtime.home), runtime.storage, say)


def _host_port(ctx, param, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8091")
    return host, int(port)


@cli.command("worker")
@runtime_option
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True, help="Jobs run at once.")
@click.option("--health", metavar="HOST:PORT", callback=_host_port,
              help="Answer GET /healthz here (200 while the worker threads are alive).")
def worker(runtime_file: str, threads: int, health: tuple[str, int] | None) -> None:
    """Run the job worker (Huey's consumer) until SIGTERM.

    It runs the jobs queued through /admin/jobs (imports and fine-tuning); SIGTERM
    lets running jobs finish first, for up to 30 s. `appliance up` runs it as a child;
    a bare-metal install runs it as appliance-worker.service.
    """
    from services.worker.main import run_worker

    run_worker(_read_runtime(runtime_file), threads=threads, health=health, say=lambda line: click.echo(line))


@cli.command("gpu-sampler")
@runtime_option
@click.option("--interval", type=click.FloatRange(0.1, 60), default=2.0, show_default=True,
              help="Seconds between two readings.")
def gpu_sampler(runtime_file: str, interval: float) -> None:
    """Read the GPUs (NVML) every few seconds for a gateway without the devices, until SIGTERM.

    It writes their memory, utilisation and temperature to the file that the runtime's
    gpu_readings names, which GET /admin/system reads. A bare-metal install runs it as
    appliance-gpu-sampler.service, the only unit besides the engines and the controller that
    may open the NVIDIA devices; under `appliance up` the gateway reads NVML itself.
    """
    from pathlib import Path

    from services.gpus import run_sampler_until_signalled

    runtime = _read_runtime(runtime_file)
    if not runtime.gpu_readings:
        raise click.BadParameter(f"{runtime_file} names no GPU readings file (gpu_readings): its gateway reads "
                                 "the GPUs itself", param_hint="--runtime")
    run_sampler_until_signalled(Path(runtime.gpu_readings), say=lambda line: click.echo(line), interval_s=interval)


@cli.group()
def models() -> None:
    """Models: those a profile serves, the model registry and deployments."""


@models.command("list")
@served_profile_option
@json_option()
def models_list(profile_name: str, as_json: bool) -> None:
    """List the models a profile serves, with engine and replicas."""
    profile = load_profile(profile_name, check_files=False)
    rows = [
        {"name": m.name, "engine": m.engine, "replicas": m.replicas if m.engine != "remote" else 1,
         "source": m.base_url or m.path, "embeddings": "yes" if m.embeddings else "no"}
        for m in profile.models
    ]
    click.echo(json.dumps(rows, indent=2) if as_json else table(rows, ["name", "engine", "replicas", "embeddings", "source"]))


@cli.group()
def profiles() -> None:
    """Built-in profiles, validation and the profile schema."""


@profiles.command("list")
def profiles_list() -> None:
    """List the built-in profiles."""
    for name in builtin_profiles():
        click.echo(f"{name}\t{load_profile(name, check_files=False).description}")


@profiles.command("check")
@click.argument("profile")
def profiles_check(profile: str) -> None:
    """Validate PROFILE (a name or a YAML file), model files included."""
    loaded = load_profile(profile)
    click.echo(f"{profile}: valid ({len(loaded.models)} model(s))")


@profiles.command("schema")
def profiles_schema() -> None:
    """Print the JSON Schema that profiles are validated against."""
    click.echo(json.dumps(profile_schema(), indent=2))


# Clients of the admin API.
cli.add_command(keys, "keys")
cli.add_command(users, "users")
cli.add_command(teams, "teams")
cli.add_command(login_command, "login")
cli.add_command(logout_command, "logout")
for command in REGISTRY_COMMANDS:
    models.add_command(command)
models.add_command(models_gate)
cli.add_command(routes, "routes")
cli.add_command(alerts, "alerts")
cli.add_command(logs, "logs")
cli.add_command(audit, "audit")
cli.add_command(datasets, "datasets")
cli.add_command(jobs, "jobs")
cli.add_command(finetune, "finetune")
cli.add_command(eval_group, "eval")
cli.add_command(prompts, "prompts")
cli.add_command(tools_group, "tools")
cli.add_command(experiments, "experiments")
cli.add_command(runs, "runs")
cli.add_command(usage, "usage")
cli.add_command(backup, "backup")
cli.add_command(restore_command, "restore")
cli.add_command(objects, "objects")
cli.add_command(console_command, "console")

# Planning commands (core), then the installer's: each lives with its module.
cli.add_command(probe_command, "probe")
cli.add_command(plan_command, "plan")
cli.add_command(render, "render")
cli.add_command(bundle, "bundle")
cli.add_command(install_command, "install")
cli.add_command(uninstall_command, "uninstall")
cli.add_command(upgrade_command, "upgrade")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
