"""What is due when: a pure function of the policy, the history and the clock.

`plan` returns, for every job the policy defines, when it should next start and
how (the backup mode, the deadline its window sets). The agent starts those
whose time has come; `status` shows the rest as the next planned runs. Nothing
here reads a clock or a file, so tests drive it with a simulated month.

Rules (docs/operations.md, "When jobs run"):
- a snapshot is due `every` after the newest snapshot of the volume (whoever took
  it), or at the newest `at` time of day that no snapshot has followed yet;
- a backup to a repository is due `every` after the recovery point of the last
  successful one (the creation time of the snapshot it holds), and only inside
  its window; a backup whose window closes while it runs is stopped and the next
  start continues it (same snapshot, same mode);
- it is not started when the time left in the window is shorter than the last
  such run took, unless it could never fit a window anyway (then it goes on
  across windows) or it continues a stopped one;
- copies and drills are due `every` after their last success, verification once
  a day; a failed run is retried after 1, 2, 4 ... minutes, at most 30; one the
  agent's death interrupted runs again at once;
- missed runs are simply due: an agent that starts late runs them at once.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Any

from . import windows
from .model import Policy, Schedule, VolumeRule, Window

VERIFY_EVERY = 86400.0
RETRY_FIRST, RETRY_MAX = 60.0, 1800.0


@dataclass
class JobFacts:
    """What the history says of one (volume, kind, target)."""

    last_ok: dict[str, Any] | None = None          # job rows, as JobRow.to_json()
    last: dict[str, Any] | None = None
    last_full: dict[str, Any] | None = None
    last_differential: dict[str, Any] | None = None
    failures_since_success: int = 0

    @classmethod
    def from_summary(cls, s: dict[str, Any]) -> "JobFacts":
        return cls(s.get("last_success"), s.get("last"), s.get("last_full"), s.get("last_differential"),
                   s.get("failures_since_success", 0))


@dataclass
class VolumeFacts:
    name: str
    newest_snapshot: float | None = None             # creation time
    newest_name: str | None = None
    snapshot_names: set[str] = field(default_factory=set)
    jobs: dict[tuple[str, str], JobFacts] = field(default_factory=dict)   # (kind, target)

    def job(self, kind: str, target: str = "") -> JobFacts:
        return self.jobs.get((kind, target), JobFacts())


@dataclass
class Due:
    volume: str                # '' for a repository's own jobs (verify)
    kind: str                  # snapshot, backup, copy, verify, drill
    target: str                # repository (copy: the destination)
    at: float                  # when it should start (<= now: start it)
    deadline: float = math.inf  # its window closes then
    mode: str | None = None    # backup: full, incremental, differential
    snapshot: str | None = None   # backup: continue this snapshot (a stopped run)
    source: str | None = None  # copy: from this repository
    reason: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.volume, self.kind, self.target)


def retry_at(f: JobFacts) -> float | None:
    """After a failure: when to try again (None: the last run did not fail). A run
    the agent's own end interrupted is not the job's fault: it runs again at once."""
    if not f.last or f.last["result"] != "failed" or not f.failures_since_success:
        return None
    wait = min(RETRY_FIRST * 2 ** (f.failures_since_success - 1), RETRY_MAX)
    return (f.last["ended"] or f.last["started"]) + wait


def _slot_before(s: Schedule, tz: datetime.tzinfo, now: float) -> float | None:
    """The newest `at` time of day, on an allowed weekday, at or before now."""
    day = datetime.datetime.fromtimestamp(now, tz).date()
    for back in range(8):
        d = day - datetime.timedelta(days=back)
        if d.weekday() not in s.days:
            continue
        times = [datetime.datetime(d.year, d.month, d.day, m // 60, m % 60, tzinfo=tz).timestamp() for m in s.at]
        past = [t for t in times if t <= now]
        if past:
            return max(past)
    return None


def _slot_after(s: Schedule, tz: datetime.tzinfo, now: float) -> float | None:
    day = datetime.datetime.fromtimestamp(now, tz).date()
    for ahead in range(8):
        d = day + datetime.timedelta(days=ahead)
        if d.weekday() not in s.days:
            continue
        times = [datetime.datetime(d.year, d.month, d.day, m // 60, m % 60, tzinfo=tz).timestamp() for m in s.at]
        future = [t for t in times if t > now]
        if future:
            return min(future)
    return None


def due_by_schedule(s: Schedule, last: float | None, tz: datetime.tzinfo, now: float) -> float:
    """When a run on schedule s is due, given the time of the last one."""
    if s.every:
        return now if last is None else last + s.every
    slot = _slot_before(s, tz, now)
    if slot is not None and (last is None or last < slot):
        return slot
    nxt = _slot_after(s, tz, now)
    return nxt if nxt is not None else math.inf


def _in_window(window: Window, tz: datetime.tzinfo, due: float, now: float, estimate: float | None,
               resuming: bool) -> tuple[float, float]:
    """(start, deadline) for a job due at `due` that may only run inside `window`."""
    t = max(due, now)
    for _ in range(64):
        start = windows.next_open(window, tz, t)
        if start is None:
            return math.inf, math.inf
        end = windows.open_until(window, tz, start)
        fits_some_window = estimate is None or estimate <= windows.longest_open_minutes(window) * 60
        if resuming or not fits_some_window or estimate is None or end - start >= estimate:
            return start, end
        t = end        # too little of this window is left: the next one
    return math.inf, math.inf


def _estimate(f: JobFacts) -> float | None:
    ok = f.last_ok
    if not ok or ok.get("ended") is None:
        return None
    return (ok["ended"] - ok["started"]) * 1.25


def _local_date(t: float | None, tz: datetime.tzinfo) -> datetime.date | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, tz).date()


def backup_mode(rule: VolumeRule, f: JobFacts, tz: datetime.tzinfo, start: float) -> str:
    """Full on the policy's full days (once that day), differential likewise, else incremental."""
    assert rule.backup is not None
    day = _local_date(start, tz)
    assert day is not None
    if day.weekday() in rule.backup.full and _local_date((f.last_full or {}).get("started"), tz) != day:
        return "full"
    if day.weekday() in rule.backup.differential and \
            _local_date((f.last_differential or {}).get("started"), tz) != day:
        return "differential"
    return "incremental"


def _recovery_point(row: dict[str, Any] | None) -> float | None:
    if not row:
        return None
    return row.get("info", {}).get("snapshot_created", row["started"])


def _later(*times: float | None) -> float:
    return max(t for t in times if t is not None)


def plan_volume(policy: Policy, rule: VolumeRule, v: VolumeFacts, now: float) -> list[Due]:
    tz = windows.zone(policy.timezone)
    out: list[Due] = []
    if rule.snapshot:
        f = v.job("snapshot")
        at = due_by_schedule(rule.snapshot.schedule, v.newest_snapshot, tz, now)
        out.append(Due(v.name, "snapshot", "", _later(at, retry_at(f)), reason="schedule"))
    if rule.backup:
        for repo in rule.backup.to:
            f = v.job("backup", repo)
            last = f.last or {}
            stopped = last.get("result") == "stopped" and last.get("info", {}).get("snapshot") in v.snapshot_names
            if stopped:
                due = last.get("ended") or now
            else:
                due = due_by_schedule(rule.backup.schedule, _recovery_point(f.last_ok), tz, now)
            due = _later(due, retry_at(f))
            start, deadline = _in_window(rule.backup.window, tz, due, now, _estimate(f), stopped)
            if stopped:
                mode, snap = last["info"].get("requested_mode", "incremental"), last["info"]["snapshot"]
            else:
                mode, snap = (backup_mode(rule, f, tz, start) if math.isfinite(start) else "incremental"), None
            out.append(Due(v.name, "backup", repo, start, deadline, mode=mode, snapshot=snap,
                           reason="continue" if stopped else "schedule"))
    for c in rule.copy:
        f = v.job("copy", c.dest)
        due = _later(now if not f.last_ok else f.last_ok["started"] + c.every, retry_at(f))
        start, deadline = _in_window(c.window, tz, due, now, _estimate(f), False)
        out.append(Due(v.name, "copy", c.dest, start, deadline, source=c.source, reason="schedule"))
    if rule.drill:
        repo = rule.drill.repository or (rule.backup.to[0] if rule.backup else "")
        f = v.job("drill", repo)
        due = _later(now if not f.last_ok else f.last_ok["started"] + rule.drill.every, retry_at(f))
        start, deadline = _in_window(rule.drill.window, tz, due, now, None, False)
        out.append(Due(v.name, "drill", repo, start, deadline, reason="schedule"))
    return out


def verify_targets(policy: Policy, volumes: list[str]) -> dict[str, tuple[float, int]]:
    """Repository -> (cycle, daily budget): the tightest cycle and largest budget any
    volume backing up there asks for."""
    out: dict[str, tuple[float, int]] = {}
    for name in volumes:
        rule = policy.rule_for(name)
        if not rule or not rule.verify or not rule.backup:
            continue
        for repo in set(rule.backup.to) | {c.dest for c in rule.copy}:
            cycle, budget = out.get(repo, (math.inf, 0))
            out[repo] = (min(cycle, rule.verify.cycle), max(budget, rule.verify.budget))
    return out


def plan(policy: Policy, facts: list[VolumeFacts], now: float) -> list[Due]:
    """Every job the policy defines for these volumes, with its next start."""
    out: list[Due] = []
    for v in facts:
        if v.name and (rule := policy.rule_for(v.name)):
            out.extend(plan_volume(policy, rule, v, now))
    repo_jobs = next((v for v in facts if v.name == ""), VolumeFacts(""))
    for repo in verify_targets(policy, [v.name for v in facts if v.name]):
        f = repo_jobs.job("verify", repo)
        due = _later(now if not f.last_ok else f.last_ok["started"] + VERIFY_EVERY, retry_at(f))
        out.append(Due("", "verify", repo, due, reason="coverage"))
    return sorted(out, key=lambda d: d.at)


def _following(tz: datetime.tzinfo, rule: VolumeRule | None, d: Due, t: float) -> float:
    """When the job `d` would start next if it ran (and succeeded) at t."""
    if d.kind == "verify":
        return t + VERIFY_EVERY
    assert rule is not None
    if d.kind == "snapshot" and rule.snapshot:
        return due_by_schedule(rule.snapshot.schedule, t, tz, t + 1)
    if d.kind == "backup" and rule.backup:
        due = due_by_schedule(rule.backup.schedule, t, tz, t + 1)
        return _in_window(rule.backup.window, tz, due, due, None, False)[0]
    if d.kind == "copy":
        c = next(c for c in rule.copy if c.dest == d.target)
        return _in_window(c.window, tz, t + c.every, t + c.every, None, False)[0]
    if d.kind == "drill" and rule.drill:
        return _in_window(rule.drill.window, tz, t + rule.drill.every, t + rule.drill.every, None, False)[0]
    return math.inf


def upcoming(policy: Policy, facts: list[VolumeFacts], now: float, until: float) -> list[tuple[float, Due]]:
    """Every run planned between now and `until` as (start, job), each job assumed to
    succeed when it starts (the plan `status` shows, and what the benchmark times)."""
    tz = windows.zone(policy.timezone)
    out: list[tuple[float, Due]] = []
    for d in plan(policy, facts, now):
        rule = policy.rule_for(d.volume) if d.volume else None
        t = max(d.at, now)
        if d.kind == "snapshot" and rule and rule.snapshot and rule.snapshot.schedule.every:
            every = rule.snapshot.schedule.every          # an interval: the runs in one go
            out.extend((t + i * every, d) for i in range(int((until - t) // every) + 1) if t <= until)
            continue
        while t <= until:
            out.append((t, d))
            nxt = _following(tz, rule, d, t)
            if not nxt > t:
                break
            t = nxt
    out.sort(key=lambda x: x[0])
    return out
