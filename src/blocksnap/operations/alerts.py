"""The agent's own alerts: which conditions hold (a pure function of the Report), and
the AlertManager that turns their changes into notifications, at least once.

Each condition alerts once when it starts, reminds every `remind` while it holds, and
is resolved once when it clears. The manager's state (what is firing, what each
channel is still owed) is a JSON file replaced atomically, and a notification leaves a
channel's outbox only after that channel took it: a crash between a send and the
write that records it sends it again after the restart (a duplicate), never loses
it, and a restart neither re-fires a known alert nor invents or drops a resolve.
docs/operations.md has the keys and the channels' formats.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .channels import Channel, build_channels
from .metrics import split_run_key
from .model import AlertsConfig
from .report import JobStat, Report
from .timetext import format_duration

log = logging.getLogger("blocksnap.alerts")

CRITICAL, WARNING = "critical", "warning"
FAILED_RESULTS = ("failed", "interrupted")
LATE_KINDS = ("snapshot", "backup", "copy")
# Failing jobs of these kinds put recovery points at risk; the others (verify,
# drill, retention) warn.
CRITICAL_JOBS = ("snapshot", "backup", "copy")
# A failed channel is tried again this long after, doubling up to RETRY_MAX (in memory:
# a restarted agent tries at once).
RETRY_FIRST, RETRY_MAX = 15.0, 300.0


@dataclass
class Condition:
    """One alert condition that holds now. `key` names it for its whole life."""

    key: str
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The key's first part: job_failed, rpo_breached, storage..."""
        return self.key.split("/", 1)[0]


@dataclass
class Notification:
    """What a channel is told: a condition fired, still holds (reminder), or cleared."""

    status: str                  # firing | resolved
    condition: Condition
    started: float               # when the condition began
    time: float                  # when this notification was made
    reminder: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Notification:
        return cls(status=raw["status"], condition=Condition(**raw["condition"]), started=float(raw["started"]),
                   time=float(raw["time"]), reminder=bool(raw.get("reminder")))


def _job_name(kind: str, volume: str, target: str) -> str:
    return f"{kind} of {volume}" + (f" to {target}" if target else "")


def _job_failed(j: JobStat, previous: Collection[str]) -> Condition | None:
    """A job whose newest run failed or was interrupted and that has not succeeded
    since. A run in progress (or stopped at a window's end) after a failure keeps the
    alert: only a success clears it, so a retry does not resolve and re-fire it."""
    key = "/".join(["job_failed", j.volume, j.kind] + ([j.target] if j.target else []))
    failing = j.last_result in FAILED_RESULTS or (j.last_result != "ok" and key in previous)
    if not failing:
        return None
    name = _job_name(j.kind, j.volume, j.target)
    result = j.last_result if j.last_result in FAILED_RESULTS else "failed"
    since = "never succeeded" if j.last_success is None else f"last success at {_iso(j.last_success)}"
    desc = f"The {name} {result}" + (f": {j.last_error}" if j.last_error else "") + f" ({since})."
    if j.last_result == "running":
        desc += " A new run is in progress."
    return Condition(key, CRITICAL if j.kind in CRITICAL_JOBS else WARNING, f"{name} {result}", desc,
                     {"volume": j.volume, "job": j.kind, "repository": j.target})


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _volume_conditions(report: Report, config: AlertsConfig, now: float,
                       previous: Collection[str]) -> Iterable[Condition]:
    for v in report.volumes:
        for j in v.jobs:
            c = _job_failed(j, previous)
            if c:
                yield c
        if v.rpo is not None and v.rpo_breached:
            age = ("no restorable copy" if v.recovery_point is None
                   else f"newest restorable copy is {format_duration(now - v.recovery_point)} old")
            yield Condition(f"rpo_breached/{v.volume}", CRITICAL, f"RPO breached on {v.volume}",
                            f"{v.volume}: {age} (RPO {format_duration(v.rpo)}).", {"volume": v.volume})
        # One job per volume at a time: while one runs, the others wait, not late.
        busy = any(j.last_result == "running" for j in v.jobs)
        for key, due in sorted(v.next_runs.items()):
            kind, target = split_run_key(key)
            if busy or kind not in LATE_KINDS or now - due <= config.late:
                continue
            name = _job_name(kind, v.volume, target)
            yield Condition("/".join(["job_late", v.volume, kind] + ([target] if target else [])), WARNING,
                            f"{name} late", f"The {name} was due at {_iso(due)}, "
                            f"{format_duration(now - due)} ago, and has not started.",
                            {"volume": v.volume, "job": kind, "repository": target})
        if v.drill.ok is False:
            yield Condition(f"drill_failed/{v.volume}", WARNING, f"restore drill of {v.volume} failed",
                            f"The restore drill of {v.volume} at {_iso(v.drill.time or now)} failed"
                            + (f": {v.drill.error}" if v.drill.error else "") + ".", {"volume": v.volume})


def _storage_conditions(report: Report, config: AlertsConfig) -> Iterable[Condition]:
    limit = config.storage_threshold
    p = report.pool
    if p is not None and p.size and p.used_ratio > limit:
        yield Condition("storage/pool", WARNING, f"pool {p.used_ratio:.0%} full",
                        f"The pool {p.path} uses {p.used_ratio:.1%} of its space (threshold {limit:.0%})"
                        + (f", full in {p.days_until_full:.1f} days at recent growth" if p.days_until_full else "")
                        + ".", {"pool": p.path})
    for r in report.repositories:
        lab = {"repository": r.name}
        if not r.reachable:
            yield Condition(f"repository_unreachable/{r.name}", WARNING, f"repository {r.name} unreachable",
                            f"The repository {r.name} ({r.url}) could not be read"
                            + (f": {r.error}" if r.error else "") + ".", lab)
        if r.used_ratio is not None and r.used_ratio > limit:
            yield Condition(f"storage/repository/{r.name}", WARNING, f"repository {r.name} {r.used_ratio:.0%} full",
                            f"The repository {r.name} uses {r.used_ratio:.1%} of its quota (threshold {limit:.0%}).",
                            lab)
        if r.corruption:
            shown = "; ".join(r.corruption[:5]) + (f"; and {len(r.corruption) - 5} more" if len(r.corruption) > 5
                                                   else "")
            yield Condition(f"corruption/{r.name}", CRITICAL, f"corruption found in repository {r.name}",
                            f"Verification found {len(r.corruption)} problem(s) in {r.name}: {shown}.", lab)


def conditions(report: Report, config: AlertsConfig, now: float,
               previous: Collection[str] = ()) -> dict[str, Condition]:
    """The alert conditions that hold now, by key. `previous`: the keys firing until
    now (AlertManager.active_keys()), so a failed job's retry in progress keeps its
    alert instead of resolving it."""
    found = list(_volume_conditions(report, config, now, previous))
    found += _storage_conditions(report, config)
    if report.policy_error:
        found.append(Condition("policy_refused", WARNING, "policy reload refused",
                               f"The new policy was refused and the old one is still in force: {report.policy_error}",
                               {}))
    return {c.key: c for c in found}


class AlertManager:
    """Alert state across evaluations, agent restarts and crashes; see the module doc."""

    VERSION = 1

    def __init__(self, config: AlertsConfig, state_path: str, host: str,
                 channels: list[Channel] | None = None):
        self.state_path = state_path
        self.host = host
        self._lock = threading.Lock()
        self._alerts: dict[str, dict[str, Any]] = {}      # key -> condition, started, notified
        self._outbox: dict[str, list[dict[str, Any]]] = {}  # channel id -> notifications owed
        self._retry: dict[str, tuple[int, float]] = {}      # channel id -> (failures in a row, next try)
        self._load()
        self.configure(config, channels)

    # -- state ------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.state_path) as f:
                raw = json.load(f)
            self._alerts = dict(raw.get("alerts", {}))
            self._outbox = {k: list(v) for k, v in raw.get("outbox", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError, TypeError) as e:
            # Written atomically, so this is damage from outside: keep it for a look and
            # start afresh (what holds now fires again: a duplicate, never a loss).
            aside = self.state_path + ".bad"
            with contextlib.suppress(OSError):
                os.replace(self.state_path, aside)
            log.warning("alerts: state %s unreadable (%s), moved to %s", self.state_path, e, aside)
            self._alerts, self._outbox = {}, {}

    def _save(self) -> None:
        """tmp + fsync + rename + fsync of the directory: the old state or the new."""
        data = json.dumps({"version": self.VERSION, "host": self.host, "alerts": self._alerts,
                           "outbox": self._outbox}, indent=1, sort_keys=True)
        directory = os.path.dirname(os.path.abspath(self.state_path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def configure(self, config: AlertsConfig, channels: list[Channel] | None = None) -> None:
        """(Re)load the [alerts] table: a policy reload calls this. The outboxes of
        channels no longer configured are dropped, with one log line each."""
        with self._lock:
            self.config = config
            self.channels = build_channels(config, self.host) if channels is None else channels
            ids = {c.id for c in self.channels}
            for cid in [c for c in self._outbox if c not in ids]:
                if self._outbox[cid]:
                    log.warning("alerts: %d notification(s) for a channel no longer configured dropped",
                                len(self._outbox[cid]))
                del self._outbox[cid]

    def active_keys(self) -> set[str]:
        """The keys firing now (as far as this manager has been told)."""
        with self._lock:
            return set(self._alerts)

    def pending(self) -> dict[str, int]:
        """Notifications each channel is still owed, by channel id."""
        with self._lock:
            return {cid: len(q) for cid, q in self._outbox.items() if q}

    # -- evaluation ---------------------------------------------------------------------
    def _queue(self, n: Notification) -> None:
        item = n.to_json()
        for ch in self.channels:
            q = self._outbox.setdefault(ch.id, [])
            key = n.condition.key
            if n.status == "resolved" or n.reminder:
                # A reminder not yet sent is superseded by a newer one or by the resolve.
                q[:] = [x for x in q if not (x["condition"]["key"] == key and x["reminder"])]
            if n.reminder and any(x["condition"]["key"] == key and x["status"] == "firing" for x in q):
                continue    # the first firing is still owed: it says the same, newer
            q.append(item)

    def evaluate(self, active: dict[str, Condition], now: float) -> list[Notification]:
        """Queue what changed since the last evaluation (and reminders due) for every
        channel, persist, and return the notifications made."""
        made: list[Notification] = []
        with self._lock:
            for key, cond in active.items():
                entry = self._alerts.get(key)
                if entry is None:
                    self._alerts[key] = {"condition": asdict(cond), "started": now, "notified": now}
                    made.append(Notification("firing", cond, now, now))
                    continue
                entry["condition"] = asdict(cond)
                if now - entry["notified"] >= self.config.remind:
                    entry["notified"] = now
                    made.append(Notification("firing", cond, entry["started"], now, reminder=True))
            for key in [k for k in self._alerts if k not in active]:
                entry = self._alerts.pop(key)
                made.append(Notification("resolved", Condition(**entry["condition"]), entry["started"], now))
            for n in made:
                self._queue(n)
            if made or not os.path.exists(self.state_path):
                self._save()
        return made

    def deliver(self, now: float | None = None) -> list[tuple[str, str]]:
        """Send what each channel is owed, oldest first. A channel that fails keeps the
        rest of its outbox (one log line) and the others go on. Given `now`, a channel
        that failed is tried again RETRY_FIRST later, doubling to RETRY_MAX, so a
        blackholed endpoint does not hold up every tick of the agent for its timeout;
        without it every channel owed something is tried. Returns (channel name,
        error) for each channel that failed."""
        failures = []
        with self._lock:
            for ch in self.channels:
                q = self._outbox.get(ch.id, [])
                fails, next_try = self._retry.get(ch.id, (0, 0.0))
                if not q or (now is not None and now < next_try):
                    continue
                while q:
                    try:
                        ch.send(Notification.from_json(q[0]))
                    except Exception as e:  # noqa: BLE001 - a broken channel must never stop the others
                        wait = min(RETRY_MAX, RETRY_FIRST * 2 ** fails)
                        self._retry[ch.id] = (fails + 1, (now if now is not None else 0.0) + wait)
                        log.warning("alerts: %s failed: %s (%d notification(s) kept to retry)", ch.name,
                                    _one_line(e), len(q))
                        failures.append((ch.name, _one_line(e)))
                        break
                    self._retry.pop(ch.id, None)
                    q.pop(0)
                    self._save()
        return failures

    def run(self, active: dict[str, Condition], now: float) -> list[Notification]:
        """evaluate() then deliver(now): the agent calls this after each report."""
        made = self.evaluate(active, now)
        self.deliver(now)
        return made

    def check(self, report: Report, now: float) -> list[Notification]:
        """The conditions of `report`, evaluated and delivered."""
        return self.run(conditions(report, self.config, now, self.active_keys()), now)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
