"""The in-place log: regions of the data store where committed blocks may be
overwritten in place, so that a crash does not leave them failing their checksums.

Why: a small write into a 64 KiB block used to cost a whole new block (read the old
one, merge, write 64 KiB elsewhere: 16x the bytes for a 4 KiB write). A block that
only the live map of a ROW volume reaches (no snapshot, no clone shares it) can take
the write in place instead: only the new bytes are written, and the block's checksum
in the (uncommitted) map is updated. Until the next commit, the committed map still
holds the old checksum, so after a crash the block, holding some of the unflushed
bytes (any mix of sectors, as a disk with a volatile cache keeps them), would read as
corrupt. Before the first such write into a region of the store, its number is
appended here and this file is fsynced; on open after a crash every block of a
logged region that only a live map reaches gets the checksum of what it holds
(`recover`), and that is committed before anything reads it.

Records are 16 bytes, (region, xxh3 of it), so a record torn by a power cut is
ignored; a record that survives longer than needed only costs a re-check. Regions
stay logged across commits while there are at most KEEP of them (a database
rewrites the same few regions between its fsyncs: no extra fsync per commit);
past that the log is emptied after a commit, with no fsync (a record the emptying
lost is harmless). A clean close empties it.
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Callable

import numpy as np
import xxhash

from .layout import UNIT

if TYPE_CHECKING:
    from .pool import Pool

REGION_UNITS = 16384      # 64 MiB of the data store per region
KEEP = 64                 # regions kept logged across commits (4 GiB of the store)
RECORD = struct.Struct("<QQ")
_xxh = xxhash.xxh3_64_intdigest


def _check(region: int) -> int:
    return _xxh(region.to_bytes(8, "little") + b"blocksnap-inplace")


class InPlaceLog:
    def __init__(self, path: str, store_class: Callable[..., object]):
        self.store = store_class(path, create_size=0)
        self.logged: set[int] = set()
        self.count = 0                  # records in the file (the next goes after them)
        raw = self.store.pread(self.store_size(), 0)
        self.found = set()              # regions logged when the pool was last open
        self.on_emptied: Callable[[], None] = lambda: None   # (the pool's leases of in-place writes go)
        for off in range(0, len(raw) - RECORD.size + 1, RECORD.size):
            region, check = RECORD.unpack_from(raw, off)
            if check == _check(region):
                self.found.add(region)

    def store_size(self) -> int:
        return os.fstat(self.store.fd).st_size

    def covers(self, unit: int) -> bool:
        """Is the region of this unit logged already (no log write needed)?"""
        return unit // REGION_UNITS in self.logged

    def cover(self, units: np.ndarray) -> None:
        """Make sure the regions of these units are durably logged (before their
        in-place writes are sent: the caller holds the pool lock)."""
        new = {int(u) // REGION_UNITS for u in units.tolist()} - self.logged
        if not new:
            return
        recs = b"".join(RECORD.pack(r, _check(r)) for r in sorted(new))
        self.store.pwrite(recs, self.count * RECORD.size)
        self.store.sync()
        self.count += len(new)
        self.logged |= new

    def committed(self, closing: bool = False) -> None:
        """A commit made every in-place write so far durable, with its checksum."""
        if self.count and (closing or len(self.logged) > KEEP):
            self.store.pwrite(bytes(self.count * RECORD.size), 0)
            if closing:
                self.store.sync()
            self.count = 0
            self.logged.clear()
            self.on_emptied()

    def recover(self, pool: "Pool") -> int:
        """After a crash: give every block of a logged region that only a live ROW
        map reaches the checksum of its content, commit that, and empty the log.
        Returns the number of blocks whose checksum changed."""
        if not self.found:
            return 0
        regions = np.array(sorted(self.found), np.uint64)
        fixed = 0
        for vol in pool.volumes():
            if vol.mode != "row":
                continue
            before = fixed
            for pid in exclusive_leaves(pool, vol.tree):
                fixed += _rehash_leaf(pool, pid, regions, vol.block_size)
            if fixed > before:
                pool.mark_dirty(vol.name)
        if fixed:
            pool.commit()
        self.found.clear()
        self.store.pwrite(bytes(self.store_size()), 0)
        self.store.sync()
        return fixed

    def close(self) -> None:
        self.store.close()


def exclusive_leaves(pool: "Pool", tree) -> list[int]:
    """Page ids of the leaves whose whole path only `tree` reaches."""
    pp = pool.pages
    out: list[int] = []

    def walk(p: int, h: int) -> None:
        if not p or pp.ref[p] != 1:
            return
        if h == 0:
            out.append(p)
            return
        for idx in np.flatnonzero(pp.ptr[p]).tolist():
            walk(int(pp.ptr[p, idx]), h - 1)

    if tree.root:
        walk(tree.root, tree.levels - 1)
    return out


def _rehash_leaf(pool: "Pool", pid: int, regions: np.ndarray, bs: int) -> int:
    pp = pool.pages
    ptr = pp.ptr[pid]
    cand = np.flatnonzero((ptr >= 2) & np.isin(ptr // REGION_UNITS, regions))
    if not len(cand):
        return 0
    cand = cand[pool.space.bref[ptr[cand].astype(np.int64)] == 1]
    fixed = 0
    for i in cand.tolist():
        got = _xxh(pool.store.pread(bs, int(ptr[i]) * UNIT))
        if got != int(pp.csum[pid, i]):
            pp.csum[pid, i] = got
            pp.dirty.add(pid)
            fixed += 1
    return fixed
