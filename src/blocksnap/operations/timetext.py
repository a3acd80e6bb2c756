"""The policy's words for time: durations, times of day, weekdays, date ranges.

Durations are `30s`, `15m`, `1h`, `7d`, `2w` or sums like `1h30m` (minutes are
`m` here; retention's `--keep-within` keeps its own months-`m`). Each parser
raises ValueError with the phrase a `file:line:` message goes on with.
"""
from __future__ import annotations

import datetime
import re

from .model import DateRange, TimeRange

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LONG_DAYS = {d: i for i, d in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday",
                                          "saturday", "sunday"))}


def duration(text: object) -> float:
    """'15m' -> 900.0; a bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 15m, 1h, 7d, 2w")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"invalid duration {text!r}: must be more than 0")
        return float(text)
    s = str(text).strip().lower()
    parts = _PART.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 15m, 1h, 7d, 2w or 1h30m")
    value = sum(float(n) * _UNITS[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than 0")
    return value


def format_duration(seconds: float | None) -> str:
    """900 -> '15m', 5400 -> '1h30m'; for tables and messages."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    out = ""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            out += f"{s // n}{unit}"
            s %= n
    return out


def time_of_day(text: object) -> int:
    """'22:00' -> 1320 (minutes after midnight); '24:00' is the end of a day."""
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", str(text).strip())
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or (int(m.group(1)) == 24 and int(m.group(2))):
        raise ValueError(f"invalid time of day {text!r}: use HH:MM, 00:00 to 24:00")
    return int(m.group(1)) * 60 + int(m.group(2))


def time_range(text: object) -> TimeRange:
    """'22:00-06:00' (crossing midnight) or '01:00-01:30'."""
    parts = str(text).split("-")
    if len(parts) != 2:
        raise ValueError(f"invalid time range {text!r}: use HH:MM-HH:MM, e.g. 22:00-06:00")
    start, end = time_of_day(parts[0]), time_of_day(parts[1])
    if start == end:
        raise ValueError(f"invalid time range {text!r}: it starts where it ends (write 00:00-24:00 for all day)")
    return TimeRange(start % 1440, end if end == 1440 else end % 1440)


def weekday(text: object) -> int:
    s = str(text).strip().lower()
    if s in DAYS:
        return DAYS.index(s)
    if s in _LONG_DAYS:
        return _LONG_DAYS[s]
    raise ValueError(f"invalid weekday {text!r}: use mon, tue, wed, thu, fri, sat, sun")


def weekdays(items: object) -> list[int]:
    """['mon-fri', 'sun'] or 'mon-fri' -> sorted weekday numbers (ranges may wrap: 'fri-mon')."""
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ValueError("weekdays must be a list like [\"mon-fri\", \"sun\"]")
    out: set[int] = set()
    for item in items:
        if "-" in str(item):
            a, b = (weekday(x) for x in str(item).split("-", 1))
            out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            out.add(weekday(item))
    return sorted(out)


def date_range(text: object) -> DateRange:
    """'2026-12-24/2026-12-26' or one day '2026-12-25' (local dates, inclusive)."""
    parts = str(text).split("/")
    try:
        days = [datetime.date.fromisoformat(p.strip()) for p in parts]
    except ValueError:
        days = []
    if len(parts) > 2 or not days:
        raise ValueError(f"invalid date range {text!r}: use YYYY-MM-DD or YYYY-MM-DD/YYYY-MM-DD")
    if days[-1] < days[0]:
        raise ValueError(f"invalid date range {text!r}: it ends before it starts")
    return DateRange(days[0].isoformat(), days[-1].isoformat())


def exclusion(text: object) -> DateRange | TimeRange:
    """An `except` entry: a date range, or a daily time range."""
    s = str(text)
    if ":" in s:
        return time_range(s)
    return date_range(s)
