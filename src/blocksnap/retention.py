"""Grandfather-father-son retention: which items a --keep-* policy keeps, and why.

One rule set for local snapshots and for backups alike. Items are (id, time);
periods are calendar buckets in UTC, so a policy keeps the same items on every
machine. Like restic's `forget`: within each kind of period the newest item of
each of the N newest periods that have items is kept; an item kept for several
reasons lists them all.
"""
from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import InvalidArgument

_PERIODS: dict[str, Callable[[time.struct_time], tuple]] = {
    "hourly": lambda t: (t.tm_year, t.tm_yday, t.tm_hour),
    "daily": lambda t: (t.tm_year, t.tm_yday),
    # ISO weeks: a week that spans a new year is one week
    "weekly": lambda t: tuple(datetime.date(t.tm_year, t.tm_mon, t.tm_mday).isocalendar()[:2]),
    "monthly": lambda t: (t.tm_year, t.tm_mon),
    "yearly": lambda t: (t.tm_year,),
}
_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 31 * 86400, "y": 366 * 86400}


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: float = 0.0          # seconds: keep everything newer than now - within

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within)

    def describe(self) -> str:
        parts = [f"{k} {getattr(self, k)}" for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
                 if getattr(self, k)]
        if self.within:
            parts.append(f"within {self.within / 86400:g} days")
        return ", ".join(parts)


@dataclass
class Decision:
    keep: dict[str, list[str]] = field(default_factory=dict)   # id -> reasons
    remove: list[str] = field(default_factory=list)             # newest first


def parse_duration(text: str) -> float:
    """'36h', '7d', '2w', '6m' (31-day months), '1y', or combinations like '1y6m'."""
    parts = re.findall(r"(\d+)([hdwmy])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise InvalidArgument(f"invalid duration {text!r}: use a number and h, d, w, m or y (e.g. 7d, 1y6m)")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


def decide(items: list[tuple[str, float]], policy: Policy, now: float | None = None) -> Decision:
    """Split items into kept (with reasons) and removed. An empty policy is refused:
    it would remove everything, which is never what a prune means."""
    if policy.empty():
        raise InvalidArgument("no --keep-* option given: refusing to remove everything")
    if any(n < 0 for n in (policy.last, policy.hourly, policy.daily, policy.weekly,
                           policy.monthly, policy.yearly)):
        raise InvalidArgument("--keep-* counts must not be negative")
    now = time.time() if now is None else now
    ordered = sorted(items, key=lambda it: (it[1], it[0]), reverse=True)
    out = Decision()

    def mark(i: str, why: str) -> None:
        out.keep.setdefault(i, []).append(why)

    for i, _ in ordered[:policy.last]:
        mark(i, "last")
    for name, bucket in _PERIODS.items():
        want = getattr(policy, name)
        seen: set[tuple] = set()
        for i, t in ordered:
            if len(seen) >= want:
                break
            key = bucket(time.gmtime(t))
            if key not in seen:
                seen.add(key)
                mark(i, name)
    if policy.within:
        for i, t in ordered:
            if t >= now - policy.within:
                mark(i, "within")
    out.remove = [i for i, _ in ordered if i not in out.keep]
    return out
