"""`blocksnap agent`: carries a policy out, by itself, until told to stop.

One loop: read the pool and the job history, ask the scheduler what is due,
start it (one job per volume at a time, up to `[agent] parallel` at once), then
publish the status report as metrics and alerts. Jobs run in threads of this
process; each records its start and end in the pool's job history, so a kill -9
loses no record: the next agent marks what was running 'interrupted', removes
the repository locks dead processes left, and the scheduler finds those jobs due
again. One agent per pool (a lock file), SIGHUP or a changed file reloads the
policy (a bad one is refused, the old one kept, and an alert says so), SIGTERM
stops running jobs cleanly (a backup keeps its checkpoint) and exits.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

from ..errors import BlocksnapError, Busy
from ..service.runner import call
from ..settings import Settings
from . import jobs, schedule
from .model import Policy
from .policy import PolicyError, load
from .schedule import Due
from .status import RepoCache, build_report, gather_facts

log = logging.getLogger("blocksnap.agent")
HEARTBEAT_EVERY = 300.0          # seconds between heartbeats written into each repository


def state_dir(pool: str) -> str:
    return os.path.join(os.path.abspath(pool), "agent")


class AgentLock:
    """One agent per pool: an flock held for the agent's life (the kernel drops it on kill -9)."""

    def __init__(self, pool: str):
        os.makedirs(state_dir(pool), exist_ok=True)
        self.path = os.path.join(state_dir(pool), "agent.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise Busy(f"another agent runs for this pool (pid {other or '?'})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


class Agent:
    def __init__(self, pool: str, policy_path: str, settings: Settings, *, once: bool = False,
                 clock: Callable[[], float] = time.time):
        self.pool, self.policy_path, self.settings, self.once, self.clock = pool, policy_path, settings, once, clock
        self.policy: Policy = load(policy_path)
        self.policy_mtime = _mtime(policy_path)
        self.policy_error: str | None = None
        self.stop_event = threading.Event()
        self.reload_asked = False
        self.running: dict[tuple[str, str, str], threading.Thread] = {}
        self.in_use: set[str] = set()      # snapshots running jobs read (VOLUME@NAME): never pruned
        self.snapshot_lock = threading.Lock()   # one snapshot taken at a time (names by the second)
        self.ran: set[tuple[str, str, str]] = set()
        self.cache = RepoCache()
        self.runner = f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat: float | None = None
        self.report = None
        self.report_host = socket.gethostname()
        self.heartbeat_every = HEARTBEAT_EVERY
        self.publisher = None

    # -- life --------------------------------------------------------------
    def run(self) -> int:
        lock = AgentLock(self.pool)
        try:
            self._install_signals()
            if not self.once:
                from ..service import daemon_spawn
                daemon_spawn.ensure(self.pool)     # jobs in parallel need the pool's owner to be a daemon
            self._recover()
            self.publisher = _publisher(self)
            while not self.stop_event.is_set():
                self._maybe_reload()
                try:
                    started = self._tick()
                except BlocksnapError as e:       # the daemon gone, the pool busy: say so, look again
                    if self.once:
                        raise
                    log.error("%s; trying again in %gs", e, self.policy.agent.tick)
                    self._revive()
                    started = 0
                if self.once and not started and not self.running:
                    break
                self.stop_event.wait(self._sleep())
        finally:
            self.stop_event.set()
            for t in list(self.running.values()):
                t.join()
            if self.publisher:
                self.publisher.close()
            lock.release()
        return 0

    def _revive(self) -> None:
        """The pool's daemon died under the agent: start it again (its own crash recovery runs)."""
        from ..service import daemon_spawn
        try:
            daemon_spawn.ensure(self.pool)
        except BlocksnapError as e:
            log.error("cannot start the pool's daemon: %s", e)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload_asked", True))

    def _recover(self) -> None:
        """After a crash: what was running is interrupted; dead processes' locks go."""
        for row in call(self.pool, "jobs_interrupt", ended=self.clock(),
                        note="interrupted: the agent ended before the job (killed or crashed)"):
            log.warning("job %s %s of %s was interrupted; it runs again", row["kind"], row["target"] or "",
                        row["volume"] or "the repository")
        for repo in self.policy.repositories.values():
            try:
                removed, _ = jobs.open_repository(repo).unlock(False)
                if removed:
                    log.info("removed %d stale locks in %s", removed, repo.name)
            except BlocksnapError as e:
                log.info("repository %s: %s", repo.name, e)

    def _maybe_reload(self) -> None:
        mtime = _mtime(self.policy_path)
        if not self.reload_asked and mtime == self.policy_mtime:
            return
        self.reload_asked, self.policy_mtime = False, mtime
        try:
            self.policy = load(self.policy_path)
            self.policy_error = None
            self.cache = RepoCache()
            log.info("policy %s reloaded", self.policy_path)
        except (PolicyError, BlocksnapError) as e:
            self.policy_error = f"policy {self.policy_path} refused, the previous one is kept: {e}"
            log.error("%s", self.policy_error)

    # -- one look at the clock ----------------------------------------------
    def _tick(self) -> int:
        self._install_signals()      # again: a drill's FUSE thread (libfuse) may have taken SIGTERM's handler
        now = self.clock()
        self.heartbeat = now
        self._reap()
        if not self.once:
            from ..service import daemon_spawn
            if daemon_spawn.status(self.pool) is None:
                log.error("the pool's daemon is not running: starting it")
                self._revive()
        _st, facts, _summary = gather_facts(self.pool)
        started = 0
        limit = self.policy.agent.parallel if not self.once else 1
        for d in schedule.plan(self.policy, facts, now):
            if d.at > now or len(self.running) >= limit:
                continue
            if self._busy(d) or (self.once and d.key in self.ran):
                continue
            self._start(d, next(f for f in facts if f.name == d.volume))
            started += 1
        self._publish(now)
        return started

    def _busy(self, d: Due) -> bool:
        """One job per volume at a time, except that snapshots (a metadata commit) go on
        while the volume's backup, copy or drill runs, so a long backup cannot break
        the RPO; a repository's verification apart from its volumes' jobs."""
        for vol, kind, target in self.running:
            if vol != d.volume:
                continue
            if not vol:
                if target == d.target:
                    return True
            elif (kind == "snapshot") == (d.kind == "snapshot"):
                return True
        return False

    def _start(self, d: Due, facts: schedule.VolumeFacts) -> None:
        t = threading.Thread(target=self._job, args=(d, facts), name=f"job {d.kind} {d.volume} {d.target}",
                             daemon=True)
        self.running[d.key] = t
        self.ran.add(d.key)
        t.start()
        if self.once:
            t.join()

    def _reap(self) -> None:
        for key, t in list(self.running.items()):
            if not t.is_alive():
                del self.running[key]

    def _sleep(self) -> float:
        return 0.0 if self.once else self.policy.agent.tick

    # -- one job -----------------------------------------------------------
    def _job(self, d: Due, facts: schedule.VolumeFacts) -> None:
        try:
            self._run_job(d, facts)
        except BlocksnapError as e:      # the history itself unreachable (the daemon died): one line
            log.error("%s: %s (the next agent records it as interrupted)", _what(d), e)

    def _run_job(self, d: Due, facts: schedule.VolumeFacts) -> None:
        env = jobs.JobEnv(self.pool, self.policy, self.settings, in_use=self.in_use, snapshot_lock=self.snapshot_lock)
        started = self.clock()
        info: dict[str, Any] = {"mode": d.mode, "reason": d.reason}
        if d.source:
            info["from"] = d.source
        jid = call(self.pool, "job_begin", volume=d.volume, kind=d.kind, target=d.target, started=started,
                   runner=self.runner, info=info)
        log.info("started %s", _what(d))
        self._ping(d, "start")
        stop = jobs.Stop(d.deadline, self.stop_event, self.clock)
        try:
            out = self._dispatch(env, d, facts, stop, started)
        except jobs.Stopped as e:
            out = jobs.Outcome("stopped", error=str(e))
        except BlocksnapError as e:
            out = jobs.Outcome("failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - a bug in one job must be recorded, not kill the agent
            log.error("%s: internal error\n%s", _what(d), traceback.format_exc())
            out = jobs.Outcome("failed", error=f"internal error: {type(e).__name__}: {e}")
        call(self.pool, "job_end", job_id=jid, result=out.result, ended=self.clock(), bytes_read=out.bytes_read,
             bytes_stored=out.bytes_stored, error=out.error, info=out.info)
        mode = out.info.get("mode")
        log.log(logging.INFO if out.result in ("ok", "stopped") else logging.ERROR, "%s: %s%s%s", _what(d),
                out.result, f" ({mode})" if mode and mode != d.mode else "", f": {out.error}" if out.error else "")
        self._ping(d, "success" if out.result in ("ok", "stopped") else "fail", out.error or "")
        for name in (d.target, d.source):
            if name:
                self.cache.invalidate(name)
                if self.publisher:
                    self.publisher.repository_changed(name)

    def _dispatch(self, env: jobs.JobEnv, d: Due, facts: schedule.VolumeFacts, stop: jobs.Stop,
                  now: float) -> jobs.Outcome:
        if d.kind == "verify":
            cycle, budget = schedule.verify_targets(self.policy, [f for f in self._volumes()]).get(
                d.target, (30 * 86400.0, 1 << 30))
            return jobs.run_verify(env, d, cycle, budget, stop)
        rule = self.policy.rule_for(d.volume)
        if rule is None:
            raise BlocksnapError(f"volume {d.volume} is no longer in the policy")
        if d.kind == "snapshot":
            return jobs.run_snapshot(env, rule, d, facts, now)
        if d.kind == "backup":
            return jobs.run_backup(env, rule, d, stop, now)
        if d.kind == "copy":
            return jobs.run_copy(env, rule, d, stop)
        if d.kind == "drill":
            return jobs.run_drill(env, rule, d, stop)
        raise BlocksnapError(f"unknown job kind {d.kind}")

    def _volumes(self) -> list[str]:
        return [v["name"] for v in call(self.pool, "volume_list")]

    # -- what the agent tells ----------------------------------------------
    def _publish(self, now: float) -> None:
        try:
            self.report = build_report(self.pool, self.policy, now, self.cache, heartbeat=self.heartbeat,
                                       policy_error=self.policy_error)
        except BlocksnapError as e:
            log.error("status: %s", e)
            return
        if self.publisher:
            self.publisher.publish(self, self.report, now)

    def _ping(self, d: Due, event: str, message: str = "") -> None:
        if self.publisher:
            self.publisher.ping(self, d, event, message)


def _what(d: Due) -> str:
    if d.kind == "verify":
        return f"verify of {d.target}"
    where = f" -> {d.target}" if d.target else ""
    return f"{d.kind} {d.volume}{where}" + (f" ({d.mode})" if d.mode else "")


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _publisher(agent: Agent):
    """Metrics, alerts and repository heartbeats (operations/publish.py)."""
    from .publish import Publisher
    return Publisher(agent)
