"""The policy, as data: what `policy.load` builds from the TOML file.

Durations are seconds, sizes bytes, times of day minutes after midnight, weekdays
0 (Monday) to 6. Every object keeps the line of the file it came from, so later
checks (an unknown repository, a window that cannot hold a run) can still say
`file:line`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..retention import Policy as KeepRules


@dataclass
class Repository:
    name: str
    url: str
    endpoint: str | None = None
    password_file: str | None = None
    medium: str = "disk"
    offsite: bool = False
    quota: int | None = None              # bytes; storage alert threshold applies to it
    line: int = 0


@dataclass
class TimeRange:
    """Minutes after midnight, [start, end); end <= start crosses midnight."""

    start: int
    end: int

    def crosses_midnight(self) -> bool:
        return self.end <= self.start


@dataclass
class DateRange:
    """Whole local days, inclusive: 'YYYY-MM-DD/YYYY-MM-DD' (or one day)."""

    first: str      # ISO dates, compared as strings
    last: str


@dataclass
class Window:
    """When a job may run: a daily time range on some weekdays, minus exclusions.

    A range that crosses midnight belongs to the weekday it starts on."""

    ranges: list[TimeRange] = field(default_factory=list)   # empty: all day
    days: list[int] = field(default_factory=lambda: list(range(7)))
    except_dates: list[DateRange] = field(default_factory=list)
    except_times: list[TimeRange] = field(default_factory=list)

    def always(self) -> bool:
        return not self.ranges and len(self.days) == 7 and not self.except_dates and not self.except_times


@dataclass
class Schedule:
    """An interval, or times of day (on weekdays)."""

    every: float | None = None
    at: list[int] = field(default_factory=list)     # minutes after midnight
    days: list[int] = field(default_factory=lambda: list(range(7)))


@dataclass
class SnapshotRule:
    schedule: Schedule
    freeze: list[str] = field(default_factory=list)
    pg: list[str] = field(default_factory=list)
    mysql: list[str] = field(default_factory=list)
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    timeout: float = 10.0
    line: int = 0


@dataclass
class BackupRule:
    to: list[str]
    schedule: Schedule
    window: Window = field(default_factory=Window)
    full: list[int] = field(default_factory=list)           # weekdays a backup is full
    differential: list[int] = field(default_factory=list)   # weekdays it is differential
    line: int = 0


@dataclass
class CopyRule:
    source: str
    dest: str
    every: float
    window: Window = field(default_factory=Window)
    line: int = 0


@dataclass
class VerifyRule:
    cycle: float
    budget: int
    line: int = 0


@dataclass
class DrillRule:
    every: float
    checks: list[str] = field(default_factory=lambda: ["fsck"])
    repository: str | None = None         # default: the first backup target
    sql: str | None = None
    expect: str | None = None
    window: Window = field(default_factory=Window)
    line: int = 0


@dataclass
class VolumeRule:
    match: list[str]
    rpo: float | None = None
    rto: float | None = None
    snapshot: SnapshotRule | None = None
    keep_snapshots: KeepRules | None = None
    backup: BackupRule | None = None
    keep_backups: KeepRules | None = None
    copy: list[CopyRule] = field(default_factory=list)
    verify: VerifyRule | None = None
    drill: DrillRule | None = None
    line: int = 0

    def matches(self, volume: str) -> bool:
        return any(fnmatch.fnmatchcase(volume, pattern) for pattern in self.match)


@dataclass
class WebhookTarget:
    url: str
    format: str = "json"          # json, alertmanager, ntfy, slack


@dataclass
class EmailConfig:
    to: list[str]
    smtp: str                     # host:port
    sender: str | None = None     # From:, default blocksnap@<host>
    starttls: bool = False
    username: str | None = None
    password_file: str | None = None


@dataclass
class AlertsConfig:
    webhooks: list[WebhookTarget] = field(default_factory=list)
    email: EmailConfig | None = None
    command: str | None = None
    ping: str | None = None       # healthchecks-style base URL: URL/start, URL, URL/fail
    storage_threshold: float = 0.9
    remind: float = 4 * 3600.0
    late: float = 30 * 60.0       # a job this far past due is late


@dataclass
class MetricsConfig:
    listen: str | None = "127.0.0.1:9469"
    textfile: str | None = None


@dataclass
class AgentConfig:
    parallel: int = 2             # jobs of different volumes at once
    tick: float = 5.0             # seconds between looks at the clock, at most


@dataclass
class Policy:
    path: str
    timezone: str | None = None
    repositories: dict[str, Repository] = field(default_factory=dict)
    volumes: list[VolumeRule] = field(default_factory=list)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def rule_for(self, volume: str) -> VolumeRule | None:
        """The first [[volume]] table whose match names the volume."""
        return next((r for r in self.volumes if r.matches(volume)), None)
