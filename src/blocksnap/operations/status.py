"""Building the Report (report.py) from the pool, its job history, the policy and the repositories.

`status`, the metrics and the alerts all read the Report this builds, so they
agree. The pool is asked through the service layer (daemon or local); each
repository is read once per build (manifests and pack sizes), or taken from the
agent's cache (`RepoCache`) which it refreshes after a job that changes one.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlocksnapError, NotFound
from ..service.runner import call
from . import schedule
from .jobs import open_repository
from .model import Policy, Repository
from .report import Drill, JobStat, PoolReport, RepoCopy, Report, RepositoryReport, VolumeReport
from .schedule import JobFacts, VolumeFacts


@dataclass
class RepoView:
    """What one read of a repository says: its backups (manifest infos) and size."""

    report: RepositoryReport
    backups: list[dict[str, Any]] = field(default_factory=list)
    read_at: float = 0.0


def read_repository(repo: Repository, cycle: float | None, now: float) -> RepoView:
    rep = RepositoryReport(name=repo.name, url=repo.url, medium=repo.medium, offsite=repo.offsite, quota=repo.quota,
                           verify_cycle=cycle)
    try:
        r = open_repository(repo)
        infos = [dict(m.info, data_bytes=m.stored * int(m.info.get("chunk_size", 0))) for m in r.manifests()]
        rep.bytes = int(sum(r.backend.list("data").values()))
        if repo.quota:
            rep.used_ratio = rep.bytes / repo.quota
        if cycle:
            try:
                from ..backup.coverage import coverage
                rep.verify_coverage = coverage(r, cycle, now=now).get("coverage_ratio")
            except ImportError:      # verification coverage not available in this build
                rep.verify_coverage = None
        return RepoView(rep, infos, now)
    except NotFound as e:        # not made yet: its first backup or copy creates it
        rep.bytes, rep.error = 0, str(e)
        return RepoView(rep, [], now)
    except BlocksnapError as e:
        rep.reachable, rep.error = False, str(e)
        return RepoView(rep, [], now)


class RepoCache:
    """The agent's last reads of its repositories; stale after `ttl` or when marked."""

    def __init__(self, ttl: float = 300.0):
        self.ttl = ttl
        self.views: dict[str, RepoView] = {}

    def get(self, repo: Repository, cycle: float | None, now: float) -> RepoView:
        v = self.views.get(repo.name)
        if v is None or now - v.read_at >= self.ttl or v.report.url != repo.url:
            v = self.views[repo.name] = read_repository(repo, cycle, now)
        return v

    def invalidate(self, name: str) -> None:
        self.views.pop(name, None)


def gather_facts(pool: str) -> tuple[dict[str, Any], list[VolumeFacts], list[dict[str, Any]]]:
    """The pool's status, per-volume facts for the scheduler, and the history summary."""
    st = call(pool, "pool_status")
    snaps = call(pool, "snapshot_list")
    summary = call(pool, "job_summary")
    facts = {v["name"]: VolumeFacts(v["name"]) for v in st["volume_list"]}
    facts[""] = VolumeFacts("")
    for s in snaps:
        f = facts.get(s["volume"])
        if f:
            f.snapshot_names.add(s["name"])
            if f.newest_snapshot is None or s["created"] >= f.newest_snapshot:
                f.newest_snapshot, f.newest_name = s["created"], s["name"]
    for s in summary:
        f = facts.get(s["volume"])
        if f is not None:
            f.jobs[(s["kind"], s["target"])] = JobFacts.from_summary(s)
    return st, list(facts.values()), summary


def _job_stats(summary: list[dict[str, Any]], volume: str) -> list[JobStat]:
    out = []
    for s in summary:
        if s["volume"] != volume:
            continue
        last, ok, bad = s["last"], s.get("last_success"), s.get("last_failure")
        out.append(JobStat(volume=volume, kind=s["kind"], target=s["target"], last_result=last["result"],
                           last_failure=(bad["ended"] or bad["started"]) if bad else None,
                           last_failure_result=bad["result"] if bad else None,
                           last_start=last["started"], last_end=last["ended"],
                           last_duration=(last["ended"] - last["started"]) if last["ended"] else None,
                           last_success=ok["ended"] if ok else None, last_error=last["error"],
                           failures_total=s["failures"], runs_total=s["runs"]))
    return out


def _drill(summary: list[dict[str, Any]], volume: str) -> Drill:
    rows = [s for s in summary if s["volume"] == volume and s["kind"] == "drill"]
    if not rows:
        return Drill()
    s = max(rows, key=lambda x: x["last"]["started"])
    last, ok = s["last"], s.get("last_success")
    return Drill(time=last["ended"] or last["started"], ok={"ok": True, "running": None}.get(last["result"], False),
                 rto_seconds=(ok or {}).get("info", {}).get("rto_seconds"), backup_id=last["info"].get("backup_id"),
                 error=last["error"], last_success=ok["ended"] if ok else None)


def build_report(pool: str, policy: Policy | None, now: float | None = None, cache: RepoCache | None = None,
                 usage_data: dict | None = None, heartbeat: float | None = None,
                 policy_error: str | None = None) -> Report:
    from . import usage
    now = time.time() if now is None else now
    st, facts, summary = gather_facts(pool)
    host, pool_abs = socket.gethostname(), os.path.abspath(pool)
    usage_data = usage_data or {}
    pr = PoolReport(path=st["pool"], size=st["size"], used=st["used"],
                    used_ratio=st["used"] / st["size"] if st["size"] else 0.0,
                    days_until_full=usage.days_until_full(usage_data.get("pool", []), st["size"], now))
    report = Report(time=now, host=host, pool=pr, agent_heartbeat=heartbeat, policy_error=policy_error,
                    storage_threshold=policy.alerts.storage_threshold if policy else 0.9)
    plan = schedule.plan(policy, facts, now) if policy else []
    hydrating = {v["name"]: v["hydration"] for v in st["volume_list"] if v.get("hydration")}
    views: dict[str, RepoView] = {}
    if policy:
        cycles = schedule.verify_targets(policy, [f.name for f in facts if f.name])
        cache = cache or RepoCache()
        for name, repo in policy.repositories.items():
            v = views[name] = cache.get(repo, cycles.get(name, (None, 0))[0], now)
            v.report.days_until_full = usage.days_until_full(usage_data.get("repo:" + name, []), repo.quota, now)
            report.repositories.append(v.report)
            for s in summary:
                if s["kind"] == "verify" and s["target"] == name and s["last"]["result"] == "failed":
                    v.report.corruption = [s["last"]["error"] or "verification failed"]
    for f in facts:
        if not f.name:
            continue
        rule = policy.rule_for(f.name) if policy else None
        vr = VolumeReport(volume=f.name, rpo=rule.rpo if rule else None, rto_target=rule.rto if rule else None)
        vr.newest_snapshot, vr.newest_snapshot_created = f.newest_name, f.newest_snapshot
        vr.hydration = hydrating.get(f.name)
        vr.jobs = _job_stats(summary, f.name)
        vr.drill = _drill(summary, f.name)
        points = [f.newest_snapshot] if f.newest_snapshot else []
        media = {"disk"}
        offsite = 0
        for name, v in views.items():
            mine = [b for b in v.backups if (b.get("host"), b.get("pool"), b["source"]["volume"]) ==
                    (host, pool_abs, f.name)]
            if not mine and not (rule and rule.backup and name in rule.backup.to):
                continue
            repo = policy.repositories[name]
            copy = RepoCopy(repository=name, url=repo.url, medium=repo.medium, offsite=repo.offsite, backups=len(mine))
            if mine:
                newest = max(mine, key=lambda b: b["source"]["created"])
                copy.backup_id, copy.snapshot_created, copy.backup_time = \
                    newest["id"], newest["source"]["created"], newest["time"]
                points.append(copy.snapshot_created)
                media.add(repo.medium)
                offsite += bool(repo.offsite)
            vr.copies.append(copy)
        vr.copies_ok = 1 + sum(1 for c in vr.copies if c.backup_id)
        vr.media, vr.offsite = len(media), offsite
        vr.rule_321_met = vr.copies_ok >= 3 and vr.media >= 2 and vr.offsite >= 1
        vr.recovery_point = max(points) if points else None
        vr.recovery_point_age = now - vr.recovery_point if vr.recovery_point else None
        vr.rpo_breached = bool(vr.rpo) and (vr.recovery_point_age is None or vr.recovery_point_age > vr.rpo)
        for d in plan:
            if d.volume == f.name and math.isfinite(d.at):
                vr.next_runs[f"{d.kind}:{d.target}" if d.target else d.kind] = d.at
        vr.rto_expected = expected_rto(vr, views, summary, host, pool_abs)
        report.volumes.append(vr)
    return report


def _throughput(summary: list[dict[str, Any]], repository: str) -> float | None:
    """Bytes a second the repository was last read at: its last verification read its
    packs (download, decrypt, check: a restore's work but the write), else None."""
    for s in summary:
        ok = s.get("last_success")
        if s["kind"] == "verify" and s["target"] == repository and ok and ok["bytes_read"] and ok["ended"]:
            return ok["bytes_read"] / max(ok["ended"] - ok["started"], 1e-3)
    return None


def expected_rto(vr: VolumeReport, views: dict[str, RepoView], summary: list[dict[str, Any]], host: str,
                 pool: str) -> dict[str, float | None]:
    """The time a recovery of the newest backup would take (docs/operations.md, "RTO"):
    hot, the measured time of the last drill to a checked filesystem or database
    straight from the backup (what instant recovery gives); warm (hydration done,
    the volume in use from the hot time on) and cold (a full restore before anything
    starts), the backup's data bytes at the repository's measured read rate: both
    read every stored chunk once."""
    newest: tuple[float, dict[str, Any], str] | None = None
    for name, v in views.items():
        for b in v.backups:
            if (b.get("host"), b.get("pool"), b["source"]["volume"]) == (host, pool, vr.volume):
                if newest is None or b["source"]["created"] > newest[0]:
                    newest = (b["source"]["created"], b, name)
    hot = vr.drill.rto_seconds if vr.drill.ok else None
    if newest is None:
        return {"hot": hot, "warm": None, "cold": None}
    rate = _throughput(summary, newest[2])
    cold = newest[1]["data_bytes"] / rate if rate else None
    return {"hot": hot, "warm": cold, "cold": cold, "bytes": float(newest[1]["data_bytes"]), "rate": rate}


STATE_FILE = "state.json"


def write_agent_state(directory: str, heartbeat: float, policy_error: str | None, pid: int) -> None:
    """What a `status` in another process needs of the agent: that it lives, and a refused policy."""
    import json
    import tempfile
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state.")
    with os.fdopen(fd, "w") as f:
        json.dump({"heartbeat": heartbeat, "policy_error": policy_error, "pid": pid}, f)
    os.replace(tmp, os.path.join(directory, STATE_FILE))


def read_agent_state(directory: str) -> tuple[float | None, str | None]:
    import json
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            data = json.load(f)
        return data.get("heartbeat"), data.get("policy_error")
    except (OSError, ValueError):
        return None, None
