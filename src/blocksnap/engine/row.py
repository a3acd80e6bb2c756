"""ROW (redirect-on-write) volumes: thin, every block lives in the pool.

A write never touches a block that committed metadata points at: it goes to a
fresh block, and the map entry is redirected. Blocks written since the last commit
(`fresh`) are overwritten in place. Snapshots, rollback and clone are one reference
on a map root.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from ..errors import CorruptionError
from .blockio import join_runs, read_buffer, read_stored
from .catalog import SnapshotRow, VolumeRow
from .layout import PAGE_ENTRIES
from .radix import Tree, clear_range, levels_for
from .row_write import whole_block_sums, write_blocks, write_small
from .volume_base import VolumeBase

E = PAGE_ENTRIES


class RowVolume(VolumeBase):
    mode = "row"

    def __init__(self, pool, row: VolumeRow, snaps: list[SnapshotRow]):
        super().__init__(pool, row, snaps)
        self.tree = Tree(row.root, row.levels, self.units)

    def row(self) -> VolumeRow:
        return VolumeRow(self.name, self.mode, self.size, self.block_size, self.origin,
                         self.tree.root, self.tree.levels, self.created, self.extra)

    # -- reading ------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return self._read_tree(self._locate_live, offset, length, f" in volume {self.name}")

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset` (the FUSE read path: no allocation per request)."""
        self._read_tree(self._locate_live, offset, len(out), f" in volume {self.name}", out)

    def mapped(self, first: int, count: int) -> np.ndarray:
        """Which of blocks [first, first + count) the live map points at stored data
        (False: a hole). Instant recovery fills only holes, deciding under its own lock."""
        with self.pool.lock:
            self._check()
            ptrs, _ = self.pool.maps.get_range(self.tree, first, first + count)
            return ptrs >= 2

    def _locate_live(self) -> tuple[Tree, int]:
        self._check()
        return self.tree, self.size

    def _read_tree(self, locate: Callable[[], tuple[Tree, int]], offset: int, length: int,
                   where: str, out: memoryview | None = None) -> bytes | None:
        """Resolve the map under the pool lock, then read the data without it.

        Blocks a concurrent commit releases stay allocated until this read is over
        (Pool.reader_enter/exit), so what the map named is what gets read.
        Into `out` if given (returns None), else returns new bytes.
        """
        pool, bs = self.pool, self.block_size
        with pool.lock:
            tree, size = locate()
            self._bounds(offset, length, size)
            if length == 0:
                return b"" if out is None else None
            b0, b1 = offset // bs, -(-(offset + length) // bs)
            ptrs, sums = pool.maps.get_range(tree, b0, b1)
            token = pool.reader_enter()
        start, nbytes = offset - b0 * bs, (b1 - b0) * bs
        try:
            # straight into the caller's buffer, block-aligned or not; else whole
            # blocks into a pooled buffer, then copied out
            skip, n = (start, length) if out is not None else (0, nbytes)
            with (contextlib.nullcontext(out[:length]) if out is not None
                  else read_buffer(None, 0, nbytes, nbytes)) as dest:
                try:
                    read_stored(pool.store, ptrs, sums, bs, dest, where, b0, zero_holes=True, skip=skip, length=n)
                except CorruptionError:
                    # a block written since the last commit is overwritten in place, so an
                    # unlocked read racing a write can tear: judge it again under the lock
                    with pool.lock:
                        tree, size = locate()
                        ptrs, sums = pool.maps.get_range(tree, b0, b1)
                        read_stored(pool.store, ptrs, sums, bs, dest, where, b0, zero_holes=True,
                                    skip=skip, length=n)
                return None if out is not None else bytes(dest[start:start + length])
        finally:
            pool.reader_exit(token)

    # -- writing ------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        bs = self.block_size
        if 0 <= offset and 0 < len(data) <= bs and offset // bs == (offset + len(data) - 1) // bs:
            with self.pool.lock:   # inside one block: in place if it may be (row_write.write_small)
                self._check()
                self._bounds(offset, len(data))
                if write_small(self, offset, data):
                    return
        nz, sums = whole_block_sums(offset, data, bs) if len(data) and offset >= 0 else (None, None)
        with self.pool.lock:
            self._check()
            self._bounds(offset, len(data))
            if len(data):
                write_blocks(self, offset, data, nz, sums)

    def discard(self, offset: int, length: int) -> None:
        """Unmap whole blocks (space returns after the next commit); zero partial edges."""
        with self.pool.lock:
            self._check()
            self._bounds(offset, length)
            if not length:
                return
            bs = self.block_size
            end = offset + length
            first = -(-offset // bs)
            last = end // bs if end < self.size else self.nblocks
            if first >= last:
                self.write(offset, bytes(length))
                return
            if offset < first * bs:
                self.write(offset, bytes(first * bs - offset))
            if end > last * bs and last < self.nblocks:
                self.write(last * bs, bytes(end - last * bs))
            self.pool.direct.revoke_range(self, first, last)
            dropped = clear_range(self.pool.maps, self.tree, first, last)
            if len(dropped):
                self.pool.space.decref(dropped, self.units)
            self.pool.mark_dirty(self.name)

    def flush(self) -> None:
        self.pool.commit()

    def _resize(self, size: int) -> None:
        with self.pool.lock:
            if size < self.size:
                keep = -(-size // self.block_size)
                tail = keep * self.block_size
                if tail > size:  # zero the cut-off part of the last block first: if that
                    # fails (out of space), nothing has changed yet
                    self.write(size, bytes(min(self.size, tail) - size))
                dropped = clear_range(self.pool.maps, self.tree, keep, self.nblocks)
                if len(dropped):
                    self.pool.space.decref(dropped, self.units)
            self.size = size
            self.pool.maps.grow(self.tree, levels_for(self.nblocks))
            self.pool.commit(volumes=[self])

    # -- snapshots ------------------------------------------------------------
    def _create_snapshot(self, name: str, labels, consistency: str, hooks) -> SnapshotRow:
        srow = self._new_srow(name, labels, consistency, hooks, self.tree.root, self.tree.levels)
        pool = self.pool
        pool.pages.incref(self.tree.root)
        try:
            pool.commit(snapshots=[srow], volumes=[self])
        except BaseException:
            pool.pages.decref(self.tree.root)
            raise
        self.snapshot_rows.append(srow)
        return srow

    def _snap_tree(self, srow: SnapshotRow) -> Tree:
        return Tree(srow.root, srow.levels, self.units)

    def _snap_read(self, srow: SnapshotRow, offset: int, length: int,
                   check: Callable[[], None] = lambda: None, out: memoryview | None = None) -> bytes | None:
        def locate() -> tuple[Tree, int]:
            check()
            return self._snap_tree(srow), srow.size
        return self._read_tree(locate, offset, length, f" in snapshot {self.name}@{srow.name}", out)

    def _delete_snapshot(self, srow: SnapshotRow) -> None:
        self.snapshot_rows.remove(srow)
        self.pool.pages.decref(srow.root)
        self.pool.commit(deleted_snapshots=[(self.name, srow.name)])

    def _rollback(self, srow: SnapshotRow) -> None:
        pool = self.pool
        pool.pages.incref(srow.root)
        old = self.tree.root
        self.tree = Tree(srow.root, srow.levels, self.units)
        self.size = srow.size
        pool.pages.decref(old)
        pool.commit(volumes=[self])

    def _clone_into(self, srow: SnapshotRow, clone: VolumeBase,
                    progress: Callable[[int, int], None] | None = None) -> None:  # noqa: ARG002 - at once
        """One reference on the snapshot's map root: every block is shared."""
        assert isinstance(clone, RowVolume) and clone.tree.root == 0
        self.pool.pages.incref(srow.root)
        clone.tree = Tree(srow.root, srow.levels, self.units)

    def _diff(self, ra: SnapshotRow, rb: SnapshotRow | None) -> list[dict[str, int]]:
        ta = self._snap_tree(ra)
        tb = self._snap_tree(rb) if rb is not None else self.tree
        sa, sb = ra.size, (rb.size if rb is not None else self.size)
        bs = self.block_size
        nmax = -(-max(sa, sb) // bs)
        tail = min(sa, sb) // bs if sa != sb else nmax   # past the smaller size: all changed
        maps, pp = self.pool.maps, self.pool.pages
        la = dict(maps.iter_leaves(ta))
        lb = dict(maps.iter_leaves(tb))
        zero = np.zeros(E, np.uint64)

        def pieces() -> Iterator[tuple[int, np.ndarray]]:
            """Changed entries a leaf at a time (leaves the maps share are skipped)."""
            for li in sorted(set(la) | set(lb)):
                pa, pb = la.get(li, 0), lb.get(li, 0)
                lo = li * E
                hi = min(lo + E, tail)
                if pa == pb or lo >= hi:
                    continue
                ea = pp.ptr[pa] if pa else zero
                eb = pp.ptr[pb] if pb else zero
                yield lo, (ea != eb)[:hi - lo]
        runs = list(join_runs(pieces()))
        if tail < nmax:
            if runs and sum(runs[-1]) == tail:
                runs[-1] = (runs[-1][0], nmax - runs[-1][0])
            else:
                runs.append((tail, nmax - tail))
        return self._extents(runs, bs, max(sa, sb))

    def _allocated_bytes(self) -> int:
        pp = self.pool.pages
        count = sum(int((pp.ptr[p] >= 2).sum()) for _, p in self.pool.maps.iter_leaves(self.tree))
        return count * self.block_size

    def _snap_runs(self, srow: SnapshotRow) -> Iterator[tuple[int, int]]:
        n = -(-srow.size // self.block_size)
        ptr = self.pool.pages.ptr

        def pieces() -> Iterator[tuple[int, np.ndarray]]:
            for li, p in self.pool.maps.iter_leaves(self._snap_tree(srow)):
                lo = li * E
                if lo < n:
                    yield lo, ptr[p, :min(E, n - lo)] >= 2
        return join_runs(pieces())

    def _drop_all(self) -> None:
        for s in self.snapshot_rows:
            self.pool.pages.decref(s.root)
        self.pool.pages.decref(self.tree.root)
