"""The lifecycle every database quiescer shares, written once.

A quiescer holds one session (``conn``) on which it takes the quiesce (locks, backup
mode, a checkpoint) and later releases it, and a second, control connection (``ctl``)
from which a statement that is not done by the deadline is cancelled or killed: the
held session is busy waiting, so it cannot interrupt itself. This class owns what must
not differ between servers: the record entry and its status, the timing (``ms``,
``held_ms``, ``block_start``/``block_end`` for ``freeze_ms``), the deadline guard around
a quiesce statement, and closing both sessions under one lock order. Subclasses keep
only their SQL and driver specifics.

Lock order (the one place it is decided): the control connection is only used, and
only detached, under ``_ctl_lock``; ``_close`` detaches it under the lock and closes the
sessions outside it. So the deadline thread either finishes its cancel/kill before the
close starts, or finds no control connection and does nothing: a connection is never
closed while another thread is using it, and a slow close never holds up the lock.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol, TypeVar

from .dsn import scrub
from .guard import DeadlineTimer
from .plan import HookError

T = TypeVar("T")


class Target(Protocol):
    """What a quiescer needs of a parsed connection string (PgTarget, MysqlTarget)."""

    redacted: str  # printable, without the password

    @property
    def secrets(self) -> list[str]: ...  # scrubbed from every message


class Quiescer(ABC):
    """One database, quiesced on a held session between `quiesce` and `release`/`abort`.

    The interface the runner uses: ``kind``, ``blocks_writes``, ``target``, ``entry``
    (the record's hooks entry), ``started``, ``block_start``/``block_end``, ``name()``,
    ``quiesce(timer)``, ``release()``, ``abort()`` and ``drop_session()``.
    """

    kind: str  # the entry's "kind"
    blocks_writes: bool  # whether the quiesce blocks writers (counts in freeze_ms)
    # what a statement cancelled at the deadline reports, after "NAME: STATEMENT "
    interrupted_text = "did not complete within the {timeout:g} s freeze timeout (cancelled)"

    def __init__(self, target: Target, timeout: float, **entry: Any):
        self.target = target
        self.timeout = timeout
        self.conn: Any = None  # the held session
        self.ctl: Any = None  # the control connection; only under _ctl_lock
        self._ctl_lock = threading.Lock()
        self.started = False
        self._in_flight = False  # a guarded quiesce statement is running on conn
        self.ms = 0.0  # time spent in quiesce + release/abort
        self.held_from: float | None = None
        self.block_start: float | None = None
        self.block_end: float | None = None
        self.entry: dict[str, Any] = {"kind": self.kind, "target": target.redacted, **entry,
                                      "status": "skipped"}

    # ------------------------------------------------------------------ specifics
    @abstractmethod
    def _db_error(self) -> type[Exception]:
        """The driver's base exception class (imported lazily, like the driver)."""

    @abstractmethod
    def _error_message(self, e: BaseException) -> str:
        """The server's message for `e`, before scrubbing."""

    @abstractmethod
    def _connect(self, remaining: float) -> Any:
        """Open one autocommit session, within `remaining` seconds."""

    @abstractmethod
    def _hold(self, timer: DeadlineTimer) -> None:
        """On ``conn`` (both sessions open): take the quiesce and record the server's
        position in ``entry``. Statements that may wait go through `_guarded`. Raises
        HookError if it is not held in time. Sets ``block_start`` itself if writers are
        blocked from before the quiesce is held (else it starts when it is held)."""

    @abstractmethod
    def _cancel_on(self, ctl: Any) -> None:
        """From the control connection: interrupt the statement running on ``conn``."""

    @abstractmethod
    def _release_held(self) -> None:
        """Normal end: undo the quiesce on ``conn``. Raises HookError if it cannot (the
        hook then failed and the snapshot is not application-consistent)."""

    @abstractmethod
    def _undo(self) -> None:
        """After a failure elsewhere: undo what is held, best effort, never raising."""

    @abstractmethod
    def drop_session(self) -> None:
        """Deadline thread: the deadline passed while held; free the server now."""

    # ------------------------------------------------------------------ helpers
    def name(self) -> str:
        return f"{self.kind} {self.target.redacted}"

    def _clean(self, e: BaseException | str) -> str:
        """A one-line message without passwords."""
        msg = e if isinstance(e, str) else self._error_message(e)
        return scrub(msg, self.target.secrets)

    def _with_ctl(self, fn: Callable[[Any], None]) -> None:
        """Run fn(ctl) under the lock, unless the control connection is gone (closed)."""
        with self._ctl_lock:
            if self.ctl is not None:
                fn(self.ctl)

    def _cancel(self) -> None:
        self._with_ctl(self._cancel_on)

    def _guarded(self, what: str, timer: DeadlineTimer, run: Callable[[], T],
                 interrupted: Callable[[BaseException], bool]) -> T:
        """Run one quiesce statement that may wait (for a lock, a checkpoint); at the
        deadline it is cancelled from the control connection, so the server is never
        left waiting on (and blocking writers behind) our request."""
        handle = timer.add(self._cancel)
        self._in_flight = True
        try:
            return run()
        except self._db_error() as e:
            if interrupted(e):
                raise HookError(f"{self.name()}: {what} "
                                f"{self.interrupted_text.format(timeout=self.timeout)}") from None
            raise HookError(f"{self.name()}: {what} failed: {self._clean(e)}") from None
        finally:
            self._in_flight = False
            timer.remove(handle)

    # ------------------------------------------------------------------ lifecycle
    def quiesce(self, timer: DeadlineTimer) -> None:
        """Open both sessions and take the quiesce; HookError (one line) if not held."""
        db_error = self._db_error()
        t0 = time.monotonic()
        self.started = True
        self.entry["status"] = "failed"
        try:
            try:
                self.conn = self._connect(timer.remaining())
                self.ctl = self._connect(timer.remaining())
            except db_error as e:
                raise HookError(f"{self.name()}: cannot connect: {self._clean(e)}") from None
            self._hold(timer)
            self.held_from = time.monotonic()
            if self.block_start is None:
                self.block_start = self.held_from
            self.entry["status"] = "held"
        except db_error as e:
            raise HookError(f"{self.name()}: {self._clean(e)}") from None
        finally:
            self.ms += (time.monotonic() - t0) * 1000

    def release(self) -> str | None:
        """Normal end. Returns an error string (the hook then failed) or None."""
        t0 = time.monotonic()
        err = None
        try:
            self._release_held()
            self.entry["status"] = "ok"
        except HookError as e:
            err = str(e)
            self.entry["status"] = "failed"
            self.entry["error"] = err
        finally:
            self._end(t0)
        return f"{self.name()}: {err}" if err else None

    def abort(self) -> None:
        """Undo after a failure elsewhere, and close both sessions."""
        t0 = time.monotonic()
        try:
            self._undo()
        finally:
            if self.entry["status"] in ("held", "skipped"):
                self.entry["status"] = "aborted"
            self._end(t0)

    def _end(self, t0: float) -> None:
        """Writers are free once the release/undo statements are done: mark the end of
        the block, close both sessions, and put the times into the entry."""
        if self.block_start is not None:
            self.block_end = time.monotonic()
        self._close()
        self.ms += (time.monotonic() - t0) * 1000
        self.entry["ms"] = round(self.ms, 3)
        if self.held_from is not None:
            self.entry["held_ms"] = round((time.monotonic() - self.held_from) * 1000, 3)

    def _close(self) -> None:
        """Detach the control connection under the lock (see the module docstring), then
        close both sessions; closing the held one releases whatever the server still holds."""
        with self._ctl_lock:
            ctl, self.ctl = self.ctl, None
        for c in (self.conn, ctl):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
