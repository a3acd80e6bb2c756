"""The scheduler over a simulated month: the RPO met, backups only inside their window,
full backups on their day, a backup cut by its window continued in the next."""
from __future__ import annotations

import datetime
import math
from pathlib import Path

from blocksnap.operations import schedule, windows
from blocksnap.operations.policy import load
from blocksnap.operations.schedule import JobFacts, VolumeFacts

POLICY = """\
timezone = "Europe/Berlin"
[[repository]]
name = "local"
url = "file:///srv/r"
password_file = "{pw}"
[[repository]]
name = "cloud"
url = "s3://b/p"
password_file = "{pw}"
offsite = true
[[volume]]
match = ["vm*"]
rpo = "1h"
snapshot = {{ every = "15m" }}
backup = {{ to = ["local"], every = "1h", full = ["sun"], differential = ["wed"], window = "22:00-06:00",
           except = ["2026-10-28/2026-10-28", "01:00-01:30"] }}
copy = [{{ from = "local", to = "cloud", every = "1d", window = "02:00-05:00" }}]
verify = {{ cycle = "30d", budget = "20G" }}
"""


class Sim:
    """Runs what the scheduler says, instantly except backups, which take `backup_minutes`
    (a full one twelve times as long: longer than any one window)."""

    def __init__(self, policy, start: float, backup_minutes: float):
        self.policy, self.now, self.backup_minutes = policy, start, backup_minutes
        self.v = VolumeFacts("vm1")
        self.repo = VolumeFacts("")
        self.rows: list[dict] = []
        self.n = 0
        self.running: tuple | None = None     # (end, due, result, info) of the backup in progress

    def record(self, facts: VolumeFacts, kind: str, target: str, started: float, ended: float, result: str,
               info: dict) -> dict:
        self.n += 1
        row = {"id": self.n, "started": started, "ended": ended, "result": result, "info": info, "kind": kind}
        f = facts.jobs.setdefault((kind, target), JobFacts())
        f.last = row
        if result == "ok":
            f.last_ok, f.failures_since_success = row, 0
            if info.get("mode") == "full":
                f.last_full = row
            if info.get("mode") == "differential":
                f.last_differential = row
        self.rows.append(dict(row, target=target))
        return row

    def step(self) -> None:
        """Start what is due (snapshots even while the volume's backup runs, as the agent
        does), then move the clock to the next due time or the running backup's end."""
        for d in schedule.plan(self.policy, [self.v, self.repo], self.now):
            if d.at > self.now:
                continue
            if d.kind == "snapshot":
                name = f"s{self.n}"
                self.v.snapshot_names.add(name)
                self.v.newest_snapshot, self.v.newest_name = self.now, name
                self.record(self.v, "snapshot", "", self.now, self.now, "ok", {"snapshot": name,
                                                                                "snapshot_created": self.now})
            elif self.running is None:
                if d.kind == "backup":
                    self.start_backup(d)
                else:
                    facts = self.repo if d.kind == "verify" else self.v
                    self.record(facts, d.kind, d.target, self.now, self.now + 60, "ok", {})
        plan = schedule.plan(self.policy, [self.v, self.repo], self.now)
        nxt = min((d.at for d in plan if d.kind == "snapshot" or self.running is None), default=math.inf)
        if self.running:
            nxt = min(nxt, self.running[0])
        self.now = max(self.now, nxt) if math.isfinite(nxt) else self.now + 3600
        if self.running and self.now >= self.running[0]:
            end, d, result, info = self.running
            self.record(self.v, "backup", d.target, info.pop("started"), end, result, info)
            self.running = None

    def start_backup(self, d) -> None:
        last = self.v.job("backup", d.target).last
        done = last["info"].get("done", 0.0) if last and last["result"] == "stopped" else 0.0
        snap = d.snapshot or self.v.newest_name
        created = self.v.newest_snapshot if d.snapshot is None else last["info"]["snapshot_created"]
        need = self.backup_minutes * 60 * (12 if d.mode == "full" else 1) - done
        info = {"snapshot": snap, "snapshot_created": created, "mode": d.mode, "requested_mode": d.mode,
                "started": self.now}
        if self.now + need > d.deadline:
            info["done"] = done + (d.deadline - self.now)
            self.running = (d.deadline, d, "stopped", info)
        else:
            self.running = (self.now + need, d, "ok", info)


def test_a_month_meets_its_policy(tmp_path: Path):
    (tmp_path / "pw").write_text("x")
    (tmp_path / "p.toml").write_text(POLICY.format(pw=tmp_path / "pw"))
    policy = load(str(tmp_path / "p.toml"))
    tz = windows.zone(policy.timezone)
    rule = policy.rule_for("vm1")
    start = datetime.datetime(2026, 10, 1, 12, 0, tzinfo=tz).timestamp()   # a month with a DST change
    sim = Sim(policy, start, backup_minutes=25)
    while sim.now < start + 31 * 86400:
        sim.step()
    snaps = [r for r in sim.rows if r["kind"] == "snapshot"]
    backups = [r for r in sim.rows if r["kind"] == "backup"]
    # RPO 1h: snapshots every 15 minutes, backups running or not
    gaps = [b["started"] - a["started"] for a, b in zip(snaps, snaps[1:])]
    assert max(gaps) <= 15 * 60
    # backups only inside the window, never on the excluded day or 01:00-01:30
    for b in backups:
        assert windows.is_open(rule.backup.window, tz, b["started"]), datetime.datetime.fromtimestamp(b["started"], tz)
        assert datetime.datetime.fromtimestamp(b["started"], tz).date().isoformat() != "2026-10-28" or \
            datetime.datetime.fromtimestamp(b["started"], tz).hour >= 22
    # one full each Sunday the window opens, differentials on Wednesdays, incrementals otherwise
    fulls = {datetime.datetime.fromtimestamp(b["started"], tz).date() for b in backups
             if b["info"]["mode"] == "full" and b["result"] == "ok"}
    assert fulls and all(d.weekday() == 6 for d in fulls)
    assert len([b for b in backups if b["info"]["mode"] == "full" and b["result"] == "ok"]) == len(fulls)
    diffs = {datetime.datetime.fromtimestamp(b["started"], tz).weekday() for b in backups
             if b["info"]["mode"] == "differential"}
    assert diffs == {2}
    # about hourly backups in the window: 8 h a night, minus the exclusions, 25 minutes each
    ok = [b for b in backups if b["result"] == "ok"]
    assert 31 * 5 <= len(ok) <= 31 * 9
    # a stopped backup (its window closed) is continued with the same snapshot and mode
    stopped = [b for b in backups if b["result"] == "stopped"]
    assert stopped
    for s in stopped:
        nxt = next(b for b in backups if b["id"] > s["id"])
        assert nxt["info"]["snapshot"] == s["info"]["snapshot"] and nxt["info"]["mode"] == s["info"]["mode"]
        assert windows.is_open(rule.backup.window, tz, nxt["started"])
    # copies inside their own window, once a day; verification once a day
    copies = [r for r in sim.rows if r["kind"] == "copy"]
    assert 25 <= len(copies) <= 32      # (not while a 5-hour full backup of the volume runs)
    assert all(windows.is_open(rule.copy[0].window, tz, c["started"]) for c in copies)
    for repo in ("local", "cloud"):      # the backup target and the copy's
        assert 29 <= len([r for r in sim.rows if r["kind"] == "verify" and r["target"] == repo]) <= 32


def test_missed_runs_are_due_at_once_and_failures_back_off(tmp_path: Path):
    (tmp_path / "pw").write_text("x")
    always = POLICY.replace('window = "22:00-06:00",\n           except = ["2026-10-28/2026-10-28", "01:00-01:30"] ',
                            "")
    (tmp_path / "p.toml").write_text(always.format(pw=tmp_path / "pw"))
    policy = load(str(tmp_path / "p.toml"))
    now = 1_800_000_000.0
    v = VolumeFacts("vm1", newest_snapshot=now - 86400, newest_name="old", snapshot_names={"old"})
    plan = {d.kind: d for d in schedule.plan(policy, [v], now)}
    assert plan["snapshot"].at <= now and plan["backup"].at <= now      # the agent was down a day
    failed = {"started": now - 10, "ended": now - 5, "result": "failed", "info": {}}
    v.jobs[("backup", "local")] = JobFacts(last=failed, failures_since_success=3)
    plan = {d.kind: d for d in schedule.plan(policy, [v], now)}
    assert plan["backup"].at == now - 5 + 240        # 1, 2, 4 minutes...


def test_a_backup_that_cannot_finish_waits_for_a_longer_window(tmp_path: Path):
    (tmp_path / "pw").write_text("x")
    (tmp_path / "p.toml").write_text(POLICY.format(pw=tmp_path / "pw"))
    policy = load(str(tmp_path / "p.toml"))
    tz = windows.zone(policy.timezone)
    now = datetime.datetime(2026, 11, 3, 5, 30, tzinfo=tz).timestamp()    # 30 minutes left in the window
    took = {"started": now - 86400, "ended": now - 86400 + 3000, "result": "ok",
            "info": {"snapshot_created": now - 86400}}                   # 50 minutes last time
    v = VolumeFacts("vm1", newest_snapshot=now, newest_name="s", snapshot_names={"s"},
                    jobs={("backup", "local"): JobFacts(last_ok=took, last=took)})
    d = next(d for d in schedule.plan(policy, [v], now) if d.kind == "backup")
    assert d.at == datetime.datetime(2026, 11, 3, 22, 0, tzinfo=tz).timestamp()
    assert d.deadline == datetime.datetime(2026, 11, 4, 1, 0, tzinfo=tz).timestamp()   # the 01:00 exclusion
    assert math.isfinite(d.deadline)


def test_upcoming_lists_a_days_runs_inside_their_windows(tmp_path: Path):
    (tmp_path / "pw").write_text("x")
    (tmp_path / "p.toml").write_text(POLICY.format(pw=tmp_path / "pw"))
    policy = load(str(tmp_path / "p.toml"))
    tz = windows.zone(policy.timezone)
    rule = policy.rule_for("vm1")
    now = datetime.datetime(2026, 11, 2, 12, 0, tzinfo=tz).timestamp()      # a Monday
    v = VolumeFacts("vm1", newest_snapshot=now - 60, newest_name="s", snapshot_names={"s"})
    runs = schedule.upcoming(policy, [v, VolumeFacts("")], now, now + 86400)
    by_kind: dict[str, list[float]] = {}
    for t, d in runs:
        by_kind.setdefault(d.kind, []).append(t)
    assert len(by_kind["snapshot"]) == 96
    backups = by_kind["backup"]
    assert all(windows.is_open(rule.backup.window, tz, t) for t in backups)
    assert 6 <= len(backups) <= 8                  # hourly, 22:00-06:00 less 01:00-01:30
    assert [datetime.datetime.fromtimestamp(t, tz).hour for t in by_kind["copy"]] == [2]
    assert runs == sorted(runs, key=lambda x: x[0])
