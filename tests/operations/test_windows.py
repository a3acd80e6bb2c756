"""Windows against a minute-by-minute model: crossing midnight, exclusions, DST, month ends."""
from __future__ import annotations

import datetime
import math
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap.operations import windows
from blocksnap.operations.model import DateRange, TimeRange, Window

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
# around DST changes and month ends of 2026 (Berlin: Mar 29, Oct 25; New York: Mar 8, Nov 1; Lord Howe: Apr 5, Oct 4)
ANCHORS = [datetime.datetime(2026, m, d, tzinfo=datetime.timezone.utc).timestamp()
           for m, d in ((3, 7), (3, 28), (4, 4), (10, 3), (10, 24), (10, 31), (12, 30), (2, 27), (6, 30))]


def model_open(w: Window, tz: datetime.tzinfo, t: float) -> bool:
    """The rule, said plainly, for one instant."""
    local = datetime.datetime.fromtimestamp(t, tz)
    m, wd, day = local.hour * 60 + local.minute, local.weekday(), local.date().isoformat()
    if w.ranges:
        ok = False
        for r in w.ranges:
            if r.crosses_midnight():
                ok |= (m >= r.start and wd in w.days) or (m < r.end and (wd - 1) % 7 in w.days)
            else:
                ok |= r.start <= m < r.end and wd in w.days
    else:
        ok = wd in w.days
    for d in w.except_dates:
        ok &= not (d.first <= day <= d.last)
    for x in w.except_times:
        inside = (m >= x.start or m < x.end) if x.crosses_midnight() else x.start <= m < x.end
        ok &= not inside
    return ok


minute = st.integers(0, 1439)


@st.composite
def time_ranges(draw) -> TimeRange:
    a = draw(minute)
    b = draw(st.integers(1, 1440).filter(lambda x: x % 1440 != a))
    return TimeRange(a, b if b == 1440 else b % 1440)


@st.composite
def window_strategy(draw) -> Window:
    days = sorted(draw(st.sets(st.integers(0, 6), min_size=1)))
    base = datetime.date(2026, 1, 1)
    dates = []
    for _ in range(draw(st.integers(0, 2))):
        a = base + datetime.timedelta(days=draw(st.integers(0, 364)))
        b = a + datetime.timedelta(days=draw(st.integers(0, 3)))
        dates.append(DateRange(a.isoformat(), b.isoformat()))
    return Window(ranges=draw(st.lists(time_ranges(), max_size=2)), days=days, except_dates=dates,
                  except_times=draw(st.lists(time_ranges().filter(lambda r: True), max_size=1)))


@settings(max_examples=150, deadline=None)
@given(w=window_strategy(), zone=st.sampled_from(ZONES), anchor=st.sampled_from(ANCHORS),
       offset=st.integers(0, 3 * 86400))
def test_is_open_matches_model(w: Window, zone: str, anchor: float, offset: int):
    tz = ZoneInfo(zone)
    for t in (anchor + offset, anchor + offset + 37, anchor + offset + 3600):
        assert windows.is_open(w, tz, t) == model_open(w, tz, t), (t, datetime.datetime.fromtimestamp(t, tz))


@settings(max_examples=60, deadline=None)
@given(w=window_strategy(), zone=st.sampled_from(ZONES), anchor=st.sampled_from(ANCHORS),
       offset=st.integers(0, 86400))
def test_next_open_and_close_match_a_minute_scan(w: Window, zone: str, anchor: float, offset: int):
    tz = ZoneInfo(zone)
    t = float((int(anchor + offset) // 60) * 60)
    nxt = windows.next_open(w, tz, t)
    scan = next((t + 60 * i for i in range(9 * 1440) if model_open(w, tz, t + 60 * i)), None)
    if scan is not None:
        assert nxt == scan
    else:
        assert nxt is None or nxt - t >= 9 * 86400
    if nxt is not None and nxt - t < 9 * 86400:
        end = windows.open_until(w, tz, nxt)
        close = next((nxt + 60 * i for i in range(1, 9 * 1440) if not model_open(w, tz, nxt + 60 * i)), math.inf)
        assert end == close or (close == math.inf and end >= nxt + 8 * 86400)


def test_crossing_midnight_belongs_to_its_start_day():
    tz = ZoneInfo("Europe/Berlin")
    w = Window(ranges=[TimeRange(22 * 60, 6 * 60)], days=[4])       # Friday 22:00 to Saturday 06:00
    fri = datetime.datetime(2026, 12, 4, 23, 0, tzinfo=tz).timestamp()
    sat_early = datetime.datetime(2026, 12, 5, 5, 59, tzinfo=tz).timestamp()
    sat_late = datetime.datetime(2026, 12, 5, 23, 0, tzinfo=tz).timestamp()
    thu_early = datetime.datetime(2026, 12, 4, 3, 0, tzinfo=tz).timestamp()
    assert windows.is_open(w, tz, fri) and windows.is_open(w, tz, sat_early)
    assert not windows.is_open(w, tz, sat_late) and not windows.is_open(w, tz, thu_early)
    assert windows.open_until(w, tz, fri) == datetime.datetime(2026, 12, 5, 6, 0, tzinfo=tz).timestamp()


def test_never_open_window_is_found():
    w = Window(ranges=[TimeRange(60, 80)], except_times=[TimeRange(0, 120)])
    assert windows.open_minutes_per_week(w) == 0
    assert windows.longest_open_minutes(Window(ranges=[TimeRange(22 * 60, 6 * 60)])) == 480
    assert windows.longest_open_minutes(Window(ranges=[TimeRange(0, 1440)], days=[5, 6, 0])) == 3 * 1440
    assert windows.longest_open_minutes(Window()) == 7 * 1440


@settings(max_examples=60, deadline=None)
@given(w=window_strategy(), zone=st.sampled_from(ZONES), anchor=st.sampled_from(ANCHORS),
       offset=st.integers(0, 86400), since=st.integers(0, 2 * 86400), every=st.sampled_from([900, 3600, 86400]))
def test_the_scheduler_starts_a_backup_at_the_models_first_open_minute(w: Window, zone: str, anchor: float,
                                                                      offset: int, since: int, every: int):
    """plan()'s backup start: the first minute, at or after both now and the due time
    (the last recovery point + every), that the minute-by-minute model calls open."""
    from blocksnap.operations import schedule
    from blocksnap.operations.model import BackupRule, Policy, Repository, Schedule, VolumeRule
    from blocksnap.operations.schedule import JobFacts, VolumeFacts
    tz = ZoneInfo(zone)
    now = float((int(anchor + offset) // 60) * 60)
    last = now - since
    policy = Policy(path="p", timezone=zone, repositories={"r": Repository("r", "file:///r")},
                    volumes=[VolumeRule(match=["v"], backup=BackupRule(to=["r"], schedule=Schedule(every=every),
                                                                         window=w))])
    ok = {"started": last, "ended": last, "result": "ok", "info": {"snapshot_created": last}}
    v = VolumeFacts("v", jobs={("backup", "r"): JobFacts(last_ok=ok, last=ok)})
    d = next(d for d in schedule.plan(policy, [v], now) if d.kind == "backup")
    due = max(now, last + every)
    first = float((int(due + 59) // 60) * 60) if due % 60 else due
    expect = next((first + 60 * i for i in range(9 * 1440) if model_open(w, tz, first + 60 * i)), None)
    if expect is None:
        assert d.at == math.inf or d.at - due >= 9 * 86400
    elif model_open(w, tz, due):
        assert d.at == due                     # open now: at once, not at the next whole minute
    else:
        assert d.at == expect
