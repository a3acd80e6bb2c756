"""When a window is open: a pure function of the window, the time zone and the instant.

The rule (what the hypothesis test's minute-by-minute model checks): an instant is
open when its local wall-clock time, in the policy's time zone, falls in one of
the window's ranges on an allowed weekday (a range crossing midnight belongs to
the day it starts), and neither its local date nor its local time of day is
excluded. Windows are given in whole minutes, so the answer is computed for whole
minutes at once as a numpy mask; DST changes are found where the zone's UTC
offset differs between two grid points and resolved minute by minute there.
"""
from __future__ import annotations

import datetime
import math
from zoneinfo import ZoneInfo

import numpy as np

from .model import TimeRange, Window

HORIZON_DAYS = 16                 # how far ahead one mask looks
_GRID = 15                        # minutes between offset probes
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def zone(name: str | None) -> datetime.tzinfo:
    """The policy's zone, or the machine's local one."""
    if name:
        return ZoneInfo(name)
    return datetime.datetime.now().astimezone().tzinfo or datetime.timezone.utc


def _offset_minutes(tz: datetime.tzinfo, minute: int) -> int:
    off = datetime.datetime.fromtimestamp(minute * 60, tz).utcoffset()
    return int(off.total_seconds() // 60) if off else 0


def _offsets(tz: datetime.tzinfo, first: int, n: int) -> np.ndarray:
    """UTC offset in minutes of every minute in [first, first + n)."""
    grid = np.arange(first, first + n + _GRID, _GRID)
    probes = np.array([_offset_minutes(tz, int(m)) for m in grid], dtype=np.int64)
    out = np.repeat(probes[:-1], _GRID)[:n]
    for i in np.flatnonzero(probes[:-1] != probes[1:]):       # a transition inside this step
        lo = int(grid[i])
        for m in range(lo, min(lo + _GRID, first + n)):
            out[m - first] = _offset_minutes(tz, m)
    return out


def _day_number(iso: str) -> int:
    return datetime.date.fromisoformat(iso).toordinal() - _EPOCH_ORDINAL


def _in_range(r: TimeRange, mod: np.ndarray) -> np.ndarray:
    if r.crosses_midnight():
        return (mod >= r.start) | (mod < r.end)
    return (mod >= r.start) & (mod < r.end)


def _mask(window: Window, tz: datetime.tzinfo, first: int, n: int) -> np.ndarray:
    local = np.arange(first, first + n, dtype=np.int64) + _offsets(tz, first, n)
    day, mod = np.divmod(local, 1440)
    wday = (day + 3) % 7                                   # 1970-01-01 was a Thursday
    allowed = np.zeros(7, dtype=bool)
    allowed[window.days] = True
    if not window.ranges:
        open_ = allowed[wday]
    else:
        open_ = np.zeros(n, dtype=bool)
        for r in window.ranges:
            if r.crosses_midnight():
                open_ |= ((mod >= r.start) & allowed[wday]) | ((mod < r.end) & allowed[(wday - 1) % 7])
            else:
                open_ |= (mod >= r.start) & (mod < r.end) & allowed[wday]
    for d in window.except_dates:
        open_ &= ~((day >= _day_number(d.first)) & (day <= _day_number(d.last)))
    for t in window.except_times:
        open_ &= ~_in_range(t, mod)
    return open_


_CACHE: dict[tuple[str, str, int], np.ndarray] = {}
_CACHE_MAX = 4096


def mask_from(window: Window, tz: datetime.tzinfo, t: float) -> tuple[np.ndarray, int]:
    """A mask of whole minutes covering [day(t) - 1, day(t) + HORIZON_DAYS) UTC days,
    and the UTC minute its first element stands for."""
    first_day = int(t // 86400)
    key = (repr(window), str(tz), first_day)
    arr = _CACHE.get(key)
    if arr is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        arr = _CACHE[key] = _mask(window, tz, first_day * 1440 - 1440, (HORIZON_DAYS + 1) * 1440)
    return arr, first_day * 1440 - 1440


def is_open(window: Window, tz: datetime.tzinfo, t: float) -> bool:
    if window.always():
        return True
    arr, base = mask_from(window, tz, t)
    return bool(arr[int(t // 60) - base])


def next_open(window: Window, tz: datetime.tzinfo, t: float) -> float | None:
    """The first instant at or after t when the window is open (None: not within the horizon)."""
    if window.always():
        return t
    arr, base = mask_from(window, tz, t)
    i = int(t // 60) - base
    if arr[i]:
        return t
    later = np.flatnonzero(arr[i:])
    return None if later.size == 0 else float((base + i + int(later[0])) * 60)


def open_until(window: Window, tz: datetime.tzinfo, t: float) -> float:
    """When the open period holding t closes (inf for an always-open window; t if closed)."""
    if window.always():
        return math.inf
    arr, base = mask_from(window, tz, t)
    i = int(t // 60) - base
    if not arr[i]:
        return t
    closed = np.flatnonzero(~arr[i:])
    return math.inf if closed.size == 0 else float((base + i + int(closed[0])) * 60)


def open_minutes_per_week(window: Window) -> int:
    """Open minutes in a typical week (UTC, no exclusion dates): 0 means it can never run."""
    plain = Window(window.ranges, window.days, [], window.except_times)
    return int(_mask(plain, datetime.timezone.utc, 4 * 1440, 7 * 1440).sum())   # Mon 1970-01-05


_LONGEST: dict[str, int] = {}


def longest_open_minutes(window: Window) -> int:
    """The longest stretch the window stays open in a typical week, in minutes."""
    key = repr((window.ranges, window.days, window.except_times))
    if key not in _LONGEST:
        if len(_LONGEST) >= _CACHE_MAX:
            _LONGEST.clear()
        _LONGEST[key] = _longest(window)
    return _LONGEST[key]


def _longest(window: Window) -> int:
    plain = Window(window.ranges, window.days, [], window.except_times)
    m = np.concatenate([_mask(plain, datetime.timezone.utc, 4 * 1440, 7 * 1440)] * 2)
    if m.all():
        return 7 * 1440
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]])))
    runs = edges[1::2] - edges[::2]
    return int(runs.max()) if runs.size else 0
