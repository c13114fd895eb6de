"""Running a tool call (appliance/tools.py): a command in bubblewrap's sandbox, or a tool of
an MCP server. A call's failure (a refused argument, a crash, a timeout, a server that does
not answer) is its result, said in words the model and the audit can read; it never raises."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import time
from dataclasses import dataclass

import jsonschema

from appliance.tools import SANDBOX, Command, Mcp, NewTool

STDERR_TAIL = 2000  # characters of a failed command's stderr in its result
PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Outcome:
    ok: bool
    text: str  # what the model is told
    seconds: float


SYSTEM_FOLDERS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
HIDDEN_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")


def sandbox_argv(command: Command) -> list[str]:
    """bubblewrap: the system's folders, the program's and `read_paths`, all read-only (the
    password hashes hidden), a private /tmp, /dev and /proc, every namespace its own (the
    network too, unless allowed), no environment but PATH and HOME."""
    folders = dict.fromkeys([*SYSTEM_FOLDERS, os.path.dirname(command.argv[0]), *command.read_paths])
    binds = [arg for folder in folders if os.path.exists(folder) for arg in ("--ro-bind", folder, folder)]
    hidden = [arg for file in HIDDEN_FILES if os.path.exists(file) for arg in ("--ro-bind", "/dev/null", file)]
    return [SANDBOX, *binds, *hidden, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-all", *(["--share-net"] if command.network else []), "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/tmp", "--chdir", "/tmp",
            "--", *command.argv]


def _limits(command: Command):
    def apply() -> None:  # in the child, before bubblewrap starts: inherited by the command
        memory = command.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (command.cpu_s, command.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


async def run_command(command: Command, arguments: dict) -> Outcome:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *sandbox_argv(command), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_limits(command), start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(arguments).encode()), command.timeout_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return Outcome(False, f"the tool ran out of time ({command.timeout_s:g} s) and was stopped",
                       time.monotonic() - started)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    text = out[:command.max_output_bytes].decode("utf-8", "replace")
    if proc.returncode != 0:
        # bubblewrap exits with 128 + the signal that killed the command
        killed = -proc.returncode if proc.returncode < 0 else proc.returncode - 128 if proc.returncode > 128 else 0
        why = f"killed by {signal.Signals(killed).name}" if killed in signal.valid_signals() else \
            f"exit status {proc.returncode}"
        if killed == signal.SIGXCPU:
            why += f": its CPU time limit, {command.cpu_s} s"
        tail = err.decode("utf-8", "replace")[-STDERR_TAIL:].strip()
        return Outcome(False, f"the tool failed ({why})" + (f": {tail}" if tail else ""), seconds)
    return Outcome(True, text, seconds)


async def call_mcp(spec: Mcp, name: str, arguments: dict) -> Outcome:
    from mcp import Client

    started = time.monotonic()
    try:
        async with asyncio.timeout(spec.timeout_s):
            async with Client(spec.url, read_timeout_seconds=spec.timeout_s) as client:
                result = await client.call_tool(spec.tool or name, arguments)
    except TimeoutError:
        return Outcome(False, f"the MCP server at {spec.url} did not answer within {spec.timeout_s:g} s",
                       time.monotonic() - started)
    except Exception as exc:  # unreachable, refused, a protocol error: the model is told, the gateway goes on
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # anyio's task groups wrap the cause
            exc = exc.exceptions[0]
        return Outcome(False, f"the MCP server at {spec.url} failed: {type(exc).__name__}: {exc}",
                       time.monotonic() - started)
    texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    if not texts and getattr(result, "structured_content", None) is not None:
        texts = [json.dumps(result.structured_content)]
    return Outcome(not result.is_error, "\n".join(texts), time.monotonic() - started)


async def run(name: str, tool: NewTool, arguments) -> Outcome:
    """The call, once its arguments fit the tool's parameters (else what does not fit is the result)."""
    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as exc:
        return Outcome(False, f"the arguments do not fit the tool's parameters: {exc.message}", 0.0)
    if tool.command is not None:
        return await run_command(tool.command, arguments)
    return await call_mcp(tool.mcp, name, arguments)
