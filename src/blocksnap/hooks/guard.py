"""In-process layers of the thaw guarantee: a deadline timer thread and signal handlers."""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable

from .plan import HookError

GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class DeadlineTimer:
    """Runs registered callbacks once, from a thread, when the deadline passes.

    Callbacks are used to kill a lock request that is not granted in time (from a second
    connection), and, once frozen, to thaw the filesystems and drop the database
    sessions holding locks even if the main thread is stuck in the action.
    """

    def __init__(self, deadline_mono: float):
        self.deadline = deadline_mono
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.fired = threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="blocksnap-freeze-deadline", daemon=True)
        self._thread.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.fired.is_set() or time.monotonic() >= self.deadline

    def add(self, fn: Callable[[], None]) -> int:
        with self._lock:
            self._next += 1
            self._callbacks[self._next] = fn
            if self.fired.is_set():  # too late: run it right away
                self._callbacks.pop(self._next)
                run_now = True
            else:
                run_now = False
        if run_now:
            self._call(fn)
        return self._next

    def remove(self, handle: int) -> None:
        with self._lock:
            self._callbacks.pop(handle, None)

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join(timeout=5)

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self._cancel.is_set():
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            self._cancel.wait(left)
        if self._cancel.is_set():
            return
        with self._lock:
            self.fired.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for fn in callbacks:
            self._call(fn)


class SignalGuard:
    """SIGTERM/SIGINT/SIGHUP while armed raise HookError in the main thread, so that the
    `finally` blocks thaw and release; while disarmed (during cleanup) they are only
    remembered. Only works in the main thread; elsewhere it does nothing (the watchdog
    and the deadline timer still hold)."""

    def __init__(self) -> None:
        self.armed = False
        self.received: int | None = None
        self._old: dict[int, object] = {}
        self.active = threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signum
        if self.armed:
            self.armed = False
            raise HookError(f"interrupted by {signal.Signals(signum).name}")

    def __enter__(self) -> "SignalGuard":
        if self.active:
            for s in GUARDED_SIGNALS:
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):
                    pass
        self.armed = True
        return self

    def __exit__(self, *exc) -> None:
        self.armed = False
        for s, old in self._old.items():
            try:
                signal.signal(s, old)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass
        self._old.clear()

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None
