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

from .blockio import block_sums, nonzero_blocks, read_stored
from .layout import UNIT

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
    with its old content, unless it is fresh and its content is cached (the other
    half of a request the loop device cut in two): then only the new bytes are
    written, in place. Zero blocks become holes, fresh blocks are overwritten in
    place, every other block gets new space; the map changes only after the data
    is written, so a failed write leaves the volume as it was.
    """
    pool, bs, units = vol.pool, vol.block_size, vol.units
    space, cache = pool.space, pool.partial
    b0 = offset // bs
    end = offset + len(data)
    b1 = -(-end // bs)
    n = b1 - b0
    head = offset - b0 * bs
    old, old_sums = pool.maps.get_range(vol.tree, b0, b1)
    # (units 0 and 1 are the store header, never fresh: holes need no mask here)
    fresh = space.is_fresh(old)
    any_fresh = np.count_nonzero(fresh) > 0   # (count_nonzero: a fraction of .any()'s cost)

    # partial blocks at the ends: index -> whole-block buffer, or None when only
    # the new bytes are written in place
    edges: dict[int, bytearray | None] = {}
    starts = None
    try:
        partial_last = end < b1 * bs
        for e in ([0] if head else []) + ([n - 1] if partial_last and not (head and n == 1) else []):
            lo = head if e == 0 else 0
            hi = end - (b0 + e) * bs if e == n - 1 else bs
            piece = data[(b0 + e) * bs + lo - offset:(b0 + e) * bs + hi - offset]
            buf = cache.get(int(old[e])) if any_fresh and fresh[e] else None
            if buf is not None:
                buf[lo:hi] = piece
                edges[e] = None
            else:
                buf = cache.buffer(bs)
                if old[e] >= 2:
                    read_stored(pool.store, old[e:e + 1], old_sums[e:e + 1], bs, buf,
                                f" in volume {vol.name}", b0 + e)
                else:
                    arr = np.frombuffer(buf, np.uint8)
                    arr[:lo] = 0
                    arr[hi:] = 0
                buf[lo:hi] = piece
                edges[e] = buf
            # (an all-zero block becomes a hole, cached or not: zeros take no space)
            nz[e] = np.count_nonzero(np.frombuffer(buf, np.uint64)) > 0
            if nz[e]:
                sums[e] = _xxh(buf)

        m0, m1 = (1 if head else 0), (n - 1 if partial_last else n)
        # where each block goes: fresh blocks in place, others to new space, zeros nowhere
        all_nz = np.count_nonzero(nz) == n
        need = nz & ~fresh if any_fresh else nz
        count = n if all_nz and not any_fresh else np.count_nonzero(need)
        starts = space.alloc(count, units) if count else None
        # the allocator hands out ascending units (a wrap-around starts lower), so an
        # allocation that spans exactly `count` blocks is one run in volume order; when
        # every whole block is among them (the edges may be in place), so are they
        in_order = (bool(count) and int(starts[-1]) - int(starts[0]) == (count - 1) * units
                    and np.count_nonzero(need[m0:m1]) == m1 - m0)
        if count == n:
            dest = starts
        else:
            dest = np.where(need, np.uint64(0), old) if any_fresh else np.zeros(n, np.uint64)
            if not all_nz:
                dest[~nz] = 0
            if count:
                dest[need] = starts
        _write_pieces(pool.store, data, head, bs, m0, m1, dest, nz, all_nz, edges, in_order)
    except BaseException:
        # nothing reached the map; an edge whose cached copy was already updated
        # no longer matches the store (and may not have reached it): forget it
        if starts is not None:
            space.release_now(starts, units)
        for e, buf in edges.items():
            if buf is None:
                cache.drop(int(old[e]))
            else:
                cache.recycle(buf)
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
    for e, buf in edges.items():
        if buf is None:
            if not nz[e]:   # now a hole: its unit is on its way out
                cache.drop(int(old[e]))
            continue
        if nz[e]:
            cache.put(int(dest[e]), buf)
        else:
            if fresh[e]:
                cache.drop(int(old[e]))
            cache.recycle(buf)
    pool.mark_dirty(vol.name)


def _write_pieces(store, data: memoryview, head: int, bs: int, m0: int, m1: int, dest: np.ndarray,
                  nz: np.ndarray, all_nz: bool, edges: dict[int, bytearray | None], in_order: bool) -> None:
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
               buf: bytearray | None) -> tuple[int, int, object]:
    """A partial block: its merged buffer, or (written in place) its range of data."""
    if buf is not None:
        return int(dest[e]) * UNIT, bs, buf
    at = e * bs - head                   # where the block starts, relative to data
    lo, hi = max(at, 0), min(at + bs, length)
    return int(dest[e]) * UNIT + (lo - at), hi - lo, [lo, hi]
