"""Why a child process ended, in words a person can act on."""

from __future__ import annotations

import signal

# What a signal most often means for a process the appliance runs; {program} names it.
SIGNAL_MEANINGS = {
    signal.SIGILL: "illegal instruction: {program} uses CPU instructions this machine cannot run",
    signal.SIGSEGV: "segmentation fault: {program} crashed in its native code (a bug, or a corrupt model file)",
    signal.SIGBUS: "bus error: memory it had mapped became unreadable (the model file was truncated or "
                   "replaced while in use, or shared memory ran out)",
    signal.SIGABRT: "aborted: {program} stopped itself on a failed internal check (its log says which)",
    signal.SIGKILL: "killed: most likely by the kernel's out-of-memory killer (see `dmesg`), or by kill -9",
    signal.SIGFPE: "arithmetic fault (such as an integer division by zero) in {program}'s native code",
    signal.SIGTERM: "terminated by something other than the appliance",
}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int, program: str = "the program") -> str:
    """e.g. "killed by SIGILL (illegal instruction: ...)" or "exited with code 1"."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    number = -returncode
    meaning = SIGNAL_MEANINGS.get(number)
    meaning = meaning.format(program=program) if meaning else signal.strsignal(number) or "no description"
    return f"killed by {signal_name(number)} ({meaning})"
