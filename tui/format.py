"""How the console shows values: ages (k9s style), sizes, latencies, rates and money."""

from __future__ import annotations

import time

from appliance.cli_format import size, when

__all__ = ["age", "duration", "seconds", "rate", "percent", "money", "size", "when", "text"]


def age(ts: float | None, now: float | None = None) -> str:
    """How long ago: 42s, 5m, 3h, 12d."""
    if ts is None:
        return "-"
    return duration((time.time() if now is None else now) - ts)


def duration(elapsed: float) -> str:
    """A length of time, k9s style: 42s, 5m, 3h, 12d."""
    elapsed = max(0, elapsed)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if elapsed >= length:
            return f"{int(elapsed // length)}{unit}"
    return f"{int(elapsed)}s"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def money(amount: float | None, currency: str = "") -> str:
    return "-" if amount is None else f"{amount:,.4f} {currency}".rstrip()


def text(value) -> str:
    """A table cell: '-' for nothing, lists joined, everything else as str."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
