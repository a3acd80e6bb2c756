"""Carrying out one due job: a snapshot, a backup, a copy, a verification, a drill.

Each runner takes the job (schedule.Due), what it needs to reach the pool and the
repositories, and a `Stop` that says when to give up (the window closed, the
agent is ending); it returns the outcome for the history. Retention follows
each success: local snapshots after a snapshot, backups after a backup or copy,
never removing a snapshot a repository still needs as the base of its next
incremental (or a stopped backup continues from).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BlocksnapError, InvalidArgument, NotFound
from ..retention import Policy as KeepRules
from ..retention import decide
from ..service.runner import call
from ..service.snapshots import create_snapshot
from ..settings import Settings
from .model import Policy, Repository, VolumeRule
from .schedule import Due, VolumeFacts

AGENT_LABEL = "made-by"          # label on the snapshots the agent takes (only those it prunes)
AGENT_LABEL_VALUE = "agent"


class Stopped(BlocksnapError):
    """The job's window closed or the agent is stopping: cut short cleanly."""


@dataclass
class Stop:
    """When a job must stop: a deadline (its window) or the agent's own stop event."""

    deadline: float
    event: threading.Event
    clock: Callable[[], float] = time.time

    def check(self) -> None:
        if self.event.is_set():
            raise Stopped("the agent is stopping")
        if self.clock() >= self.deadline:
            raise Stopped("the backup window closed")

    def progress(self, _done: int = 0, _total: int = 0) -> None:
        self.check()


@dataclass
class Outcome:
    result: str = "ok"
    bytes_read: int = 0
    bytes_stored: int = 0
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobEnv:
    pool: str
    policy: Policy
    settings: Settings
    in_use: set[str] = field(default_factory=set)     # VOLUME@NAME read by running jobs (agent-wide)
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock)   # agent-wide: naming and taking
    host: str = field(default_factory=socket.gethostname)

    @property
    def origin(self) -> dict[str, str]:
        return {"host": self.host, "pool": os.path.abspath(self.pool)}


def open_repository(repo: Repository, create: bool = False):
    """The policy's repository, its password read from its file (the agent never prompts)."""
    from ..backup.repo import Repository as Repo

    def password(_new: bool) -> bytes:
        try:
            with open(repo.password_file or "", "rb") as f:
                pw = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise InvalidArgument(f"repository {repo.name}: {repo.password_file}: {e.strerror}") from None
        if not pw:
            raise InvalidArgument(f"repository {repo.name}: {repo.password_file} is empty")
        return pw
    return Repo.open(repo.url, password, repo.endpoint, create)[0]


def snapshot_name(now: float) -> str:
    return "auto-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def take_snapshot(env: JobEnv, rule: VolumeRule, volume: str, now: float) -> dict[str, Any]:
    s = rule.snapshot
    kw: dict[str, Any] = {}
    if s:
        kw = dict(fs=s.freeze, pg=s.pg, mysql=s.mysql, pre=s.pre, post=s.post, timeout=s.timeout)
    with env.snapshot_lock:      # the snapshot job and a backup needing one may both take one this second
        taken = {x["name"] for x in call(env.pool, "snapshot_list", volume=volume)}
        base = name = snapshot_name(now)
        n = 1
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return create_snapshot(env.pool, f"{volume}@{name}", {AGENT_LABEL: AGENT_LABEL_VALUE},
                               settings=env.settings, **kw)


def protected_snapshots(facts: VolumeFacts) -> set[str]:
    """Snapshots a repository's next run needs: the newest backup's (incremental
    base), the newest full's (differential base), a stopped backup's."""
    keep = set()
    for (kind, _target), f in facts.jobs.items():
        if kind != "backup":
            continue
        for row in (f.last_ok, f.last_full, f.last):
            if row and row.get("info", {}).get("snapshot") and row["result"] in ("ok", "stopped"):
                keep.add(row["info"]["snapshot"])
    return keep


def prune_snapshots(env: JobEnv, volume: str, rules: KeepRules, protected: set[str], now: float) -> dict:
    snaps = [s for s in call(env.pool, "snapshot_list", volume=volume)
             if s["labels"].get(AGENT_LABEL) == AGENT_LABEL_VALUE]
    d = decide([(s["name"], s["created"]) for s in snaps], rules, now)
    removed, kept_for_base = [], []
    for name in d.remove:
        if name in protected or f"{volume}@{name}" in env.in_use:
            kept_for_base.append(name)
            continue
        try:
            call(env.pool, "snapshot_delete", ref=f"{volume}@{name}")
            removed.append(name)
        except NotFound:
            pass
    return {"removed": removed, "kept_as_base": kept_for_base}


def run_snapshot(env: JobEnv, rule: VolumeRule, due: Due, facts: VolumeFacts, now: float) -> Outcome:
    info = take_snapshot(env, rule, due.volume, now)
    out = Outcome(info={"snapshot": info["name"], "snapshot_created": info["created"],
                        "consistency": info["consistency"]})
    if rule.keep_snapshots:
        facts.snapshot_names.add(info["name"])
        out.info["retention"] = prune_snapshots(env, due.volume, rule.keep_snapshots, protected_snapshots(facts),
                                                time.time())
    return out


def _backup_source(env: JobEnv, rule: VolumeRule, due: Due, now: float) -> dict[str, Any]:
    """The snapshot to back up: a stopped run's, else the newest if it is fresh, else a new one."""
    snaps = call(env.pool, "snapshot_list", volume=due.volume)
    if due.snapshot:
        hit = [s for s in snaps if s["name"] == due.snapshot]
        if hit:
            return hit[0]
    every = rule.backup.schedule.every if rule.backup and rule.backup.schedule.every else 3600.0
    fresh = [s for s in snaps if s["created"] >= now - min(every, rule.rpo or every)]
    if fresh:
        return max(fresh, key=lambda s: s["created"])
    return take_snapshot(env, rule, due.volume, now)


def run_backup(env: JobEnv, rule: VolumeRule, due: Due, stop: Stop, now: float) -> Outcome:
    from ..backup.make import make_backup, piped
    snap = _backup_source(env, rule, due, now)
    ref = f"{due.volume}@{snap['name']}"
    info = {"snapshot": snap["name"], "snapshot_created": snap["created"], "requested_mode": due.mode}
    repo = open_repository(env.policy.repositories[due.target], create=True)

    def created(r: str) -> float | None:
        try:
            return call(env.pool, "snapshot_show", ref=r)["created"]
        except NotFound:
            return None

    def produce(fd: int, base: str | None, start: int) -> dict:
        return call(env.pool, "send", ref=ref, fd=fd, base=base, start=start)

    env.in_use.add(ref)
    try:
        res = make_backup(repo, env.origin, ref, due.mode or "incremental", piped(produce), created,
                          stop.progress)
    except Stopped as e:
        return Outcome("stopped", error=str(e), info=info)
    finally:
        env.in_use.discard(ref)
    st = res["stats"]
    out = Outcome(bytes_read=st["read_bytes"], bytes_stored=st["new_bytes"],
                  info=dict(info, mode=res["mode"], backup_id=res["id"], base=res.get("base"), note=res.get("note")))
    if rule.keep_backups:
        group = (env.origin["host"], env.origin["pool"], due.volume)
        out.info["retention"] = prune_backups(repo, rule.keep_backups, group, stop)
    return out


PRUNE_TRIES = 6      # a prune needs the repository alone: wait 1, 2, 4... s for other jobs' locks


def prune_backups(repo, rules: KeepRules, group: tuple[str, str, str], stop: Stop) -> dict[str, Any]:
    """Retention after a success. It needs the repository alone, so another volume's
    backup or a copy there makes it wait a little, then give up until the next success
    (it is not this job's failure: the backup is made and kept)."""
    from ..backup.maintain import prune
    from ..errors import Busy
    for attempt in range(PRUNE_TRIES):
        try:
            pr = prune(repo, rules, groups={group})
            return {"removed": pr["removed"], "packs_deleted": pr["packs_deleted"]}
        except Busy as e:
            if attempt == PRUNE_TRIES - 1:
                return {"deferred": str(e)}
            stop.event.wait(2 ** attempt)
        except BlocksnapError as e:
            return {"error": str(e)}
    return {}


def run_copy(env: JobEnv, rule: VolumeRule, due: Due, stop: Stop) -> Outcome:
    from ..backup.copy import copy_backups
    src = open_repository(env.policy.repositories[due.source or ""])
    dst = open_repository(env.policy.repositories[due.target], create=True)
    group = (env.origin["host"], env.origin["pool"], due.volume)
    ids = [m.id for m in src.manifests() if m.group == group]
    try:
        res = copy_backups(src, dst, ids, stop.progress)
    except Stopped as e:
        return Outcome("stopped", error=str(e), info={"from": due.source})
    out = Outcome(bytes_read=res["bytes_fetched"], bytes_stored=res["bytes_sent"],
                  info={"from": due.source, "copied": res["copied"], "skipped": len(res["skipped"]),
                        "chunks_sent": res["chunks_sent"], "chunks_present": res["chunks_present"]})
    if rule.keep_backups:
        out.info["retention"] = prune_backups(dst, rule.keep_backups, group, stop)
    return out


def run_verify(env: JobEnv, due: Due, cycle: float, budget: int, stop: Stop) -> Outcome:
    from ..backup.coverage import verify_slice
    repo = open_repository(env.policy.repositories[due.target])
    res = verify_slice(repo, budget, cycle, progress=stop.progress)
    info = {k: v for k, v in res.items() if k != "problems"}
    info["problems"] = list(res.get("problems", []))[:20]
    if res.get("problems"):
        return Outcome("failed", bytes_read=res.get("bytes_read", 0),
                       error=f"corruption found in {due.target}: {res['problems'][0]}", info=info)
    return Outcome(bytes_read=res.get("bytes_read", 0), info=info)


def run_drill(env: JobEnv, rule: VolumeRule, due: Due, stop: Stop) -> Outcome:
    from ..recovery.drill import run_drill as drill
    repo = open_repository(env.policy.repositories[due.target])
    group = (env.origin["host"], env.origin["pool"], due.volume)
    ms = [m for m in repo.manifests() if m.group == group]
    if not ms:
        raise NotFound(f"no backup of {due.volume} in {due.target} to drill")
    from ..recovery.checks import parse_check
    assert rule.drill is not None
    checks = [parse_check(c, rule.drill.sql, rule.drill.expect) for c in rule.drill.checks]
    res = drill(repo, ms[-1].id, checks, progress=stop.progress, settings=env.settings)
    info = {"backup_id": ms[-1].id, "rto_seconds": res.get("rto_seconds"),
            "checks": [{k: c.get(k) for k in ("name", "ok", "seconds", "summary")} for c in res.get("checks", [])]}
    if not res.get("ok"):
        return Outcome("failed", error=res.get("error") or "drill failed", info=info)
    return Outcome(info=info)
