"""Leases: the blocks the compiled direct path may serve without the interpreter.

Why: the common request of a VM or a database is a small read, or an overwrite
inside one block that only the live map reaches. The Python engine spends ~0.15 ms
of CPU on each with the GIL held; engine/_direct.c does the same work (find the
block, check its checksum, merge, write the new bytes in place, hash) in a few
microseconds, without the GIL, many at a time. It may do so only for a block the
engine has leased to it, here, under the pool lock:

- a read lease names the leaf page and entry of a block (of a live ROW volume or
  a ROW snapshot); the direct path reads the block's unit and checksum there, so
  the engine's own later writes need no revocation for reads;
- a write lease adds the unit the block may be written in place at: granted only
  where the engine itself would write in place (one reference to the unit, every
  page on the path unshared: row_write.in_place), with the unit's region in the
  in-place log (the same crash argument as the engine's in-place writes).

Every lease of every image is revoked (`revoke_all`) when the maps change shape:
a page reference gained, dropped or copied (snapshot, clone, rollback, delete,
the first write after a snapshot), the page arrays reallocated, the in-place log
emptied, a volume resized. An engine write revokes the leases of the blocks it
writes (`revoke_range`): its cached partial blocks and units must stay its own.
Direct writes change checksums in the page arrays; `harvest` (before a commit, and
before any revocation) marks their pages and volumes dirty, so the next commit
stores them. The pool lock (a _direct.PoolLock) is held exclusively by Python and
shared by direct requests: none runs while the engine changes anything.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import HOLE, PAGE_ENTRIES, UNIT
from .row_write import in_place

try:
    from . import _direct
except ImportError:   # not compiled (setup.py): every request takes the Python path
    _direct = None

if TYPE_CHECKING:
    from .pool import Pool

MAX_IMAGES = 256
MIN_BITS, MAX_BITS = 10, 20          # lease table rows: 1 Ki .. 1 Mi per image (32 B each)


def new_lock() -> Any:
    """The pool's lock: shared with direct requests when compiled, else an RLock."""
    return _direct.PoolLock() if _direct is not None else threading.RLock()


@dataclass
class Image:
    """One volume's live image or one snapshot, open for direct requests."""

    slot: int
    obj: Any          # a RowVolume, or a Snapshot of one
    live: bool
    table: np.ndarray  # (rows, 4) uint64: [block + 1, page << 16 | index, unit, flags]
    mask: int          # row of a block: block & mask (one row per block, up to 1 Mi blocks)
    opens: int = 1
    leased: bool = False   # rows granted since the table was last cleared

    @property
    def cow(self) -> bool:
        return self.live and self.obj.mode == "cow"

    def volume(self) -> Any:
        return self.obj if self.live else self.obj.volume

    def tree(self) -> Any:
        return self.obj.tree if self.live else self.obj.volume._snap_tree(self.obj.row)


class DirectAccess:
    """The pool's leases and the state the direct path reads (owned by the Pool)."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.enabled = _direct is not None and isinstance(pool.lock, _direct.PoolLock)
        d = _direct
        self.words = (d.H_WORDS, d.IM_WORDS) if d is not None else (8, 16)
        self.state = np.zeros(self.words[0] + MAX_IMAGES * self.words[1], np.uint64)
        self.images: dict[int, Image] = {}
        self._by_key: dict[tuple[str, str | None], Image] = {}
        self._served = [0, 0]   # reads and writes of images closed since
        if not self.enabled:
            return
        st = self.state
        st[d.H_LOCK] = pool.lock.address()
        st[d.H_ENTRIES] = PAGE_ENTRIES
        st[d.H_UNIT] = UNIT
        st[d.H_FD] = pool.store.fd
        st[d.H_IMAGES] = MAX_IMAGES
        self.publish()
        pool.pages.on_grow = self.publish
        pool.pages.on_reshape = self.revoke_all

    @property
    def address(self) -> int:
        return int(self.state.ctypes.data)

    def entry_points(self) -> tuple[int, int]:
        return _direct.entry_points()

    def publish(self) -> None:
        """Where the page arrays are now (they move when the pool grows them)."""
        pp = self.pool.pages
        self.state[_direct.H_PTR] = pp.ptr.ctypes.data
        self.state[_direct.H_CSUM] = pp.csum.ctypes.data

    def _im(self, slot: int) -> np.ndarray:
        w0, w1 = self.words
        return self.state[w0 + slot * w1:w0 + (slot + 1) * w1]

    # -- images (the FUSE layer opens one per volume or snapshot it serves) ---------
    def open_image(self, obj: Any, snapshot: bool) -> int | None:
        """A slot for direct requests on `obj` (a volume, or a Snapshot), or None
        (a COW snapshot, or not compiled). The caller holds the pool lock."""
        vol = obj.volume if snapshot else obj
        if not self.enabled or (vol.mode != "row" and snapshot):
            return None
        key = (vol.name, obj.name if snapshot else None)
        im = self._by_key.get(key)
        if im is not None and (im.obj.row is obj.row if snapshot else im.obj is obj):
            im.opens += 1   # (a Snapshot object is made per lookup: the same row is the same snapshot)
            return im.slot
        if im is not None:   # a deleted and recreated one of the same name: the old image
            del self._by_key[key]   # serves nothing more, and goes with its last opener
            self._clear(im)
            self._im(im.slot)[_direct.IM_ACTIVE] = 0
        free = [s for s in range(MAX_IMAGES) if s not in self.images]
        if not free:
            return None
        bits = int(min(MAX_BITS, max(MIN_BITS, (max(vol.nblocks, 1) - 1).bit_length())))
        table = np.zeros((1 << bits, 4), np.uint64)
        im = Image(free[0], obj, not snapshot, table, (1 << bits) - 1)
        words = self._im(im.slot)
        d = _direct
        words[:] = 0
        words[d.IM_SIZE] = obj.size
        words[d.IM_BS] = vol.block_size
        words[d.IM_TABLE] = table.ctypes.data
        words[d.IM_MASK] = im.mask
        words[d.IM_KIND] = d.KIND_COW if im.cow else 0
        words[d.IM_ACTIVE] = 1
        self.images[im.slot] = im
        self._by_key[key] = im
        return im.slot

    def close_image(self, slot: int) -> None:
        """One opener fewer (under the pool lock); the last one frees the slot."""
        im = self.images.get(slot)
        if im is not None:
            im.opens -= 1
            if im.opens <= 0:
                self._drop(im)

    def _drop(self, im: Image) -> None:
        self._harvest(im)
        words = self._im(im.slot)
        self._served[0] += int(words[_direct.IM_READS])
        self._served[1] += int(words[_direct.IM_WRITES])
        words[:] = 0
        self.images.pop(im.slot, None)
        key = next((k for k, v in self._by_key.items() if v is im), None)
        if key is not None:
            del self._by_key[key]

    def set_queued(self, slot: int, ranges: list[tuple[int, int]], blocked: bool) -> None:
        """The write-behind queue holds data for these byte ranges of the live image
        (or, `blocked`, an error to report): direct requests that overlap them (all,
        when blocked) take the Python path, which orders after the queue. Called
        before the queued writes are acknowledged and after they reach the engine;
        a range being replaced is never absent meanwhile (new ones are written
        first, into free slots)."""
        d = _direct
        words = self._im(slot)
        q = words[d.IM_QUEUED:d.IM_QUEUED + 2 * d.QUEUE_SLOTS].reshape(-1, 2)
        if blocked or len(ranges) > d.QUEUE_SLOTS:
            words[d.IM_PENDING] = 1
        want = set(ranges) if len(ranges) <= d.QUEUE_SLOTS else set()
        have = {(int(lo), int(hi)) for lo, hi in q.tolist() if hi}
        free = [i for i in range(d.QUEUE_SLOTS) if not q[i, 1]]
        if len(want - have) > len(free):   # no room to add before removing: all to Python meanwhile
            words[d.IM_PENDING] = 1
            q[:] = 0
            for i, (lo, hi) in enumerate(sorted(want)):
                q[i, 0], q[i, 1] = lo, hi
            if not blocked:
                words[d.IM_PENDING] = 0
            return
        for lo, hi in want - have:
            i = free.pop()
            q[i, 0] = lo
            q[i, 1] = hi   # (last: the C side reads hi first)
        for i in range(d.QUEUE_SLOTS):
            if q[i, 1] and (int(q[i, 0]), int(q[i, 1])) not in want:
                q[i, 1] = 0
                q[i, 0] = 0
        if not blocked and len(ranges) <= d.QUEUE_SLOTS:
            words[d.IM_PENDING] = 0

    def last_write_ns(self, volume: str) -> int:
        im = self._by_key.get((volume, None))
        return int(self._im(im.slot)[_direct.IM_LAST_WRITE]) if im is not None else 0

    def counts(self) -> tuple[int, int]:
        """(reads, writes) the direct path has served since the pool opened."""
        d = _direct
        if d is None:
            return 0, 0
        return (self._served[0] + sum(int(self._im(s)[d.IM_READS]) for s in self.images),
                self._served[1] + sum(int(self._im(s)[d.IM_WRITES]) for s in self.images))

    # -- leases (all under the pool lock) -------------------------------------------
    def _rows(self, im: Image, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.int64) & im.mask

    def grant(self, slot: int, offset: int, end: int) -> None:
        """Lease the blocks of the leaf pages [offset, end) falls in (after the Python
        path served a request there): every block with a leaf page for reading, and
        in a live image where the engine itself would write in place, for writing
        too (the FUSE layer lets only handles open to write use those). A whole leaf
        at once (1024 blocks, vector work): random I/O over a volume then leaves
        the Python path after one request per leaf, not one per block."""
        im = self.images.get(slot)
        if im is None or end <= offset:
            return
        pool = self.pool
        vol = im.volume()
        if vol.deleted or pool.closed:
            return
        bs = vol.block_size
        first, last = offset // bs // PAGE_ENTRIES, (end - 1) // bs // PAGE_ENTRIES
        if im.cow:
            for li in range(first, min(last, first + 1) + 1):
                self._grant_cow(im, li)
            return
        tree = im.tree()
        for li in range(first, min(last, first + 1) + 1):
            p = pool.maps.leaf(tree, li)
            if p:   # (no leaf page yet: the engine's first write there makes one)
                self._grant_leaf(im, tree, li, p, im.live)

    def _grant_leaf(self, im: Image, tree: Any, li: int, p: int, write: bool) -> None:
        pool, d = self.pool, _direct
        pp = pool.pages
        nblocks = -(-im.obj.size // im.volume().block_size)
        n = min(PAGE_ENTRIES, nblocks - li * PAGE_ENTRIES)
        if n <= 0:
            return
        idx = np.arange(n, dtype=np.uint64)
        blocks = idx + np.uint64(li * PAGE_ENTRIES)
        units = pp.ptr[p, :n].copy()
        flags = np.full(n, d.LEASE_READ, np.uint64)
        if write and in_place(pool, tree, li * PAGE_ENTRIES, 0, path_only=True):
            stored = units >= 2
            ok = stored.copy()
            ok[stored] = pool.space.bref[units[stored].astype(np.int64)] == 1
            if np.count_nonzero(ok):
                flags[ok] |= np.uint64(d.LEASE_WRITE)
                pool.inplace.cover(units[ok])   # (before any direct write there: the crash argument)
                pool.partial.drop_units(units[ok])   # the direct path writes them now: no cached copy
        rows = self._rows(im, blocks)
        t = im.table
        self._harvest(im, rows)
        t[rows, 1] = (np.uint64(p) << np.uint64(16)) | idx
        t[rows, 2] = units
        t[rows, 3] = flags
        t[rows, 0] = blocks + np.uint64(1)
        im.leased = True

    def _grant_cow(self, im: Image, li: int) -> None:
        """A live COW volume: reads of the origin, and writes to the blocks of group
        `li` (1024 blocks) that no snapshot still needs in the origin: none exists,
        or the newest one has its copy, committed (CowVolume._preserve)."""
        vol, d = im.obj, _direct
        g0 = li * PAGE_ENTRIES
        g1 = min(g0 + PAGE_ENTRIES, vol.nblocks)
        if g1 <= g0:
            return
        blocks = np.arange(g0, g1, dtype=np.int64)
        ok = np.ones(g1 - g0, bool)
        if vol.snapshot_rows:
            newest = vol.trees[vol.snapshot_rows[-1].name]
            ok = self.pool.maps.get_range(newest, g0, g1)[0] != HOLE
            if vol._copied and vol._copied_epoch == self.pool.commit_epoch:   # (copied, not committed yet)
                ok &= ~np.isin(blocks, np.fromiter(vol._copied, np.int64))
        words = self._im(im.slot)
        words[d.IM_FD] = vol.origin_store.fd
        words[d.IM_COW_OK] = 1
        rows = self._rows(im, blocks)
        t = im.table
        self._harvest(im, rows)
        t[rows, 1] = 0
        t[rows, 2] = 0
        t[rows, 3] = np.where(ok, d.LEASE_READ | d.LEASE_WRITE, d.LEASE_READ).astype(np.uint64)
        t[rows, 0] = blocks.astype(np.uint64) + np.uint64(1)
        im.leased = True

    def revoke_range(self, vol: Any, b0: int, b1: int) -> None:
        """The engine writes blocks [b0, b1) of `vol`'s live map itself."""
        im = self._by_key.get((vol.name, None))
        if im is None or b1 <= b0:
            return
        if b1 - b0 > len(im.table):
            self._clear(im)
            return
        blocks = np.arange(b0, b1, dtype=np.uint64)
        rows = self._rows(im, blocks)
        hit = rows[im.table[rows, 0] == blocks + np.uint64(1)]
        if len(hit):
            self._harvest(im, hit)
            im.table[hit] = 0

    def revoke_all(self) -> None:
        """The maps change shape (see the module docstring): no lease stands."""
        for im in self.images.values():
            self._clear(im)
            words = self._im(im.slot)
            words[_direct.IM_COW_OK] = 0
            words[_direct.IM_SIZE] = im.obj.size   # (a resize comes through here too)

    def _clear(self, im: Image) -> None:
        if im.leased:
            self._harvest(im)
            im.table[:] = 0
            im.leased = False

    def harvest(self) -> None:
        """Pages whose checksums direct writes changed become dirty (before a commit)."""
        for im in self.images.values():
            self._harvest(im)

    def _harvest(self, im: Image, rows: np.ndarray | None = None) -> None:
        """Rows (default: all) that direct writes marked: their pages become dirty
        (a COW origin: to be synced), and the mark goes."""
        if not im.live or not im.leased:
            return
        written = np.uint64(_direct.LEASE_WRITTEN)
        if rows is None:
            hit = np.flatnonzero(im.table[:, 3] & written)
        else:
            hit = rows[im.table[rows, 3] & written != 0]
        if not len(hit):
            return
        if im.cow:   # written to the origin: the next commit syncs it
            im.obj._origin_dirty = True
        else:
            self.pool.pages.dirty.update((im.table[hit, 1] >> np.uint64(16)).astype(np.int64).tolist())
            self.pool.mark_dirty(im.obj.name)
        im.table[hit, 3] &= ~written

    def close(self) -> None:
        """The pool closes: every image goes (after a last harvest)."""
        for im in list(self.images.values()):
            self._drop(im)
