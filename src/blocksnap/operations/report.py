"""The status report: what `status`, the metrics and the alerts all say, computed once.

One structure feeds the table, `status --json`, the Prometheus metrics and the
agent's alert conditions, so the three can never disagree. Times are Unix
seconds (UTC); None means "never" or "unknown".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RepoCopy:
    """The newest backup of one volume in one repository (a copy for 3-2-1)."""

    repository: str                 # the policy's name for it
    url: str
    medium: str
    offsite: bool
    backup_id: str | None = None
    snapshot_created: float | None = None    # the recovery point this copy holds
    backup_time: float | None = None         # when the backup was made
    backups: int = 0                         # how many backups of the volume it holds


@dataclass
class JobStat:
    """Per (volume, kind, target): the last run and counters, from the job history."""

    volume: str
    kind: str                        # snapshot, backup, copy, verify, drill, retention
    target: str                      # repository name ('' for local jobs)
    last_result: str | None = None   # ok, failed, interrupted, stopped, running
    last_start: float | None = None
    last_end: float | None = None
    last_duration: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    failures_total: int = 0          # every failed or interrupted run ever recorded
    runs_total: int = 0
    last_failure: float | None = None        # end of the newest failed or interrupted run
    last_failure_result: str | None = None   # failed or interrupted

    @property
    def failing(self) -> bool:
        """Its newest failure is newer than its newest success (a retry running or
        stopped in between does not clear it: only a success does)."""
        if self.last_result in ("failed", "interrupted"):
            return True
        return self.last_failure is not None and (self.last_success is None or self.last_failure > self.last_success)


@dataclass
class Drill:
    """The newest restore drill of a volume."""

    time: float | None = None
    ok: bool | None = None
    rto_seconds: float | None = None
    backup_id: str | None = None
    error: str | None = None
    last_success: float | None = None


@dataclass
class VolumeReport:
    volume: str
    rpo: float | None                         # seconds, from the policy (None: no policy)
    newest_snapshot: str | None = None
    newest_snapshot_created: float | None = None
    recovery_point: float | None = None       # creation time of the newest restorable copy
    recovery_point_age: float | None = None   # now - recovery_point
    rpo_breached: bool = False
    copies: list[RepoCopy] = field(default_factory=list)
    copies_ok: int = 0                        # 3-2-1: copies counted (the live data is one)
    media: int = 0                            # distinct media among them
    offsite: int = 0                          # copies off site
    rule_321_met: bool = False
    next_runs: dict[str, float] = field(default_factory=dict)   # 'backup:local' -> time
    jobs: list[JobStat] = field(default_factory=list)
    drill: Drill = field(default_factory=Drill)
    rto_target: float | None = None
    rto_expected: dict[str, float | None] = field(default_factory=dict)   # hot, warm, cold
    hydration: dict | None = None             # an instant recovery still copying in (recovery/hydrate.py)


@dataclass
class RepositoryReport:
    name: str
    url: str
    medium: str = ""
    offsite: bool = False
    reachable: bool = True
    error: str | None = None
    bytes: int | None = None                  # stored (packs)
    quota: int | None = None
    used_ratio: float | None = None           # bytes / quota when a quota is set
    days_until_full: float | None = None
    verify_coverage: float | None = None      # share of stored bytes read back this cycle
    verify_cycle: float | None = None         # seconds
    corruption: list[str] = field(default_factory=list)   # problems verification found


@dataclass
class PoolReport:
    path: str
    size: int = 0
    used: int = 0
    used_ratio: float = 0.0
    days_until_full: float | None = None


@dataclass
class Report:
    time: float
    host: str
    pool: PoolReport | None
    volumes: list[VolumeReport] = field(default_factory=list)
    repositories: list[RepositoryReport] = field(default_factory=list)
    agent_heartbeat: float | None = None      # the agent's last loop, None if no agent ran
    policy_error: str | None = None           # a refused policy reload, still unresolved
    storage_threshold: float = 0.9

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
