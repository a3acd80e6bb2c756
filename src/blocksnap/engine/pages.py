"""A pool of fixed-size map pages held in numpy arrays, shared copy-on-write.

Every block map (live volume or snapshot) is a radix tree of these pages. A page
may be shared by many trees; `ref` counts its parents (or owning roots). Copying
a shared page increments the counts of everything it points at (the lazy
refcounting of dm-thin and btrfs), so a snapshot is one increment on a root.
Page 0 is the permanent empty page: a child pointer of 0 means "all holes".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .layout import KIND_INTERIOR, KIND_LEAF, PAGE_ENTRIES

E = PAGE_ENTRIES


class PagePool:
    def __init__(self, capacity: int = 64):
        capacity = max(capacity, 2)
        self.ptr = np.zeros((capacity, E), np.uint64)
        self.csum = np.zeros((capacity, E), np.uint64)
        self.ref = np.zeros(capacity, np.uint32)
        self.kind = np.zeros(capacity, np.uint8)
        self.units = np.zeros(capacity, np.uint32)  # units per data block (leaves)
        self.free_ids: list[int] = []
        self.next_id = 1
        self.dirty: set[int] = set()
        self.freed: set[int] = set()
        # block refcount hooks, set by the pool to its Space: a leaf page that dies
        # drops its blocks (starts, units); a leaf page that is copied shares them
        self.on_blocks_released: Callable[[np.ndarray, int], None] = lambda s, u: None
        self.on_blocks_shared: Callable[[np.ndarray], None] = lambda s: None
        # set by the pool's DirectAccess: the arrays moved; a reference changed (leases go)
        self.on_grow: Callable[[], None] = lambda: None
        self.on_reshape: Callable[[], None] = lambda: None

    # -- capacity -------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = len(self.ref)
        if need < cap:
            return
        new = max(need + 1, cap * 2)
        for name in ("ptr", "csum"):
            old = getattr(self, name)
            arr = np.zeros((new, E), np.uint64)
            arr[:cap] = old
            setattr(self, name, arr)
        for name in ("ref", "kind", "units"):
            old = getattr(self, name)
            arr = np.zeros(new, old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)
        self.on_grow()

    def load(self, pid: int, kind: int, units: int, ptr: np.ndarray, csum: np.ndarray) -> None:
        """Install a page read from the catalog (refcounts are rebuilt afterwards)."""
        self._grow(pid)
        self.ptr[pid] = ptr
        self.csum[pid] = csum
        self.kind[pid] = kind
        self.units[pid] = units
        self.next_id = max(self.next_id, pid + 1)

    def finish_load(self, live_ids: np.ndarray) -> None:
        """After loading: every id not in `live_ids` becomes reusable."""
        mask = np.ones(self.next_id, bool)
        mask[0] = False
        mask[live_ids] = False
        self.free_ids = [int(i) for i in np.flatnonzero(mask)[::-1]]
        self.kind[np.flatnonzero(mask)] = 0

    # -- allocation and refcounts ---------------------------------------
    def alloc(self, kind: int, units: int) -> int:
        if self.free_ids:
            pid = self.free_ids.pop()
        else:
            pid = self.next_id
            self.next_id += 1
            self._grow(pid)
        self.ptr[pid] = 0
        self.csum[pid] = 0
        self.ref[pid] = 1
        self.kind[pid] = kind
        self.units[pid] = units
        self.dirty.add(pid)
        self.freed.discard(pid)
        return pid

    def incref(self, pid: int) -> None:
        if pid:
            self.on_reshape()
            self.ref[pid] += 1

    def decref(self, pid: int) -> None:
        """Drop one reference; free the page and, recursively, what it held."""
        if pid:
            self.on_reshape()
        stack = [pid]
        while stack:
            p = stack.pop()
            if not p:
                continue
            self.ref[p] -= 1
            if self.ref[p]:
                continue
            row = self.ptr[p]
            if self.kind[p] == KIND_INTERIOR:
                stack.extend(int(c) for c in row[row != 0])
            else:
                starts = row[row >= 2]
                if len(starts):
                    self.on_blocks_released(starts, int(self.units[p]))
            self.kind[p] = 0
            self.dirty.discard(p)
            self.freed.add(p)
            self.free_ids.append(p)

    def copy(self, pid: int) -> int:
        """Private copy of a shared page; its children gain a reference."""
        self.on_reshape()
        new = self.alloc(int(self.kind[pid]), int(self.units[pid]))
        self.ptr[new] = self.ptr[pid]
        self.csum[new] = self.csum[pid]
        row = self.ptr[new]
        if self.kind[pid] == KIND_INTERIOR:
            kids = row[row != 0].astype(np.int64)
            np.add.at(self.ref, kids, 1)
        else:
            starts = row[row >= 2]
            if len(starts):
                self.on_blocks_shared(starts)
        return new

    def serialize(self, pid: int) -> bytes:
        if self.kind[pid] == KIND_LEAF:
            return self.ptr[pid].tobytes() + self.csum[pid].tobytes()
        return self.ptr[pid].tobytes()

    @staticmethod
    def deserialize(kind: int, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        arr = np.frombuffer(blob, np.uint64)
        if kind == KIND_LEAF:
            return arr[:E], arr[E:2 * E]
        return arr[:E], np.zeros(E, np.uint64)
