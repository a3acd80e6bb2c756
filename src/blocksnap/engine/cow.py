"""COW (copy-on-write) volumes: live data stays in the origin, written in place.

Snapshot maps form a chain, oldest first. An entry in snapshot i is set when the
block was overwritten after snapshot i and before snapshot i+1 (or now, for the
newest); HOLE means "unchanged since: look in the next newer snapshot, then the
origin". So the first write to a block after a snapshot copies it once, into the
newest snapshot only, and every older snapshot that still needs the old content
finds it there: one copy, however many snapshots (classic LVM copies per snapshot).
The copy is committed before the origin is written.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

import numpy as np

from ..errors import InvalidArgument, NotFound
from ..store import FileStore
from .blockio import (
    block_sums,
    deliver,
    join_runs,
    mask_runs,
    nonzero_blocks,
    read_buffer,
    read_stored,
    write_new_blocks,
    zero_blocks,
)
from .catalog import SnapshotRow, VolumeRow
from .layout import HOLE, PAGE_ENTRIES, ZERO
from .radix import Tree, levels_for
from .volume_base import VolumeBase

E = PAGE_ENTRIES
CHUNK_BLOCKS_BYTES = 8 << 20
COPY_AHEAD_MAX = 4 << 20    # most a sequential writer preserves ahead of itself per commit
COPY_CHUNK = 4 << 20        # preserved through a buffer of this size, reused


class CowVolume(VolumeBase):
    mode = "cow"

    def __init__(self, pool, row: VolumeRow, snaps: list[SnapshotRow]):
        super().__init__(pool, row, snaps)
        self.levels = row.levels
        self.trees = {s.name: Tree(s.root, s.levels, self.units) for s in self.snapshot_rows}
        self._origin: FileStore | None = None
        self._origin_dirty = False
        self._stream_end = -1   # sequential-writer detection for copy-ahead
        self._big_n = 0         # blocks of the largest write lately (decays on restarts)
        self._copy_buf = bytearray()
        self._stream_len = 0
        self._copied: set[int] = set()   # blocks copied in the open transaction ...
        self._copied_epoch = -1          # ... of this commit epoch
        self._gc = threading.Condition()  # group commit: one writer commits for all
        self._gc_leader = False

    def row(self) -> VolumeRow:
        return VolumeRow(self.name, self.mode, self.size, self.block_size, self.origin,
                         0, self.levels, self.created, self.extra)

    @property
    def origin_store(self) -> FileStore:
        if self._origin is None:
            try:
                self._origin = FileStore(self.origin)
            except NotFound:
                raise NotFound(f"origin {self.origin} of volume {self.name!r} is missing") from None
            if self._origin.size < self.size:
                self._origin.close()
                self._origin = None
                raise InvalidArgument(f"origin {self.origin} shrank below the size of volume {self.name!r}")
        return self._origin

    def _sync_origin(self) -> None:
        if self._origin is not None and self._origin_dirty:
            self._origin.sync()
            self._origin_dirty = False

    def _dirty_snapshot_rows(self) -> list[SnapshotRow]:
        """Rows whose map root moved since the last commit (new or copied root page)."""
        out = []
        for s in self.snapshot_rows:
            t = self.trees[s.name]
            if (s.root, s.levels) != (t.root, t.levels):
                s.root, s.levels = t.root, t.levels
                out.append(s)
        return out

    def _close(self) -> None:
        if self._origin is not None:
            self._origin.close()
            self._origin = None

    # -- live I/O -------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        with self.pool.lock:
            self._check()
            self._bounds(offset, length)
            return self.origin_store.pread(length, offset)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset` (the FUSE read path: no allocation per request)."""
        with self.pool.lock:
            self._check()
            self._bounds(offset, len(out))
            if len(out):
                self.origin_store.preadinto(out, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy what the newest snapshot still needs, commit, then write the origin.

        Writers on several threads (FUSE) share commits: one that copied blocks
        lets go of the pool lock and waits for a commit made after its copies (it
        makes it itself if nobody is), then checks again under the lock, since a
        snapshot may have been taken meanwhile. A caller that holds the pool lock
        already (discard, rollback) commits at once, as before.
        """
        data = memoryview(data).cast("B")
        group = not self.pool.lock._is_owned()
        first = True
        while True:
            with self.pool.lock:
                self._check()
                self._bounds(offset, len(data))
                if not len(data):
                    return
                bs = self.block_size
                need = self._preserve(offset // bs, -(-(offset + len(data)) // bs), track=first)
                if need and not group:
                    self.pool.commit(sync_origins=False)
                    need = False
                if not need:   # (I5: every copy this range needs is committed)
                    self.origin_store.pwrite(data, offset)
                    self._origin_dirty = True
                    return
                gen = self.pool.commit_epoch
            first = False
            self._group_commit(gen)

    def _group_commit(self, gen: int) -> None:
        """Return once a commit after epoch `gen` is done (made here if no other
        writer is making one)."""
        with self._gc:
            while self.pool.commit_epoch == gen and self._gc_leader:
                self._gc.wait(0.1)
            if self.pool.commit_epoch != gen:
                return
            self._gc_leader = True
        try:
            with self.pool.lock:
                if self.pool.commit_epoch == gen:
                    self.pool.commit(sync_origins=False)
        finally:
            with self._gc:
                self._gc_leader = False
                self._gc.notify_all()

    def _preserve(self, b0: int, b1: int, track: bool = True) -> bool:
        """Copy blocks the newest snapshot still reads from the origin; True when a
        commit must come before the origin is written (copies made now, or earlier
        in the open transaction by another writer). `track`: count the write for
        the sequential-stream detection (False when a writer checks again).

        A sequential writer would pay a commit (two fsyncs) per request; so when a
        write continues the previous one, blocks ahead of it are preserved in the
        same commit: up to a quarter of what the stream has written so far (which
        bounds the blocks copied but never overwritten), at most COPY_AHEAD_MAX.
        (64 MiB instead of 4 showed no clear gain through FUSE: a COW overwrite
        mostly waits for the synchronous copy of every byte.)
        """
        if not self.snapshot_rows:
            return False
        pool, bs = self.pool, self.block_size
        if self._copied_epoch != pool.commit_epoch:
            self._copied.clear()
            self._copied_epoch = pool.commit_epoch
        newest = self.trees[self.snapshot_rows[-1].name]
        ptrs, _ = pool.maps.get_range(newest, b0, b1)
        if not track:
            if not (ptrs == HOLE).any():
                return bool(self._copied) and not self._copied.isdisjoint(range(b0, b1))
            sequential = False
        # part of the stream when it starts at its end, give or take a request or two:
        # the loop device cuts a 1 MiB write into two or three requests sent at once,
        # which arrive in any order (an exact match made a quarter of them restart
        # the stream); "a request" is the largest one seen lately
        else:
            w = max(b1 - b0, self._big_n)
            sequential = self._stream_end - 2 * w - 1 <= b0 <= self._stream_end + w
            self._big_n = w if sequential else max(b1 - b0, self._big_n // 2)
            self._stream_len = self._stream_len + (b1 - b0) if sequential else b1 - b0
            self._stream_end = max(self._stream_end, b1) if sequential else b1
            if not (ptrs == HOLE).any():
                return bool(self._copied) and not self._copied.isdisjoint(range(b0, b1))
        ahead = min(COPY_AHEAD_MAX, self._stream_len * bs // 4) // bs if sequential else 0
        hi = min(self.nblocks, b1 + max(ahead, 0))
        if hi > b1:
            ptrs = np.concatenate((ptrs, pool.maps.get_range(newest, b1, hi)[0]))
        need = ptrs == HOLE
        origin = self.origin_store
        step = max(1, COPY_CHUNK // bs)
        if len(self._copy_buf) < min(step, len(need)) * bs:
            self._copy_buf = bytearray(min(step, len(need)) * bs)
        for start, count in mask_runs(need):
            for s0 in range(start, start + count, step):   # a reused buffer: no fresh memory
                n = min(step, start + count - s0)
                buf = memoryview(self._copy_buf)[:n * bs]
                origin.preadinto(buf, (b0 + s0) * bs)
                which = np.flatnonzero(nonzero_blocks(buf, n, bs))
                starts = write_new_blocks(pool.space, pool.store, buf, which, bs, self.units)
                entries = np.full(n, ZERO, np.uint64)
                entries[which] = starts
                sums = np.zeros(n, np.uint64)
                sums[which] = block_sums(buf, which, bs)
                pool.maps.set_range(newest, b0 + s0, entries, sums)
                self._copied.update(range(b0 + s0, b0 + s0 + n))
        return True

    def discard(self, offset: int, length: int) -> None:
        """Zero a range of the origin (after preserving it for the snapshots)."""
        with self.pool.lock:
            self._check()
            self._bounds(offset, length)
            step = CHUNK_BLOCKS_BYTES
            for off in range(offset, offset + length, step):
                n = min(step, offset + length - off)
                self.write(off, bytes(n))

    def flush(self) -> None:
        self.pool.commit()

    def _resize(self, size: int) -> None:  # noqa: ARG002 - the contract's signature
        raise InvalidArgument(f"volume {self.name!r} is a cow volume: its size is its origin's")

    # -- snapshots -------------------------------------------------------------
    def _create_snapshot(self, name: str, labels, consistency: str, hooks) -> SnapshotRow:
        _ = self.origin_store  # a snapshot of a missing origin would be empty: refuse early
        srow = self._new_srow(name, labels, consistency, hooks, 0, levels_for(self.nblocks))
        # one commit: the origin is fsynced first (the snapshot's unchanged blocks live
        # there), then the snapshot row is published
        self.pool.commit(snapshots=[srow])
        self.snapshot_rows.append(srow)
        self.trees[name] = Tree(0, srow.levels, self.units)
        return srow

    def _resolve(self, srow: SnapshotRow, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entries, sums, in_origin mask) of blocks [b0, b1) as snapshot srow sees them."""
        n = b1 - b0
        ptrs = np.zeros(n, np.uint64)
        sums = np.zeros(n, np.uint64)
        open_ = np.ones(n, bool)
        i = self.snapshot_rows.index(srow)
        for s in self.snapshot_rows[i:]:
            p, c = self.pool.maps.get_range(self.trees[s.name], b0, b1)
            take = open_ & (p != HOLE)
            ptrs[take] = p[take]
            sums[take] = c[take]
            open_ &= ~take
            if not open_.any():
                break
        return ptrs, sums, open_

    def _snap_read(self, srow: SnapshotRow, offset: int, length: int,
                   check: Callable[[], None] = lambda: None, out: memoryview | None = None) -> bytes | None:
        with self.pool.lock:  # origin blocks may change: the whole read holds the lock
            check()
            return self._snap_read_locked(srow, offset, length, out)

    def _snap_read_locked(self, srow: SnapshotRow, offset: int, length: int,
                          out: memoryview | None = None) -> bytes | None:
        """Into `out` if given (returns None), else returns new bytes."""
        self._bounds(offset, length)
        if not length:
            return b"" if out is None else None
        bs = self.block_size
        b0, b1 = offset // bs, -(-(offset + length) // bs)
        ptrs, sums, in_origin = self._resolve(srow, b0, b1)
        start = offset - b0 * bs
        where = f" in snapshot {self.name}@{srow.name}"
        if out is not None and (start or length != (b1 - b0) * bs):
            # unaligned (a loop device cuts requests wherever its 128 pages end): no
            # scratch buffer when the blocks all come from one place
            if in_origin.all():
                self.origin_store.preadinto(out[:length], offset)
                return None
            if not in_origin.any():
                read_stored(self.pool.store, ptrs, sums, bs, out, where, b0, zero_holes=True,
                            skip=start, length=length)
                return None
        with read_buffer(out, start, length, (b1 - b0) * bs) as mv:
            zero_blocks(mv, ~in_origin & (ptrs < 2), bs)
            if in_origin.any():
                origin = self.origin_store
                for s, c in mask_runs(in_origin):
                    origin.preadinto(mv[s * bs:(s + c) * bs], (b0 + s) * bs)
            read_stored(self.pool.store, ptrs, sums, bs, mv, where, b0)
            return deliver(mv, out, start, length)

    def _delete_snapshot(self, srow: SnapshotRow) -> None:
        """Entries the next older snapshot deferred to move down to it; the rest die."""
        pool, pp = self.pool, self.pool.pages
        i = self.snapshot_rows.index(srow)
        tree = self.trees[srow.name]
        if i > 0:
            prev = self.trees[self.snapshot_rows[i - 1].name]
            for li, pid in list(pool.maps.iter_leaves(tree)):
                mine, my_sums = pp.ptr[pid].copy(), pp.csum[pid].copy()
                theirs, their_sums = pool.maps.get_range(prev, li * E, li * E + E)
                move = (theirs == HOLE) & (mine != HOLE)
                if not move.any():
                    continue
                moved = mine[move]
                if (moved >= 2).any():
                    pool.space.incref(moved[moved >= 2])
                theirs[move] = moved
                their_sums[move] = my_sums[move]
                pool.maps.set_range(prev, li * E, theirs, their_sums)
        self.snapshot_rows.remove(srow)
        del self.trees[srow.name]
        pp.decref(tree.root)
        pool.commit(deleted_snapshots=[(self.name, srow.name)])

    def _changed_mask(self, i: int, j: int | None) -> np.ndarray:
        """Blocks written after snapshot i and before snapshot j (None: up to now)."""
        n = self.nblocks
        mask = np.zeros(n, bool)
        rows = self.snapshot_rows[i:j]
        for s in rows:
            for li, p in self.pool.maps.iter_leaves(self.trees[s.name]):
                lo, hi = li * E, min(li * E + E, n)
                if lo < hi:
                    mask[lo:hi] |= self.pool.pages.ptr[p, :hi - lo] != HOLE
        return mask

    def _diff(self, ra: SnapshotRow, rb: SnapshotRow | None) -> list[dict[str, int]]:
        i = self.snapshot_rows.index(ra)
        j = self.snapshot_rows.index(rb) if rb is not None else None
        if j is not None and j < i:
            i, j = j, i
        return self._extents(self._changed_mask(i, j), self.block_size, self.size)

    def _rollback(self, srow: SnapshotRow) -> None:
        """Write the snapshot's content of every changed block back into the origin."""
        mask = self._changed_mask(self.snapshot_rows.index(srow), None)
        bs = self.block_size
        step = max(1, CHUNK_BLOCKS_BYTES // bs)
        for start, count in mask_runs(mask):
            for b in range(start, start + count, step):
                c = min(step, start + count - b)
                off = b * bs
                length = min(c * bs, self.size - off)
                self.write(off, self._snap_read(srow, off, length))
        self.pool.commit()

    def _clone_into(self, srow: SnapshotRow, clone: VolumeBase,
                    progress: Callable[[int, int], None] | None = None) -> None:
        """A ROW copy: blocks already in the pool are shared, origin blocks copied."""
        pool, bs = self.pool, self.block_size
        n = self.nblocks
        step = E
        try:
            for b0 in range(0, n, step):
                b1 = min(n, b0 + step)
                ptrs, sums, in_origin = self._resolve(srow, b0, b1)
                shared = ptrs >= 2
                entries = np.where(shared, ptrs, np.uint64(0)).astype(np.uint64)
                csums = np.where(shared, sums, np.uint64(0)).astype(np.uint64)
                if in_origin.any():
                    buf = bytearray((b1 - b0) * bs)
                    mv = memoryview(buf)
                    for s, c in mask_runs(in_origin):
                        self.origin_store.preadinto(mv[s * bs:(s + c) * bs], (b0 + s) * bs)
                    nz = nonzero_blocks(buf, b1 - b0, bs) & in_origin
                    which = np.flatnonzero(nz)
                    starts = write_new_blocks(pool.space, pool.store, buf, which, bs, self.units)
                    entries[which] = starts
                    csums[which] = block_sums(buf, which, bs)
                if shared.any():  # only once nothing in this chunk can fail
                    pool.space.incref(ptrs[shared])
                if entries.any():
                    pool.maps.set_range(clone.tree, b0, entries, csums)
                if progress:
                    progress(b1 * bs, n * bs)
        except BaseException:
            # e.g. out of space half way: give back the pages and block references
            # of the chunks already done, so the pool stays exactly as it was
            pool.pages.decref(clone.tree.root)
            raise

    def _snap_runs(self, srow: SnapshotRow) -> Iterator[tuple[int, int]]:
        """Blocks in the pool or still in the origin (a map-sized step at a time)."""
        step = 64 * E

        def pieces() -> Iterator[tuple[int, np.ndarray]]:
            for b0 in range(0, self.nblocks, step):
                ptrs, _, in_origin = self._resolve(srow, b0, min(self.nblocks, b0 + step))
                yield b0, (ptrs >= 2) | in_origin
        return join_runs(pieces())

    def _allocated_bytes(self) -> int:
        return self.size

    def _drop_all(self) -> None:
        for s in self.snapshot_rows:
            self.pool.pages.decref(self.trees[s.name].root)
