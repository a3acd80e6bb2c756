"""Runs an operation where the pool lives: in its daemon if served, else here under lock."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from ..engine.pool import Pool
from .control import NOT_RUNNING, try_remote
from .ops import OPS, PROGRESS_OPS

Progress = Callable[[int, int], None] | None


class Session:
    """One pool, opened once: several operations without reopening (and re-locking)."""

    def __init__(self, pool_path: str):
        self.pool_path = pool_path
        self.pool: Pool | None = None

    def call(self, op: str, progress: Progress = None, **kwargs: Any) -> Any:
        if self.pool is None:
            result = try_remote(self.pool_path, op, kwargs)
            if result is not NOT_RUNNING:
                return result
            self.pool = Pool.open(self.pool_path)
        if op in PROGRESS_OPS:
            kwargs["progress"] = progress
        return OPS[op](self.pool, **kwargs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


@contextlib.contextmanager
def session(pool_path: str, preopen: bool = False) -> Iterator[Session]:
    s = Session(pool_path)
    try:
        if preopen and try_remote(pool_path, "pool_status", {}) is NOT_RUNNING:
            s.pool = Pool.open(pool_path)
        yield s
    finally:
        s.close()


def call(pool_path: str, op: str, progress: Progress = None, **kwargs: Any) -> Any:
    with session(pool_path) as s:
        return s.call(op, progress=progress, **kwargs)
