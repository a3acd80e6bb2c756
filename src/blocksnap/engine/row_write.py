"""The ROW write path: one pass under the pool lock per request.

A FUSE write costs the engine a fixed amount of Python work per request, and a
1 MiB write arrives as two requests, so the path does each step once for the
whole request: one map lookup, one allocation (in volume order, so the pieces
land next to each other in the data store), one checksum pass, as few system
calls as the layout allows (`pwritev` over adjacent pieces), one map update.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xxhash

from ..store import WriteFailed
from .blockio import block_sums, nonzero_blocks, read_stored
from .layout import PAGE_ENTRIES, UNIT

if TYPE_CHECKING:
    from .row import RowVolume

_xxh = xxhash.xxh3_64_intdigest


def whole_block_sums(offset: int, data: memoryview, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero mask and checksums of the blocks a write covers (the whole ones;
    partial ones are left True and 0 for `write_blocks`).

    They depend on the data alone, so they are computed before the pool lock is
    taken: hashing overlaps another request's locked work and I/O.
    """
    b0 = offset // bs
    end = offset + len(data)
    n = -(-end // bs) - b0
    head = offset - b0 * bs
    nz = np.zeros(n, bool)
    nz[:] = True
    sums = np.zeros(n, np.uint64)
    m0, m1 = (1 if head else 0), (n - 1 if end % bs else n)
    if m1 > m0:
        middle = data[m0 * bs - head:m1 * bs - head]
        nzm = nonzero_blocks(middle, m1 - m0, bs)
        if np.count_nonzero(nzm) == m1 - m0:
            sums[m0:m1] = [_xxh(middle[i:i + bs]) for i in range(0, len(middle), bs)]
        else:
            nz[m0:m1] = nzm
            which = np.flatnonzero(nzm)
            sums[m0 + which] = block_sums(middle, which, bs)
    return nz, sums


def write_blocks(vol: "RowVolume", offset: int, data: memoryview, nz: np.ndarray, sums: np.ndarray) -> None:
    """Write `data` at `offset` (the caller holds the pool lock and checked bounds;
    `nz` and `sums` come from `whole_block_sums`).

    Whole blocks go straight from `data`. A partial block at either end is merged
    with its old content (from the cache of partly written blocks, or read and
    checked) to get its new checksum; then, if the block may be written in place
    (fresh, or reached by the live map alone: see `in_place`), only the new bytes
    are written there, else the merged block goes to new space. Zero blocks become
    holes, fresh whole blocks are overwritten in place, every other whole block
    gets new space; the map changes only after the data is written, so a failed
    write leaves the volume as it was (an in-place edge gets the checksum of what
    the store then holds).
    """
    pool, bs, units = vol.pool, vol.block_size, vol.units
    space, cache = pool.space, pool.partial
    b0 = offset // bs
    end = offset + len(data)
    b1 = -(-end // bs)
    n = b1 - b0
    head = offset - b0 * bs
    pool.direct.revoke_range(vol, b0, b1)   # (its cached blocks and units are the engine's again)
    old, old_sums = pool.maps.get_range(vol.tree, b0, b1)
    # (units 0 and 1 are the store header, never fresh: holes need no mask here)
    fresh = space.is_fresh(old)
    inplace = fresh
    any_fresh = any_inplace = np.count_nonzero(fresh) > 0   # (count_nonzero: a fraction of .any()'s cost)

    # partial blocks at the ends: index -> (whole-block buffer, written in place)
    edges: dict[int, tuple[bytearray, bool]] = {}
    starts = None
    sent = False                # the store writes were started
    committed: list[int] = []   # edges written in place into a committed block
    try:
        partial_last = end < b1 * bs
        for e in ([0] if head else []) + ([n - 1] if partial_last and not (head and n == 1) else []):
            lo = head if e == 0 else 0
            hi = end - (b0 + e) * bs if e == n - 1 else bs
            piece = data[(b0 + e) * bs + lo - offset:(b0 + e) * bs + hi - offset]
            here = bool(fresh[e])
            if not here and old[e] >= 2 and in_place(pool, vol.tree, b0 + e, int(old[e])):
                here = True
                committed.append(e)
                if not any_inplace:
                    inplace, any_inplace = fresh.copy(), True
                inplace[e] = True
            buf = cache.get(int(old[e])) if here else None
            if buf is None:
                buf = cache.buffer(bs)
                if old[e] >= 2:
                    try:
                        read_stored(pool.store, old[e:e + 1], old_sums[e:e + 1], bs, buf,
                                    f" in volume {vol.name}", b0 + e)
                    except BaseException:
                        cache.recycle(buf)
                        raise
                else:
                    arr = np.frombuffer(buf, np.uint8)
                    arr[:lo] = 0
                    arr[hi:] = 0
            buf[lo:hi] = piece
            edges[e] = (buf, here)
            # (an all-zero block becomes a hole, cached or not: zeros take no space)
            nz[e] = np.count_nonzero(np.frombuffer(buf, np.uint64)) > 0
            if nz[e]:
                sums[e] = _xxh(buf)

        m0, m1 = (1 if head else 0), (n - 1 if partial_last else n)
        # where each block goes: in place, to new space, or (zeros) nowhere
        all_nz = np.count_nonzero(nz) == n
        need = nz & ~inplace if any_inplace else nz
        count = n if all_nz and not any_inplace else np.count_nonzero(need)
        starts = space.alloc(count, units) if count else None
        # the allocator hands out ascending units (a wrap-around starts lower), so an
        # allocation that spans exactly `count` blocks is one run in volume order; when
        # every whole block is among them (the edges may be in place), so are they
        in_order = (bool(count) and int(starts[-1]) - int(starts[0]) == (count - 1) * units
                    and np.count_nonzero(need[m0:m1]) == m1 - m0)
        if count == n:
            dest = starts
        else:
            dest = np.where(need, np.uint64(0), old) if any_inplace else np.zeros(n, np.uint64)
            if not all_nz:
                dest[~nz] = 0
            if count:
                dest[need] = starts
        if committed:
            # the log first: after a crash these blocks get the checksum of what they hold
            pool.inplace.cover(old[[e for e in committed if nz[e]]])
        sent = True
        _write_pieces(pool.store, data, head, bs, m0, m1, dest, nz, all_nz, edges, in_order)
    except BaseException:
        # nothing reached the map; a block written in place holds old or new bytes:
        # its checksum must say which, and its cached copy is forgotten
        if starts is not None:
            space.release_now(starts, units)
        for e, (buf, here) in edges.items():
            _forget(cache, int(old[e]), buf)
            if sent and here and old[e] >= 2 and nz[e]:
                _resync_sum(pool, vol.tree, b0 + e, int(old[e]), bs)
        raise
    replaced = pool.maps.set_range(vol.tree, b0, dest, sums)
    if np.count_nonzero(replaced):
        dropped = replaced[(replaced >= 2) & (replaced != dest)]
        if len(dropped):
            space.decref(dropped, units)
    if any_fresh and len(cache):   # fresh blocks rewritten whole, or now holes: stale entries
        stale = fresh.copy()
        for e in edges:
            stale[e] = False
        for unit in old[stale].tolist():
            cache.drop(unit)
    for e, (buf, _) in edges.items():
        if nz[e]:
            cache.put(int(dest[e]), buf)
        else:   # now a hole: its unit is on its way out
            _forget(cache, int(old[e]), buf)
    pool.mark_dirty(vol.name)


def _forget(cache, unit: int, buf: bytearray) -> None:
    """Drop the cached copy of `unit` and give `buf` back, once (it may be that copy)."""
    if cache.get(unit) is not buf:
        cache.recycle(buf)
    cache.drop(unit)


def write_small(vol: "RowVolume", offset: int, data: memoryview) -> bool:
    """The common small random write: inside one stored block (or that whole
    block) that may be written in place. Only the new bytes go to the store, and the block's checksum (of the
    merged content) is set in its leaf, with none of write_blocks' array work (the
    caller holds the pool lock and checked bounds). False when the write is not of
    that kind (nothing done): write_blocks takes it.
    """
    pool, bs = vol.pool, vol.block_size
    b = offset // bs
    lo = offset - b * bs
    hi = lo + len(data)
    if hi > bs:
        return False
    pool.direct.revoke_range(vol, b, b + 1)
    pp = pool.pages
    p = pool.maps.leaf(vol.tree, b // PAGE_ENTRIES)
    if not p:
        return False
    i = b % PAGE_ENTRIES
    unit = int(pp.ptr[p, i])
    if unit < 2:
        return False
    fresh = bool(pool.space.fresh[unit])
    if not fresh and not in_place(pool, vol.tree, b, unit):
        return False
    cache = pool.partial
    buf = cache.get(unit)
    have = buf is not None
    if not have:
        buf = cache.buffer(bs)
    region_logged = fresh or pool.inplace.covers(unit)
    fast = getattr(pool.store, "merge_write", None) if region_logged else None
    writing = False   # the store write began: the block may hold part of the new bytes
    try:
        if fast is not None:
            # compiled: read and check the block, merge, write the new bytes, hash,
            # all without the GIL (store/_blockread.c)
            try:
                status, new_sum = fast(unit * UNIT, lo, data, buf, have, int(pp.csum[p, i]))
            except WriteFailed as e:
                writing = True
                raise e.error from None
            if status == 1:
                read_stored(pool.store, pp.ptr[p, i:i + 1], pp.csum[p, i:i + 1], bs, buf,
                            f" in volume {vol.name}", b)   # raises, naming the block
            if status:
                if not have:
                    cache.recycle(buf)
                return False
        else:
            if not have and hi - lo < bs:
                read_stored(pool.store, pp.ptr[p, i:i + 1], pp.csum[p, i:i + 1], bs, buf,
                            f" in volume {vol.name}", b)
            saved = bytes(buf[lo:hi])
            buf[lo:hi] = data
            if not np.count_nonzero(np.frombuffer(buf, np.uint64)):
                buf[lo:hi] = saved   # all zeros now: a hole, which write_blocks makes
                if not have:
                    cache.recycle(buf)
                return False
            if not region_logged:   # (after the read: a bad block is reported, never re-hashed)
                pool.inplace.cover(pp.ptr[p, i:i + 1])
            writing = True
            pool.store.pwrite(data, unit * UNIT + lo)
            new_sum = _xxh(buf)
    except BaseException:
        if have:
            cache.drop(unit)
        else:
            cache.recycle(buf)
        if writing:
            _resync_sum(pool, vol.tree, b, unit, bs)
        raise
    if not have:
        cache.put(unit, buf)
    pp.csum[p, i] = new_sum
    pp.dirty.add(p)   # (the path above it is unshared and its pointers unchanged)
    pool.mark_dirty(vol.name)
    return True


def in_place(pool, tree, block: int, unit: int, path_only: bool = False) -> bool:
    """May committed block `block` (stored at `unit`) be written in place? Only if
    nothing but this live map reaches it: one reference to the unit, and every page
    on the map's path to its leaf unshared (a snapshot or clone shares the root).
    `path_only`: the path alone (the caller checks the units of the leaf)."""
    if not path_only and pool.space.bref[unit] != 1:
        return False
    pp = pool.pages
    p = tree.root
    if not p or pp.ref[p] != 1:
        return False
    li = block // PAGE_ENTRIES
    for h in range(tree.levels - 1, 0, -1):
        p = int(pp.ptr[p, (li // PAGE_ENTRIES ** (h - 1)) % PAGE_ENTRIES])
        if not p or pp.ref[p] != 1:
            return False
    return True


def _resync_sum(pool, tree, block: int, unit: int, bs: int) -> None:
    """After a failed in-place write: the map's checksum of `block` becomes that of
    whatever the store holds now (old bytes, new ones or a mix, as a disk leaves a
    failed write), so it does not read as corrupt. Best effort."""
    try:
        got = _xxh(pool.store.pread(bs, unit * UNIT))
    except OSError:
        return
    pool.maps.set_range(tree, block, np.array([unit], np.uint64), np.array([got], np.uint64))


def _write_pieces(store, data: memoryview, head: int, bs: int, m0: int, m1: int, dest: np.ndarray,
                  nz: np.ndarray, all_nz: bool, edges: dict[int, tuple[bytearray, bool]], in_order: bool) -> None:
    """Send the non-zero blocks to `dest`, one `pwritev` per run of adjacent pieces.

    A piece is a range of `data` (whole blocks, and the new bytes of an edge
    written in place: adjacent ranges merge into one) or a merged edge buffer.
    Block i starts at i * bs - head in `data`. `in_order`: the middle blocks are
    all non-zero and sit next to each other in the store, in order.
    """
    items: list[tuple[int, int, object]] = []   # (store offset, length, [lo, hi] of data, or a buffer)
    if m0 and nz[0]:
        items.append(_edge_item(len(data), head, bs, 0, dest, edges[0]))
    if m1 > m0 and in_order:
        # all new, from one allocation (ascending): one run when they span exactly
        items.append((int(dest[m0]) * UNIT, (m1 - m0) * bs, [m0 * bs - head, m1 * bs - head]))
    elif m1 > m0:
        # runs of middle blocks that are non-zero and next to each other in the store
        idx = np.arange(m0, m1) if all_nz else np.flatnonzero(nz[m0:m1]) + m0
        if len(idx):
            d = dest[idx].astype(np.int64)
            step = d[1:] - d[:-1] != bs // UNIT
            if all_nz:   # (np.diff is a slow Python-level function: slices instead)
                brk = np.flatnonzero(step) + 1 if np.count_nonzero(step) else ()
            else:
                brk = np.flatnonzero(step | (idx[1:] - idx[:-1] != 1)) + 1
            bounds = [0, *[int(x) for x in brk], len(idx)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                lo, hi = int(idx[a]) * bs - head, (int(idx[b - 1]) + 1) * bs - head
                items.append((int(d[a]) * UNIT, hi - lo, [lo, hi]))
    last = len(nz) - 1
    if m1 <= last and (last > 0 or not m0) and nz[last]:
        items.append(_edge_item(len(data), head, bs, last, dest, edges[last]))
    runs: list[list] = []   # [store offset, pieces, store offset after them]
    for off, size, piece in items:
        if runs and runs[-1][2] == off:
            prev = runs[-1][1][-1]
            if type(piece) is list and type(prev) is list and prev[1] == piece[0]:
                prev[1] = piece[1]
            else:
                runs[-1][1].append(piece)
            runs[-1][2] = off + size
        else:
            runs.append([off, [piece], off + size])
    for off, pieces, _ in runs:
        store.pwritev([data[p[0]:p[1]] if type(p) is list else p for p in pieces], off)


def _edge_item(length: int, head: int, bs: int, e: int, dest: np.ndarray,
               edge: tuple[bytearray, bool]) -> tuple[int, int, object]:
    """A partial block: its merged buffer, or (written in place) its range of data."""
    buf, here = edge
    if not here:
        return int(dest[e]) * UNIT, bs, buf
    at = e * bs - head                   # where the block starts, relative to data
    lo, hi = max(at, 0), min(at + bs, length)
    return int(dest[e]) * UNIT + (lo - at), hi - lo, [lo, hi]
