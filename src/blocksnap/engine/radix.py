"""Radix-tree block maps over the shared page pool.

A tree is (root page, levels). Leaves hold, per volume block, the data-store unit
where the block lives (or HOLE/ZERO) and its xxh3 checksum. Writing through a
tree copies only the pages on the path that are shared (path copying), so a
snapshot never copies a map and costs the same at any volume size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .layout import KIND_INTERIOR, KIND_LEAF, PAGE_ENTRIES
from .pages import PagePool

E = PAGE_ENTRIES


def levels_for(nblocks: int) -> int:
    levels, cover = 1, E
    while cover < nblocks:
        levels += 1
        cover *= E
    return levels


@dataclass
class Tree:
    root: int
    levels: int
    units: int  # data-store units per block, for new leaves


class Maps:
    """Tree operations bound to one PagePool."""

    def __init__(self, pages: PagePool):
        self.pages = pages

    def leaf(self, tree: Tree, li: int) -> int:
        p = tree.root
        ptr = self.pages.ptr
        for h in range(tree.levels - 1, 0, -1):
            if not p:
                return 0
            p = int(ptr[p, (li // E ** (h - 1)) % E])
        return p

    def _own(self, pid: int, kind: int, units: int) -> int:
        pp = self.pages
        if pid == 0:
            return pp.alloc(kind, units)
        if pp.ref[pid] > 1:
            new = pp.copy(pid)
            pp.decref(pid)
            return new
        pp.dirty.add(pid)
        return pid

    def leaf_for_write(self, tree: Tree, li: int) -> int:
        """The leaf holding leaf-index `li`, made private to `tree` (path copy)."""
        pp = self.pages
        top_kind = KIND_LEAF if tree.levels == 1 else KIND_INTERIOR
        tree.root = self._own(tree.root, top_kind, tree.units)
        p = tree.root
        for h in range(tree.levels - 1, 0, -1):
            idx = (li // E ** (h - 1)) % E
            child = int(pp.ptr[p, idx])
            new = self._own(child, KIND_LEAF if h == 1 else KIND_INTERIOR, tree.units)
            if new != child:
                pp.ptr[p, idx] = new
            p = new
        return p

    def get_range(self, tree: Tree, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
        """Entries and checksums of blocks [b0, b1)."""
        n = b1 - b0
        pp = self.pages
        if n > 0 and b0 // E == (b1 - 1) // E:   # within one leaf (most requests): copies of slices
            p = self.leaf(tree, b0 // E)
            if p:
                lo = b0 - (b0 // E) * E
                return pp.ptr[p, lo:lo + n].copy(), pp.csum[p, lo:lo + n].copy()
        ptrs = np.zeros(n, np.uint64)
        sums = np.zeros(n, np.uint64)
        if n <= 0:
            return ptrs, sums
        for li in range(b0 // E, (b1 - 1) // E + 1):
            p = self.leaf(tree, li)
            if not p:
                continue
            lo, hi = max(b0, li * E), min(b1, (li + 1) * E)
            ptrs[lo - b0:hi - b0] = pp.ptr[p, lo - li * E:hi - li * E]
            sums[lo - b0:hi - b0] = pp.csum[p, lo - li * E:hi - li * E]
        return ptrs, sums

    def set_range(self, tree: Tree, b0: int, ptrs: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """Store entries for blocks [b0, b0+len); returns the entries they replace.

        References are the caller's business: new entries must already be counted,
        old ones must be released by the caller.
        """
        n = len(ptrs)
        old = np.zeros(n, np.uint64)
        if n == 0:
            return old
        pp = self.pages
        b1 = b0 + n
        for li in range(b0 // E, (b1 - 1) // E + 1):
            lo, hi = max(b0, li * E), min(b1, (li + 1) * E)
            new = ptrs[lo - b0:hi - b0]
            if not np.count_nonzero(new) and not self.leaf(tree, li):
                continue  # clearing a range that is already all holes
            p = self.leaf_for_write(tree, li)
            s = slice(lo - li * E, hi - li * E)
            old[lo - b0:hi - b0] = pp.ptr[p, s]
            pp.ptr[p, s] = new
            pp.csum[p, s] = sums[lo - b0:hi - b0]
        return old

    def grow(self, tree: Tree, levels: int) -> None:
        while tree.levels < levels:
            if tree.root:
                new = self.pages.alloc(KIND_INTERIOR, tree.units)
                self.pages.ptr[new, 0] = tree.root
                tree.root = new
            tree.levels += 1

    def iter_leaves(self, tree: Tree, li0: int = 0, li1: int | None = None) -> Iterator[tuple[int, int]]:
        """(leaf index, page id) of every present leaf in [li0, li1), in order."""
        ptr = self.pages.ptr

        def walk(p: int, h: int, base: int) -> Iterator[tuple[int, int]]:
            if h == 0:
                if base >= li0 and (li1 is None or base < li1):
                    yield base, p
                return
            span = E ** (h - 1)
            for idx in np.flatnonzero(ptr[p]):
                start = base + int(idx) * span
                if li1 is not None and start >= li1:
                    break
                if start + span <= li0:
                    continue
                yield from walk(int(ptr[p, idx]), h - 1, start)

        if tree.root:
            yield from walk(tree.root, tree.levels - 1, 0)


def clear_range(maps: Maps, tree: Tree, b0: int, b1: int) -> np.ndarray:
    """Set blocks [b0, b1) to HOLE, visiting only leaves that exist; returns old entries >= 2."""
    pp = maps.pages
    dropped: list[np.ndarray] = []
    if b1 <= b0:
        return np.zeros(0, np.uint64)
    for li, _ in list(maps.iter_leaves(tree, b0 // E, (b1 - 1) // E + 1)):
        lo, hi = max(b0, li * E), min(b1, (li + 1) * E)
        s = slice(lo - li * E, hi - li * E)
        cur = maps.leaf(tree, li)
        if not pp.ptr[cur, s].any():
            continue
        p = maps.leaf_for_write(tree, li)
        old = pp.ptr[p, s].copy()
        dropped.append(old[old >= 2])
        pp.ptr[p, s] = 0
        pp.csum[p, s] = 0
    return np.concatenate(dropped) if dropped else np.zeros(0, np.uint64)
