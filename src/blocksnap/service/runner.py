"""Runs an operation where the pool lives: in its daemon if served, else here under lock."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from ..engine import Pool
from ..errors import Busy
from .control import NOT_RUNNING, try_remote
from .ops import OPS, PROGRESS_OPS

Progress = Callable[[int, int], None] | None
LOCK_WAIT = 10.0   # seconds a command waits for a pool another command holds


class Session:
    """One pool, opened once: several operations without reopening (and re-locking)."""

    def __init__(self, pool_path: str):
        self.pool_path = pool_path
        self.pool: Pool | None = None

    def call(self, op: str, progress: Progress = None, **kwargs: Any) -> Any:
        if self.pool is None:
            remote = dict(kwargs, progress=progress) if progress is not None and op in PROGRESS_OPS else kwargs
            result = self._remote_or_open(op, remote)
            if result is not NOT_RUNNING:
                return result
        if op in PROGRESS_OPS:
            kwargs["progress"] = progress
        return OPS[op](self.pool, **kwargs)

    def _remote_or_open(self, op: str, kwargs: dict[str, Any]) -> Any:
        """The daemon's answer, or NOT_RUNNING with the pool opened here.

        Another command may hold the pool for a moment, or be starting its daemon:
        both are waited for (up to LOCK_WAIT) instead of failing at once.
        """
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            result = try_remote(self.pool_path, op, kwargs)
            if result is not NOT_RUNNING:
                return result
            try:
                self.pool = Pool.open(self.pool_path, wait=0.25)
                return NOT_RUNNING
            except Busy:
                if time.monotonic() >= deadline:
                    raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


@contextlib.contextmanager
def session(pool_path: str, preopen: bool = False) -> Iterator[Session]:
    s = Session(pool_path)
    try:
        if preopen:
            s._remote_or_open("pool_status", {})
        yield s
    finally:
        s.close()


def call(pool_path: str, op: str, progress: Progress = None, **kwargs: Any) -> Any:
    with session(pool_path) as s:
        return s.call(op, progress=progress, **kwargs)
