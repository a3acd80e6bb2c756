"""Data-store space: which units are used, block refcounts, and deferred frees.

The rule borrowed from dm-thin: a block freed in a transaction is not reusable until
that transaction commits, because the last committed metadata may still point at
it. Blocks allocated in the open transaction (`fresh`) are referenced by nothing
committed, so they alone may be overwritten in place.
"""
from __future__ import annotations

import numpy as np

from ..errors import OutOfSpace
from .layout import HEADER_UNITS

WINDOW = 1 << 16


class Space:
    def __init__(self, total_units: int):
        self.total = total_units
        self.used = np.zeros(total_units, bool)
        self.used[:HEADER_UNITS] = True
        self.nused = HEADER_UNITS        # count of True in `used`, kept as it changes
        self.bref = np.zeros(total_units, np.uint32)
        self.fresh = np.zeros(total_units, bool)
        self._fresh_list: list[np.ndarray] = []
        self.pending: list[tuple[np.ndarray, int]] = []
        self.cursor = HEADER_UNITS

    # -- accounting -----------------------------------------------------
    def mark(self, starts: np.ndarray, units: int, value: bool) -> None:
        if len(starts) == 0:
            return
        idx = (starts.astype(np.int64)[:, None] + np.arange(units)).ravel()
        was = int(np.count_nonzero(self.used[idx]))
        self.used[idx] = value
        self.nused += (len(idx) - was) if value else -was

    def used_units(self) -> int:
        """Without a scan: the FUSE write path asks on every request."""
        return int(self.nused) - HEADER_UNITS

    def recount(self) -> None:
        self.nused = int(np.count_nonzero(self.used))

    def pending_units(self) -> int:
        return sum(len(s) * u for s, u in self.pending)

    # -- allocation -----------------------------------------------------
    def alloc(self, n: int, units: int) -> np.ndarray:
        """n blocks of `units` units each, aligned to `units`; refcount 1, fresh."""
        if n == 0:
            return np.zeros(0, np.uint64)
        total_rows = self.total // units
        # never past the last whole row: a cursor left at the very end by a smaller
        # block size would make the wrapped scan run off the store
        start_row = min(max(-(-self.cursor // units), HEADER_UNITS // units), total_rows)
        lo, hi = start_row * units, (start_row + n) * units
        if hi <= self.total and not np.count_nonzero(self.used[lo:hi]):
            # the common case: free space right at the cursor (sequential writers);
            # slices, not index arrays (this runs for every write request)
            starts = np.arange(lo, hi, units, dtype=np.uint64)
            self.used[lo:hi] = True
            self.nused += int(hi - lo)
            self.bref[lo:hi:units] = 1
            self.fresh[lo:hi:units] = True
            self._fresh_list.append(starts)
            self.cursor = hi
            return starts
        found: list[np.ndarray] = []
        got = 0
        row = start_row
        scanned = 0
        wrapped = False
        span = n * 8 + 64               # small windows first, growing while nothing fits
        while got < n and scanned < total_rows:
            span = min(span * 2, max(WINDOW // units, 64) * 16)
            # after wrapping around, stop before start_row: rows from there on were
            # scanned already and their free blocks are in `found` (not yet marked)
            end = min(row + span, start_row if wrapped else total_rows)
            if end <= row:
                if wrapped:
                    break
                row, wrapped = 0, True
                continue
            window = self.used[row * units:end * units].reshape(-1, units).any(axis=1)
            idx = np.flatnonzero(~window)[: n - got]
            if len(idx):
                found.append((idx + row) * units)
                got += len(idx)
            scanned += end - row
            row = end
        if got < n:
            raise OutOfSpace("out of space in the pool: no free block left for this write")
        return self._take(np.concatenate(found).astype(np.uint64), units)

    def _take(self, starts: np.ndarray, units: int) -> np.ndarray:
        self.mark(starts, units, True)
        self.bref[starts.astype(np.int64)] = 1
        self.fresh[starts.astype(np.int64)] = True
        self._fresh_list.append(starts)
        self.cursor = int(starts[-1]) + units
        return starts

    def release_now(self, starts: np.ndarray, units: int) -> None:
        """Undo an allocation that never reached any map (failed write)."""
        s = starts.astype(np.int64)
        self.bref[s] = 0
        self.fresh[s] = False
        self.mark(starts, units, False)

    def incref(self, starts: np.ndarray) -> None:
        np.add.at(self.bref, starts.astype(np.int64), 1)

    def decref(self, starts: np.ndarray, units: int) -> None:
        s = starts.astype(np.int64)
        np.subtract.at(self.bref, s, 1)
        dead = np.unique(s[self.bref[s] == 0])
        if len(dead):
            self.pending.append((dead.astype(np.uint64), units))

    def is_fresh(self, starts: np.ndarray) -> np.ndarray:
        return self.fresh[starts.astype(np.int64)]

    def after_commit(self) -> list[tuple[np.ndarray, int]]:
        """The transaction is durable: deferred frees become free space."""
        released = self.take_pending()
        for starts, units in released:
            self.mark(starts, units, False)
        return released

    def take_pending(self) -> list[tuple[np.ndarray, int]]:
        """Commit done: clear the fresh marks and hand over the deferred frees.

        The caller frees them (mark(..., False)) once no reader can still be reading
        them (see Pool: reads do their I/O outside the pool lock).
        """
        for starts in self._fresh_list:
            self.fresh[starts.astype(np.int64)] = False
        self._fresh_list.clear()
        released = self.pending
        self.pending = []
        return released
