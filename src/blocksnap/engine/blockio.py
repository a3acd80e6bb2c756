"""Moving whole blocks between buffers and the data store, with checksums.

Runs of blocks that sit next to each other in the store are read or written with
one system call; every block read from the store is checked against its xxh3.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import numpy as np
import xxhash

from ..errors import CorruptionError
from .layout import UNIT

_xxh = xxhash.xxh3_64_intdigest


def block_sums(buf: memoryview | bytes | bytearray, which: np.ndarray, bs: int) -> np.ndarray:
    """xxh3-64 of the blocks `which` of buf."""
    mv = memoryview(buf)
    return np.fromiter((_xxh(mv[int(i) * bs:(int(i) + 1) * bs]) for i in which), np.uint64, len(which))


def nonzero_blocks(buf: bytes | bytearray | memoryview, n: int, bs: int) -> np.ndarray:
    """Mask of blocks holding any non-zero byte (vectorised, no Python loop)."""
    arr = np.frombuffer(buf, np.uint64, count=n * bs // 8).reshape(n, bs // 8)
    mask = arr[:, 0] != 0            # most data blocks start with a non-zero word
    if np.count_nonzero(mask) < n:
        rest = np.flatnonzero(~mask)
        mask[rest] = arr[rest].any(axis=1)
    return mask


def runs(values: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Split indexes into runs where values[i+1] == values[i] + step: (first, count)."""
    if not len(values):
        return []
    v = values.astype(np.int64)
    breaks = np.flatnonzero(np.diff(v) != step) + 1
    bounds = np.concatenate(([0], breaks, [len(v)]))
    return [(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(len(bounds) - 1)]


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, count) of each run of True in a boolean mask."""
    if not len(mask):
        return []
    m = np.concatenate(([False], mask.astype(bool), [False]))
    d = np.diff(m.astype(np.int8))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def join_runs(pieces: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, int]]:
    """(start, count) runs of True across masks given as (first index, mask) in order,
    a run that crosses from one mask into the next joined into one (maps are read a
    leaf at a time, never as one array as large as the volume)."""
    run_start, run_end = -1, -1
    for base, mask in pieces:
        for s, c in mask_runs(mask):
            s += base
            if s == run_end:
                run_end = s + c
                continue
            if run_end > run_start >= 0:
                yield run_start, run_end - run_start
            run_start, run_end = s, s + c
    if run_end > run_start >= 0:
        yield run_start, run_end - run_start


def read_stored(store, ptrs: np.ndarray, sums: np.ndarray, bs: int, buf: bytearray,
                where: str = "", base_block: int = 0, verify: bool = True, zero_holes: bool = False,
                skip: int = 0, length: int | None = None) -> None:
    """Fill buf[i*bs:(i+1)*bs] for every i with a stored block (ptr >= 2); zero the
    others if zero_holes, else leave them alone. With skip/length, buf receives
    only bytes [skip, skip+length) of the blocks (holes zeroed): a request that is
    not block-aligned needs no buffer of its own.

    The store's compiled read path does it all with the GIL released when it has
    one (FileStore.read_mapped); the Python path below is the same work.
    """
    n = len(ptrs)
    if length is None:
        length = n * bs - skip
    whole = skip == 0 and length == n * bs
    fast = getattr(store, "read_mapped", None)
    if fast is not None:
        if n and int(ptrs.max()) >= 2:
            bad = fast(np.ascontiguousarray(ptrs, np.uint64), np.ascontiguousarray(sums, np.uint64), bs, UNIT,
                       buf, zero_holes=zero_holes or not whole, verify=verify,
                       **({} if whole else {"skip": skip, "length": length}))
            if bad >= 0:
                _corrupt(where, base_block, bad, ptrs)
        elif not whole:
            memoryview(buf)[:length] = bytes(length)
        elif zero_holes:
            zero_blocks(buf, ptrs < 2, bs)
        return
    if not whole:
        with read_buffer(None, 0, n * bs, n * bs) as scratch:
            read_stored(store, ptrs, sums, bs, scratch, where, base_block, verify, zero_holes=True)
            memoryview(buf)[:length] = scratch[skip:skip + length]
        return
    if zero_holes:
        zero_blocks(buf, ptrs < 2, bs)
    units = bs // UNIT
    mv = memoryview(buf)
    n = len(ptrs)
    first = int(ptrs[0]) if n else 0
    if first >= 2 and (n == 1 or int(ptrs[-1]) - first == (n - 1) * units
                       and not np.count_nonzero(ptrs[1:] - ptrs[:-1] != units)):
        # the common case: one run, laid out in order in the store (slices, not
        # np.diff, and one list of checksums: this runs for every FUSE read)
        store.preadinto(mv[:n * bs], first * UNIT)
        if verify:
            got = [_xxh(mv[i:i + bs]) for i in range(0, n * bs, bs)]
            if got != sums.tolist():
                bad = np.flatnonzero(np.array(got, np.uint64) != sums)
                _corrupt(where, base_block, int(bad[0]), ptrs)
        return
    idx = np.flatnonzero(ptrs >= 2)
    if not len(idx):
        return
    for i0, cnt, unit in _store_runs(ptrs[idx], idx, units):
        store.preadinto(mv[i0 * bs:(i0 + cnt) * bs], unit * UNIT)
    if verify:
        got = block_sums(buf, idx, bs)
        bad = idx[got != sums[idx]]
        if len(bad):
            _corrupt(where, base_block, int(bad[0]), ptrs)


def _corrupt(where: str, base_block: int, b: int, ptrs: np.ndarray) -> None:
    raise CorruptionError(
        f"checksum mismatch{where} at block {base_block + b} "
        f"(data store offset {int(ptrs[b]) * UNIT}): data is corrupt")


def write_stored(store, starts: np.ndarray, bs: int, buf: bytes | bytearray | memoryview,
                 which: np.ndarray) -> None:
    """Write buffer blocks `which` to store blocks `starts` (same length), coalesced."""
    mv = memoryview(buf)
    if not len(which):
        return
    for i0, cnt, unit in _store_runs(starts, which, bs // UNIT):
        store.pwrite(mv[i0 * bs:(i0 + cnt) * bs], unit * UNIT)


def _store_runs(starts: np.ndarray, which: np.ndarray, units: int) -> list[tuple[int, int, int]]:
    """(first buffer block, count, first store unit) of each run of blocks that sit
    next to each other both in the buffer (`which`) and in the store (`starts`)."""
    key = starts.astype(np.int64) - which.astype(np.int64) * units
    breaks = np.flatnonzero((np.diff(key) != 0) | (np.diff(which) != 1)) + 1
    bounds = np.concatenate(([0], breaks, [len(which)]))
    return [(int(which[a]), int(b - a), int(starts[a])) for a, b in zip(bounds[:-1], bounds[1:])]


SCRATCH_KEEP = 8 << 20   # read buffers up to this size are kept for reuse
SCRATCH_COUNT = 16       # at most this many (one per concurrent reader)
_free: list[bytearray] = []
_free_lock = threading.Lock()


@contextlib.contextmanager
def read_buffer(out: memoryview | None, start: int, length: int, nbytes: int) -> Iterator[memoryview]:
    """Where a block-aligned read of nbytes goes: straight into `out` when the
    request is block-aligned, else into a reused scratch buffer (contents
    undefined; the caller copies out of it before the block ends).

    A fresh megabyte per request costs page faults on every request (on a virtual
    machine, host faults too: the dominant cost of a cold read). The buffers are
    pooled rather than per-thread: libfuse calls in from its own threads, whose
    Python thread state (and thread-local data) lasts one request.
    """
    if out is not None and start == 0 and length == nbytes:
        yield out
        return
    if nbytes > SCRATCH_KEEP:
        yield memoryview(bytearray(nbytes))
        return
    with _free_lock:
        buf = _free.pop() if _free else None
    if buf is None or len(buf) < nbytes:
        buf = bytearray(max(nbytes, 1 << 20))
    try:
        yield memoryview(buf)[:nbytes]
    finally:
        with _free_lock:
            if len(_free) < SCRATCH_COUNT:
                _free.append(buf)


def zero_blocks(buf: memoryview, mask: np.ndarray, bs: int) -> None:
    """Zero the blocks of a block-aligned buffer where mask is set (holes)."""
    if np.count_nonzero(mask):
        np.frombuffer(buf, np.uint8, count=len(mask) * bs).reshape(-1, bs)[mask] = 0


def deliver(buf: memoryview, out: memoryview | None, start: int, length: int) -> bytes | None:
    """Hand the requested part of a block-aligned buffer over: into `out` (None
    returned), or as new bytes."""
    if out is None:
        return bytes(buf[start:start + length])
    if buf is not out:
        out[:length] = buf[start:start + length]
    return None


def write_new_blocks(space, store, buf, which: np.ndarray, bs: int, units: int) -> np.ndarray:
    """Allocate one block per index in `which` and write those buffer blocks there.

    On failure (ENOSPC from the host, I/O error) the allocation is undone, so no map
    ever sees a block whose write did not happen.
    """
    starts = space.alloc(len(which), units)
    try:
        write_stored(store, starts, bs, buf, which)
    except BaseException:
        space.release_now(starts, units)
        raise
    return starts
