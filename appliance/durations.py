"""Human durations on the command line: 90s, 15m, 24h, 7d; and moments: a duration ago, or an ISO date."""

from __future__ import annotations

from datetime import datetime, timezone

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


def parse_moment(text: str, now: float) -> float:
    """A moment as a duration before `now` ('24h': a day ago) or an ISO 8601 date or time
    ('2026-11-01', '2026-11-01T09:00+09:00'; UTC when it names no offset) -> Unix seconds;
    ValueError naming the text otherwise."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use a duration before now (30m, 24h, 7d) or an ISO 8601 date or "
                         "time (2026-11-01, 2026-11-01T09:00:00+09:00)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
