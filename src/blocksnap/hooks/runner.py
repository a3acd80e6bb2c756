"""`run_frozen`: pre hooks -> database quiesce -> filesystem freeze -> action -> thaw ->
database release -> post hooks, with every undo path and the thaw guarantee layers.

Layers that end a freeze:
1. try/finally in this function, and SIGTERM/SIGINT/SIGHUP handlers that turn the
   signal into an exception in the main thread (so the finally runs);
2. a deadline thread in this process that thaws the filesystems and drops the database
   sessions holding locks when the freeze timeout passes, even if the action hangs;
3. a watchdog child process (started before freezing) that thaws at the deadline or as
   soon as this process dies, including by kill -9;
4. a record of frozen mounts (frozen.json, on tmpfs, never on a frozen filesystem),
   re-thawed by `recover_stale_freezes()` at the next start.
"""
from __future__ import annotations

import datetime as _dt
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..settings import Settings, resolve
from .dsn import scrub
from .fsfreeze import FsFreezer
from .generic import run_hook
from .guard import DeadlineTimer, SignalGuard
from .mysql import MysqlQuiescer
from .plan import FreezePlan, HookError
from .postgres import PgQuiescer
from .state import FreezeRecord, recover_stale_freezes

TIMER_GRACE_S = 0.1  # in-process deadline thread: just after the action's deadline
WATCHDOG_GRACE_S = 0.5  # watchdog process: last resort, a little later
WATCHDOG_START_S = 10.0

_local = threading.local()


def current_deadline() -> float | None:
    """Inside an action run by `run_frozen`: the unix time at which the freeze is ended
    whether or not the action is done (an action should stop before it). Else None."""
    return getattr(_local, "deadline", None)


class Watchdog:
    """Parent side of `watchdog.py`."""

    def __init__(self, paths: list[str], deadline: float):
        script = Path(__file__).with_name("watchdog.py")
        argv = [sys.executable, "-I", "-B", str(script), "--deadline", f"{deadline:.3f}",
                "--parent", str(os.getpid()), *paths]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         close_fds=True)
        except OSError as e:
            raise HookError(f"cannot start the freeze watchdog: {e.strerror}") from None
        self.lines: list[str] = []
        buf = b""
        end = time.monotonic() + WATCHDOG_START_S
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = end - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left)) if left > 0 else ([], [], [])
            chunk = os.read(fd, 4096) if r else b""
            if not chunk:
                self.proc.kill()
                self.proc.wait()
                raise HookError("the freeze watchdog did not start"
                                + (f": {buf.decode(errors='replace').strip()}" if buf else ""))
            buf += chunk
        first, _, rest = buf.partition(b"\n")
        if first.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            raise HookError(f"the freeze watchdog did not start: {first.decode(errors='replace').strip()}")
        self._rest = rest

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self) -> list[str]:
        """Tell it we thawed; returns what it reported (e.g. that it thawed at the deadline)."""
        try:
            out, _ = self.proc.communicate(input=b"done\n", timeout=5)
        except (BrokenPipeError, ValueError):
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        text = (self._rest + (out or b"")).decode(errors="replace")
        return [ln for ln in text.splitlines() if ln.strip()]


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(a: float | None, b: float | None) -> float:
    return round((b - a) * 1000, 3) if a is not None and b is not None else 0.0


class _Run:
    def __init__(self, plan: FreezePlan, settings: Settings):
        self.plan = plan
        self.settings = settings
        self.t_start = time.monotonic()
        self.record: dict[str, Any] = {
            "consistency": "crash", "freeze_ms": 0.0, "total_ms": 0.0, "timeout": plan.timeout,
            "volume": plan.volume, "snapshot": plan.snapshot, "started_at": _now_iso(),
            "deadline": None, "aborted": False, "hooks": [], "result": None, "errors": [],
        }
        self.pre_entries: list[dict] = []
        self.post_entries: list[dict] = []
        self.errors: list[str] = self.record["errors"]
        self.quiescers: list[PgQuiescer | MysqlQuiescer] = []
        self.fs: FsFreezer | None = None
        self.watchdog: Watchdog | None = None
        self.state: FreezeRecord | None = None
        self.timer: DeadlineTimer | None = None
        self.timed_out = False
        self.finished_in_time = False
        self._end_lock = threading.Lock()
        self.fs_frozen_at: float | None = None
        self.fs_thawed_at: float | None = None

    # --------------------------------------------------------------- helpers
    def _env_kw(self, **extra) -> dict:
        return {"volume": self.plan.volume, "snapshot": self.plan.snapshot,
                "mountpoints": self.fs.paths if self.fs else list(self.plan.fs), **extra}

    def _hook(self, cmd: str, phase: str, kind: str, **extra) -> dict:
        return run_hook(cmd, kind=kind, phase=phase, shell=self.plan.shell, timeout=self.plan.timeout,
                        env_kw=self._env_kw(**extra))

    def _on_deadline(self) -> None:
        """Deadline thread: end the freeze now, whatever the main thread is doing."""
        with self._end_lock:
            if self.finished_in_time:  # the main thread is already thawing and releasing
                return
            self.timed_out = True
        if self.fs is not None:
            self.fs.thaw_all(final_status="timeout")
            self.fs_thawed_at = time.monotonic()
        for q in self.quiescers:
            if q.started:
                q.drop_session()

    def _thaw(self, aborted: bool) -> list[str]:
        """Thaw (if anything was frozen), stop the watchdog, drop the frozen.json entry."""
        if self.fs is None:
            return []
        errs = self.fs.thaw_all(final_status="aborted" if aborted else "ok")
        if self.fs_thawed_at is None or not self.timed_out:
            self.fs_thawed_at = time.monotonic()
        if self.watchdog is not None:
            for line in self.watchdog.finish():
                word, _, rest = line.partition(" ")
                if word == "thawed" and not aborted:
                    errs.append(f"fs {rest.split(' ')[0]}: thawed by the watchdog ({rest.split(' ')[-1]})")
            self.watchdog = None
        if self.state is not None:
            self.state.remove()
            self.state = None
        self.fs.close()
        return errs

    def _consistency(self) -> str:
        dbs = list(self.quiescers)
        if self.timed_out:
            return "crash"
        fs_ok = self.fs is None or all(m.status == "ok" for m in self.fs.mounts)
        if dbs:
            if all(q.entry.get("status") == "ok" for q in dbs) and fs_ok:
                return "application"
            return "crash"
        if self.fs is not None and self.fs.mounts and fs_ok:
            return "filesystem"
        return "crash"

    def _finish(self) -> dict:
        rec = self.record
        hooks = list(self.pre_entries)
        hooks += [q.entry for q in self.quiescers]
        if self.fs is not None:
            hooks += [m.entry() for m in self.fs.mounts]
        hooks += self.post_entries
        rec["hooks"] = hooks
        starts = [q.block_start for q in self.quiescers if q.blocks_writes and q.block_start is not None]
        ends = [q.block_end for q in self.quiescers if q.blocks_writes and q.block_end is not None]
        if self.fs_frozen_at is not None:
            starts.append(self.fs_frozen_at)
            ends.append(self.fs_thawed_at if self.fs_thawed_at is not None else time.monotonic())
        if not starts:  # nothing blocked writes (PostgreSQL only): the time the quiesce was held
            starts = [q.block_start for q in self.quiescers if q.block_start is not None]
            ends = [q.block_end for q in self.quiescers if q.block_end is not None]
        rec["freeze_ms"] = _ms(min(starts), max(ends)) if starts and ends else 0.0
        rec["total_ms"] = _ms(self.t_start, time.monotonic())
        return rec

    # --------------------------------------------------------------- the run
    def execute(self, action: Callable[[], Any], succeeded: Callable[[Any], bool] | None) -> dict:
        plan = self.plan
        recover_stale_freezes(self.settings)
        label = f"blocksnap {plan.volume or ''}@{plan.snapshot or ''}".strip() \
            if (plan.volume or plan.snapshot) else f"blocksnap freeze {self.record['started_at']}"
        # Parse and validate everything first: a bad DSN or mountpoint runs nothing.
        self.quiescers = [PgQuiescer(d, plan.pg_mode, label, plan.timeout) for d in plan.pg]
        self.quiescers += [MysqlQuiescer(u, plan.timeout) for u in plan.mysql]
        self.fs = FsFreezer(plan.fs) if plan.fs else None

        guard = SignalGuard()
        failure: BaseException | None = None
        action_done = False
        self.action_started = False
        result: Any = None
        old_dont_write = sys.dont_write_bytecode
        with guard:
            try:
                for cmd in plan.pre:
                    e = self._hook(cmd, "pre", "pre")
                    self.pre_entries.append(e)
                    if e["status"] != "ok":
                        raise HookError(f"pre hook {cmd!r} failed: {e.get('error', 'failed')}")
                if guard.received:
                    raise HookError(f"interrupted by {guard.signal_name}")
                # one reference instant for the unix deadline (given to hooks and the
                # action) and the monotonic one (used here)
                action_deadline_mono = time.monotonic() + plan.timeout
                deadline_unix = time.time() + plan.timeout
                self.record["deadline"] = round(deadline_unix, 3)
                self.timer = DeadlineTimer(action_deadline_mono + TIMER_GRACE_S)
                for q in self.quiescers:
                    q.quiesce(self.timer)
                self.timer.add(self._on_deadline)
                if self.fs is not None:
                    self.watchdog = Watchdog([m.path for m in self.fs.unique()],
                                             deadline_unix + WATCHDOG_GRACE_S)
                    self.state = FreezeRecord.add(self.fs.devs, [(m.path, m.dev) for m in self.fs.unique()],
                                                  deadline_unix + WATCHDOG_GRACE_S, self.watchdog.pid,
                                                  plan.volume, plan.snapshot, self.settings)
                    if self.state is None:
                        raise HookError("no runtime directory for the freeze record outside the filesystems "
                                        "to freeze (set BLOCKSNAP_RUNTIME_DIR)")
                    sys.dont_write_bytecode = True  # no .pyc written onto a frozen filesystem
                    self.fs_frozen_at = time.monotonic()
                    self.fs.freeze_all()
                if self.timer.expired() or time.monotonic() > action_deadline_mono:
                    raise HookError(f"quiesce and freeze did not complete within the {plan.timeout:g} s "
                                    "freeze timeout")
                _local.deadline = deadline_unix
                self.action_started = True
                try:
                    result = action()
                    action_done = True
                finally:
                    guard.armed = False  # the snapshot exists now: a late signal must not abort
                    _local.deadline = None
                with self._end_lock:
                    if time.monotonic() >= action_deadline_mono - 0.001:
                        self.timed_out = True
                    elif not self.timed_out:
                        self.finished_in_time = True
            except BaseException as e:  # noqa: BLE001 - includes signals turned into HookError
                failure = e
            finally:
                guard.armed = False

            if failure is None or action_done:  # a late signal: the snapshot exists, finish normally
                return self._complete(result, succeeded, guard, old_dont_write)
            self._abort(failure, old_dont_write)
        raise AssertionError("unreachable")  # pragma: no cover

    def _release_all(self, aborted: bool, errors: list[str] | None = None) -> None:
        """Release (or, after a failure, abort) every started database, in reverse."""
        errors = self.errors if errors is None else errors
        for q in reversed(self.quiescers):
            if not q.started:
                continue
            try:
                if aborted:
                    q.abort()
                else:
                    err = q.release()
                    if err:
                        errors.append(err)
            except Exception as e:  # noqa: BLE001 - the next one must still be released
                q.entry["status"] = "failed"
                errors.append(scrub(f"{q.name()}: {type(e).__name__}: {e}", q.target.secrets))

    def _complete(self, result: Any, succeeded, guard: SignalGuard, old_dont_write: bool) -> dict:
        try:
            self.errors.extend(self._thaw(aborted=False))
        finally:
            sys.dont_write_bytecode = old_dont_write
        if self.timer is not None:
            self.timer.cancel()
        self._release_all(aborted=False)
        if self.timed_out:
            self.errors.insert(0, f"freeze timeout: the action did not finish within {self.plan.timeout:g} s; "
                                  "filesystems were thawed and database locks released at the deadline, "
                                  "so the result is only crash-consistent")
        consistency = self._consistency()
        self.record["consistency"] = consistency
        self.record["result"] = result
        try:
            ok = not self.errors and (succeeded is None or bool(succeeded(result)))
        except Exception:  # noqa: BLE001
            ok = False
        for cmd in reversed(self.plan.post):
            e = self._hook(cmd, "post", "post", result="ok" if ok else "failed", consistency=consistency)
            self.post_entries.append(e)
            if e["status"] != "ok":
                self.errors.append(f"post hook {cmd!r} failed: {e.get('error', 'failed')}")
        if guard.received:
            self.errors.append(f"{guard.signal_name} received after the action; the run was completed")
        return self._finish()

    def _abort(self, failure: BaseException, old_dont_write: bool) -> None:
        cleanup_errors: list[str] = []
        try:
            cleanup_errors.extend(self._thaw(aborted=True))
        except Exception as e:  # noqa: BLE001 - keep undoing
            cleanup_errors.append(f"thaw: {type(e).__name__}: {e}")
        finally:
            sys.dont_write_bytecode = old_dont_write
        if self.timer is not None:
            self.timer.cancel()
        self._release_all(aborted=True, errors=cleanup_errors)
        for cmd in reversed(self.plan.post):
            e = self._hook(cmd, "abort", "post", result="failed")
            self.post_entries.append(e)
            if e["status"] != "ok":
                cleanup_errors.append(f"abort hook {cmd!r} failed: {e.get('error', 'failed')}")
        if isinstance(failure, HookError):
            msg = str(failure)
        else:
            secrets = [s for q in self.quiescers for s in q.target.secrets]
            msg = scrub(f"{type(failure).__name__}: {failure}", secrets)
            if not self.action_started and isinstance(failure, Exception):
                failure = HookError(f"unexpected error before the snapshot: {msg}")
        self.errors.insert(0, msg)
        self.errors.extend(cleanup_errors)
        self.record["consistency"] = "crash"
        self.record["aborted"] = True
        record = self._finish()
        if isinstance(failure, HookError) or isinstance(failure, KeyboardInterrupt):
            tail = "snapshot aborted, nothing left frozen or locked"
            if cleanup_errors:
                tail = f"snapshot aborted; cleanup: {'; '.join(cleanup_errors)}"
            raise HookError(f"{msg}; {tail}", record) from None
        try:
            failure.record = record  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
        raise failure


def run_frozen(plan: FreezePlan, action: Callable[[], Any], *,
               succeeded: Callable[[Any], bool] | None = None,
               settings: Settings | None = None) -> dict[str, Any]:
    """Quiesce everything in `plan`, call `action()` (which takes the snapshot), undo.

    Returns the freeze record (JSON-serialisable if the action's result is). Raises
    HookError (with `.record`) if anything fails before the action, after undoing it;
    an exception from the action itself is re-raised after the undo (with `.record`).
    `succeeded(result)` decides BLOCKSNAP_RESULT for the post hooks (default: ok).
    `settings` gives the runtime directory of the freeze record (settings.py; None:
    the environment's now).
    """
    if not isinstance(plan, FreezePlan):
        raise TypeError("run_frozen needs a FreezePlan")
    if not callable(action):
        raise TypeError("action must be callable")
    return _Run(plan, resolve(settings)).execute(action, succeeded)
