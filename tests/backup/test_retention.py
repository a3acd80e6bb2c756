"""The --keep-* rules, for snapshots and backups alike."""
from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap.errors import InvalidArgument
from blocksnap.retention import Policy, decide, parse_duration

DAY = 86400


def t(y, mo, d, h=12):
    return float(calendar.timegm((y, mo, d, h, 0, 0)))


def test_gfs_keeps_the_newest_of_each_period():
    items = [(f"d{d:02}h{h}", t(2026, 11, d, h)) for d in range(1, 29) for h in (6, 18)]
    items += [("oct", t(2026, 10, 15)), ("sep", t(2026, 9, 3)), ("2025", t(2025, 6, 1))]
    d = decide(items, Policy(last=1, daily=3, weekly=2, monthly=2, yearly=2), now=t(2026, 11, 29))
    assert d.keep["d28h18"] == ["last", "daily", "weekly", "monthly", "yearly"]
    assert "d27h18" in d.keep and "d26h18" in d.keep and "d27h6" not in d.keep
    # ISO week of 2026-11-28 (a Saturday) runs from Monday the 23rd: the week before ends on the 22nd
    assert d.keep["d22h18"] == ["weekly"]
    assert d.keep["oct"] == ["monthly"] and "sep" not in d.keep
    assert d.keep["2025"] == ["yearly"]
    assert set(d.keep) | set(d.remove) == {i for i, _ in items} and not set(d.keep) & set(d.remove)


def test_within_and_durations():
    items = [(str(i), 1000.0 * DAY - i * 3600) for i in range(48)]
    d = decide(items, Policy(within=parse_duration("12h")), now=1000.0 * DAY)
    assert sorted(d.keep, key=int) == [str(i) for i in range(13)]
    assert parse_duration("1y6m") == 366 * DAY + 6 * 31 * DAY and parse_duration("2w") == 14 * DAY
    for bad in ("", "7", "d", "7x", "1d 2h", "-1d"):
        with pytest.raises(InvalidArgument):
            parse_duration(bad)


def test_an_empty_policy_removes_nothing():
    with pytest.raises(InvalidArgument, match="no --keep"):
        decide([("a", 1.0)], Policy())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 4e8, allow_nan=False), max_size=40, unique=True),
       st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_properties(times, last, daily, weekly, monthly):
    items = [(f"i{n}", x) for n, x in enumerate(times)]
    pol = Policy(last=last, daily=daily, weekly=weekly, monthly=monthly)
    if pol.empty():
        return
    d = decide(items, pol)
    assert set(d.keep) | set(d.remove) == {i for i, _ in items}
    assert not set(d.keep) & set(d.remove)
    newest = sorted(items, key=lambda it: it[1], reverse=True)
    assert {i for i, _ in newest[:last]} <= set(d.keep)          # keep-last is exact
    if items:
        assert newest[0][0] in d.keep                             # the newest always stays
    assert sum("daily" in w for w in d.keep.values()) == min(daily, len({int(x // DAY) for x in times}))
