"""Reading a policy file: TOML in, a checked `model.Policy` out, or every problem as `file:line: ...`.

Everything a run could trip over later is refused here, when the file is loaded
(at `policy check`, at agent start and at each reload): unknown keys (with the
nearest known one suggested), bad durations, sizes, times and weekdays, windows
that can never hold a run, schedules that cannot meet the RPO, unknown
repositories, unreadable password files.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Callable

import tomli as tomllib  # tomllib is TOML 1.0: no newlines in inline tables

from ..errors import InvalidArgument
from ..retention import Policy as KeepRules
from ..units import parse_size
from . import timetext, windows
from .model import (
    AgentConfig,
    AlertsConfig,
    BackupRule,
    CopyRule,
    DateRange,
    DrillRule,
    EmailConfig,
    MetricsConfig,
    Policy,
    Repository,
    Schedule,
    SnapshotRule,
    TimeRange,
    VerifyRule,
    VolumeRule,
    WebhookTarget,
    Window,
)
from .toml_lines import LineMap, Path

MEDIA = ("disk", "object", "tape", "optical", "cloud", "removable")
CHECKS = ("fsck", "postgres", "mariadb")
WEBHOOK_FORMATS = ("json", "alertmanager", "ntfy", "slack")


class PolicyError(InvalidArgument):
    """A policy that cannot be used; `problems` holds every `file:line: what` found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


class _Reader:
    """Takes typed values out of tables, noting each problem with its line."""

    def __init__(self, path: str, lines: LineMap):
        self.path, self.lines = path, lines
        self.problems: list[str] = []

    def problem(self, at: Path, message: str) -> None:
        self.problems.append(f"{self.path}:{self.lines.line(at)}: {message}")

    def known(self, table: dict, at: Path, allowed: tuple[str, ...], what: str) -> None:
        for key in table:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, 1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(allowed)})"
                self.problem(at + (key,), f"unknown key {key!r} in {what}{hint}")

    def get(self, table: dict, at: Path, key: str, kind: type | tuple, default: Any = None) -> Any:
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
            self.problem(at + (key,), f"{key} must be {_kind_name(kind)}, not true/false")
            return default
        if not isinstance(value, kind):
            self.problem(at + (key,), f"{key} must be {_kind_name(kind)}, not {type(value).__name__}")
            return default
        return value

    def parse(self, table: dict, at: Path, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        if key not in table:
            return default
        try:
            return fn(table[key])
        except (ValueError, InvalidArgument) as e:
            self.problem(at + (key,), f"{key}: {e}")
            return default

    def strings(self, table: dict, at: Path, key: str) -> list[str]:
        value = table.get(key, [])
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(at + (key,), f"{key} must be a string or a list of strings")
            return []
        return value


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             dict: "a table", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load(path: str) -> Policy:
    """The policy in `path`, checked; PolicyError with every problem otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InvalidArgument(f"{path}: {e.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise PolicyError([f"{path}:1: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError([f"{path}:{_toml_line(str(e))}: {str(e).split(' (at line')[0]}"]) from None
    r = _Reader(path, LineMap(text))
    policy = _policy(r, data, path)
    if r.problems:
        raise PolicyError(r.problems)
    return policy


def _toml_line(message: str) -> int:
    import re
    m = re.search(r"at line (\d+)", message)
    return int(m.group(1)) if m else 1


def _policy(r: _Reader, data: dict, path: str) -> Policy:
    r.known(data, (), ("timezone", "repository", "volume", "alerts", "metrics", "agent"), "the policy")
    p = Policy(path=os.path.abspath(path))
    p.timezone = r.get(data, (), "timezone", str)
    if p.timezone:
        try:
            windows.zone(p.timezone)
        except (KeyError, ValueError):
            r.problem(("timezone",), f"unknown time zone {p.timezone!r} (use e.g. Europe/Berlin)")
            p.timezone = None
    repos = r.get(data, (), "repository", list, [])
    for i, t in enumerate(repos):
        repo = _repository(r, t, ("repository", i)) if isinstance(t, dict) else None
        if repo is None:
            continue
        if repo.name in p.repositories:
            r.problem(("repository", i, "name"), f"repository {repo.name!r} is defined twice")
        p.repositories[repo.name] = repo
    for i, t in enumerate(r.get(data, (), "volume", list, [])):
        if isinstance(t, dict):
            rule = _volume(r, t, ("volume", i), p.repositories)
            if rule:
                p.volumes.append(rule)
    if not p.volumes and "volume" not in data:
        r.problem((), "no [[volume]] table: the policy protects nothing")
    p.alerts = _alerts(r, r.get(data, (), "alerts", dict, {}), ("alerts",))
    p.metrics = _metrics(r, r.get(data, (), "metrics", dict, {}), ("metrics",))
    agent = r.get(data, (), "agent", dict, {})
    r.known(agent, ("agent",), ("parallel", "tick"), "[agent]")
    p.agent = AgentConfig(parallel=r.get(agent, ("agent",), "parallel", int, 2),
                          tick=r.parse(agent, ("agent",), "tick", timetext.duration, 5.0))
    if p.agent.parallel < 1:
        r.problem(("agent", "parallel"), "parallel must be at least 1")
    return p


def _readable(r: _Reader, at: Path, key: str, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            if not f.read().strip():
                r.problem(at + (key,), f"{key} {path} is empty")
    except OSError as e:
        r.problem(at + (key,), f"{key} {path}: {e.strerror}")


def _repository(r: _Reader, t: dict, at: Path) -> Repository | None:
    r.known(t, at, ("name", "url", "endpoint", "password_file", "medium", "offsite", "quota"), "[[repository]]")
    name, url = r.get(t, at, "name", str), r.get(t, at, "url", str)
    if not name or not url:
        r.problem(at, "a [[repository]] needs a name and a url")
        return None
    if not url.startswith(("file://", "s3://")):
        r.problem(at + ("url",), f"url {url!r}: use file:///PATH or s3://BUCKET[/PREFIX]")
    repo = Repository(name=name, url=url, endpoint=r.get(t, at, "endpoint", str),
                      password_file=r.get(t, at, "password_file", str),
                      medium=r.get(t, at, "medium", str, "object" if url.startswith("s3://") else "disk"),
                      offsite=r.get(t, at, "offsite", bool, False),
                      quota=r.parse(t, at, "quota", parse_size), line=r.lines.line(at))
    if repo.medium not in MEDIA:
        r.problem(at + ("medium",), f"medium {repo.medium!r}: use one of {', '.join(MEDIA)}")
    if repo.password_file is None:
        r.problem(at, f"repository {name!r} needs password_file (the agent never prompts)")
    _readable(r, at, "password_file", repo.password_file)
    return repo


def _schedule(r: _Reader, t: dict, at: Path, default_every: float | None) -> Schedule:
    every = r.parse(t, at, "every", timetext.duration)
    at_times = [r.parse({"at": x}, at, "at", timetext.time_of_day) for x in r.strings(t, at, "at")]
    days = r.parse(t, at, "days", timetext.weekdays, list(range(7)))
    if every is not None and at_times:
        r.problem(at + ("at",), "give every or at, not both")
    if every is None and not at_times:
        every = default_every
    return Schedule(every=every, at=[a % 1440 for a in at_times if a is not None], days=days)


def _window(r: _Reader, t: dict, at: Path) -> Window:
    w = Window()
    spec = t.get("window")
    if isinstance(spec, dict):
        r.known(spec, at + ("window",), ("times", "days"), "window")
        w.days = r.parse(spec, at + ("window",), "days", timetext.weekdays, w.days)
        spec = spec.get("times", [])
    elif "window_days" in t:
        w.days = r.parse(t, at, "window_days", timetext.weekdays, w.days)
    for text in ([spec] if isinstance(spec, str) else spec or []):
        rng = r.parse({"window": text}, at, "window", timetext.time_range)
        if rng:
            w.ranges.append(rng)
    for text in r.strings(t, at, "except"):
        ex = r.parse({"except": text}, at, "except", timetext.exclusion)
        if isinstance(ex, TimeRange):
            w.except_times.append(ex)
        elif isinstance(ex, DateRange):
            w.except_dates.append(ex)
    if (w.ranges or w.except_times) and windows.open_minutes_per_week(w) == 0:
        r.problem(at + ("window",), "the window is never open (its exclusions cover all of it): "
                                    "no run could ever start")
    return w


def _keep(r: _Reader, t: Any, at: Path) -> KeepRules | None:
    if t is None:
        return None
    if not isinstance(t, dict):
        r.problem(at, "must be a table like { daily = 7, weekly = 4 }")
        return None
    keys = ("last", "hourly", "daily", "weekly", "monthly", "yearly", "within")
    r.known(t, at, keys, at[-1])
    rules = KeepRules(**{k: r.get(t, at, k, int, 0) for k in keys[:-1]},
                      within=r.parse(t, at, "within", timetext.duration, 0.0))
    if any(getattr(rules, k) < 0 for k in keys[:-1]):
        r.problem(at, "counts must not be negative")
    if rules.empty():
        r.problem(at, f"{at[-1]} keeps nothing: give at least one of {', '.join(keys)}")
    return rules


def _volume(r: _Reader, t: dict, at: Path, repos: dict[str, Repository]) -> VolumeRule | None:
    r.known(t, at, ("match", "rpo", "rto", "snapshot", "keep_snapshots", "backup", "keep_backups", "copy",
                    "verify", "drill"), "[[volume]]")
    match = r.strings(t, at, "match")
    if not match:
        r.problem(at, "a [[volume]] needs match = [\"name\" or \"glob*\", ...]")
        return None
    v = VolumeRule(match=match, rpo=r.parse(t, at, "rpo", timetext.duration),
                   rto=r.parse(t, at, "rto", timetext.duration), line=r.lines.line(at))

    def ref(where: Path, name: object) -> None:
        if name not in repos:
            known = ", ".join(repos) or "none defined"
            r.problem(where, f"unknown repository {name!r} (repositories: {known})")

    if (s := r.get(t, at, "snapshot", dict)) is not None:
        sa = at + ("snapshot",)
        r.known(s, sa, ("every", "at", "days", "freeze", "pg", "mysql", "pre", "post", "timeout"), "snapshot")
        v.snapshot = SnapshotRule(schedule=_schedule(r, s, sa, v.rpo), freeze=r.strings(s, sa, "freeze"),
                                  pg=r.strings(s, sa, "pg"), mysql=r.strings(s, sa, "mysql"),
                                  pre=r.strings(s, sa, "pre"), post=r.strings(s, sa, "post"),
                                  timeout=r.parse(s, sa, "timeout", timetext.duration, 10.0), line=r.lines.line(sa))
        if v.snapshot.schedule.every is None and not v.snapshot.schedule.at:
            r.problem(sa, "snapshot needs every = \"15m\" or at = [\"02:00\"] (or an rpo to derive it from)")
        if v.snapshot.timeout > 60:
            r.problem(sa + ("timeout",), "timeout: the freeze timeout is capped at 60s")
    v.keep_snapshots = _keep(r, t.get("keep_snapshots"), at + ("keep_snapshots",))
    if (b := r.get(t, at, "backup", dict)) is not None:
        ba = at + ("backup",)
        r.known(b, ba, ("to", "every", "at", "days", "full", "differential", "window", "window_days", "except"),
                "backup")
        to = r.strings(b, ba, "to")
        for name in to:
            ref(ba + ("to",), name)
        if not to:
            r.problem(ba, "backup needs to = [\"repository name\", ...]")
        v.backup = BackupRule(to=to, schedule=_schedule(r, b, ba, v.rpo), window=_window(r, b, ba),
                              full=r.parse(b, ba, "full", timetext.weekdays, []),
                              differential=r.parse(b, ba, "differential", timetext.weekdays, []),
                              line=r.lines.line(ba))
        if v.backup.schedule.every is None and not v.backup.schedule.at:
            v.backup.schedule.every = 86400.0
        if set(v.backup.full) & set(v.backup.differential):
            r.problem(ba + ("differential",), "a weekday cannot be both full and differential")
    v.keep_backups = _keep(r, t.get("keep_backups"), at + ("keep_backups",))
    copies = t.get("copy", [])
    for i, c in enumerate(copies if isinstance(copies, list) else [copies]):
        ca = at + ("copy", i) if isinstance(copies, list) else at + ("copy",)
        if not isinstance(c, dict):
            r.problem(ca, "copy entries are tables like { from = \"local\", to = \"cloud\", every = \"1d\" }")
            continue
        r.known(c, ca, ("from", "to", "every", "window", "window_days", "except"), "copy")
        src, dst = r.get(c, ca, "from", str), r.get(c, ca, "to", str)
        if not src or not dst:
            r.problem(ca, "copy needs from and to")
            continue
        ref(ca + ("from",), src)
        ref(ca + ("to",), dst)
        if src == dst:
            r.problem(ca + ("to",), "copy from a repository to itself")
        v.copy.append(CopyRule(source=src, dest=dst, every=r.parse(c, ca, "every", timetext.duration, 86400.0),
                               window=_window(r, c, ca), line=r.lines.line(ca)))
    if (vt := r.get(t, at, "verify", dict)) is not None:
        va = at + ("verify",)
        r.known(vt, va, ("cycle", "budget"), "verify")
        v.verify = VerifyRule(cycle=r.parse(vt, va, "cycle", timetext.duration, 30 * 86400.0),
                              budget=r.parse(vt, va, "budget", parse_size, 1 << 30), line=r.lines.line(va))
        if v.verify.budget <= 0:
            r.problem(va + ("budget",), "budget must be more than 0")
    if (d := r.get(t, at, "drill", dict)) is not None:
        v.drill = _drill(r, d, at + ("drill",), ref, v)
    _meets_rpo(r, v, at)
    return v


def _drill(r: _Reader, d: dict, da: Path, ref: Callable[[Path, object], None], v: VolumeRule) -> DrillRule:
    r.known(d, da, ("every", "check", "repository", "sql", "expect", "window", "window_days", "except"), "drill")
    checks = r.strings(d, da, "check") or ["fsck"]
    for c in checks:
        if c not in CHECKS and not c.startswith("command:"):
            r.problem(da + ("check",), f"check {c!r}: use fsck, postgres, mariadb or \"command:CMD\"")
    drill = DrillRule(every=r.parse(d, da, "every", timetext.duration, 7 * 86400.0), checks=checks,
                      repository=r.get(d, da, "repository", str), sql=r.get(d, da, "sql", str),
                      expect=r.get(d, da, "expect", str), window=_window(r, d, da), line=r.lines.line(da))
    if drill.repository:
        ref(da + ("repository",), drill.repository)
    elif not v.backup:
        r.problem(da, "drill needs a backup to test: give backup = { to = [...] } or drill.repository")
    return drill


def _meets_rpo(r: _Reader, v: VolumeRule, at: Path) -> None:
    """A schedule whose runs are further apart than the RPO can never meet it."""
    if v.rpo is None:
        return
    gaps = []
    if v.snapshot and v.snapshot.schedule.every:
        gaps.append(v.snapshot.schedule.every)
    if v.backup and v.backup.schedule.every and v.backup.window.always():
        gaps.append(v.backup.schedule.every)
    if not v.snapshot and not v.backup:
        r.problem(at + ("rpo",), "rpo without a snapshot or backup schedule to meet it")
    elif gaps and min(gaps) > v.rpo:
        r.problem(at + ("rpo",), f"rpo {timetext.format_duration(v.rpo)} cannot be met: the closest runs are "
                                 f"{timetext.format_duration(min(gaps))} apart")


def _alerts(r: _Reader, t: dict, at: Path) -> AlertsConfig:
    r.known(t, at, ("webhook", "email", "command", "ping", "storage_threshold", "remind", "late"), "[alerts]")
    a = AlertsConfig(command=r.get(t, at, "command", str), ping=r.get(t, at, "ping", str),
                     storage_threshold=float(r.get(t, at, "storage_threshold", (int, float), 0.9)),
                     remind=r.parse(t, at, "remind", timetext.duration, 4 * 3600.0),
                     late=r.parse(t, at, "late", timetext.duration, 30 * 60.0))
    if not 0 < a.storage_threshold <= 1:
        r.problem(at + ("storage_threshold",), "storage_threshold is a share between 0 and 1, e.g. 0.9")
    hooks = t.get("webhook", [])
    for i, h in enumerate(hooks if isinstance(hooks, list) else [hooks]):
        if isinstance(h, str):
            a.webhooks.append(WebhookTarget(url=h))
        elif isinstance(h, dict):
            ha = at + ("webhook",)
            r.known(h, ha, ("url", "format"), "webhook")
            fmt = r.get(h, ha, "format", str, "json")
            if fmt not in WEBHOOK_FORMATS:
                r.problem(ha + ("format",), f"format {fmt!r}: use one of {', '.join(WEBHOOK_FORMATS)}")
            if not r.get(h, ha, "url", str):
                r.problem(ha, "a webhook needs a url")
            else:
                a.webhooks.append(WebhookTarget(url=h["url"], format=fmt))
        else:
            r.problem(at + ("webhook",), f"webhook entry {i + 1} must be a URL or {{ url = ..., format = ... }}")
    for w in a.webhooks:
        if not w.url.startswith(("http://", "https://")):
            r.problem(at + ("webhook",), f"webhook {w.url!r} is not an http:// or https:// URL")
    if (e := r.get(t, at, "email", dict)) is not None:
        ea = at + ("email",)
        r.known(e, ea, ("to", "smtp", "from", "starttls", "user", "password_file"), "email")
        smtp = r.get(e, ea, "smtp", str, "127.0.0.1:25")
        if not _host_port(smtp):
            r.problem(ea + ("smtp",), f"smtp {smtp!r}: use HOST:PORT")
        a.email = EmailConfig(to=r.strings(e, ea, "to"), smtp=smtp, sender=r.get(e, ea, "from", str),
                              starttls=r.get(e, ea, "starttls", bool, False), username=r.get(e, ea, "user", str),
                              password_file=r.get(e, ea, "password_file", str))
        if not a.email.to:
            r.problem(ea, "email needs to = [\"address\", ...]")
        _readable(r, ea, "password_file", a.email.password_file)
    return a


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 <= int(port) < 65536


def _metrics(r: _Reader, t: dict, at: Path) -> MetricsConfig:
    r.known(t, at, ("listen", "textfile"), "[metrics]")
    m = MetricsConfig(listen=r.get(t, at, "listen", str, "127.0.0.1:9469") or None,
                      textfile=r.get(t, at, "textfile", str))
    if m.listen and not _host_port(m.listen):
        r.problem(at + ("listen",), f"listen {m.listen!r}: use HOST:PORT, e.g. 127.0.0.1:9469 (\"\" for none)")
    if m.textfile and not os.path.isdir(os.path.dirname(os.path.abspath(m.textfile))):
        r.problem(at + ("textfile",), f"textfile {m.textfile}: its directory does not exist")
    return m
