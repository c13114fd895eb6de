"""Human durations on the command line: 90s, 15m, 24h, 7d."""

from __future__ import annotations

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d' -> seconds; ValueError naming the text otherwise."""
    text = text.strip().lower()
    number, unit = text[:-1], text[-1:]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number and a unit (s, m, h, d), like 30m, 24h or 7d")
    return value * _UNITS[unit]
