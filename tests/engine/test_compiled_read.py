"""The compiled read path (store/_blockread.c) against the Python one it replaces.

Both fill the same buffer from the same store file for any block map: runs in
order, runs out of order, holes (zeroed or left alone), blocks past the end of
the file, and a block whose checksum does not match.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap.engine.blockio import read_stored
from blocksnap.engine.layout import UNIT
from blocksnap.errors import CorruptionError
from blocksnap.store import FileStore

STORE_UNITS = 64


class PythonStore(FileStore):
    """The same file, read by blockio's Python path."""
    read_mapped = None


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "data")
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, STORE_UNITS * UNIT, np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    fast, slow = FileStore(path, writable=False), PythonStore(path, writable=False)
    yield fast, slow, data
    fast.close()
    slow.close()


def test_the_compiled_path_is_built():
    """setup.py builds it as optional: CI must prove the build really happened."""
    assert FileStore.read_mapped is not None


def _sums(data: bytes, ptrs: np.ndarray, bs: int) -> np.ndarray:
    out = np.zeros(len(ptrs), np.uint64)
    for i, p in enumerate(ptrs.tolist()):
        if p >= 2:
            block = data[p * UNIT:p * UNIT + bs]
            out[i] = xxhash.xxh3_64_intdigest(block + bytes(bs - len(block)))
    return out


def _read(store, ptrs, sums, bs, zero_holes):
    buf = bytearray(b"\xaa" * (len(ptrs) * bs))
    try:
        read_stored(store, ptrs, sums, bs, buf, " here", 100, zero_holes=zero_holes)
    except CorruptionError as e:
        return bytes(buf), str(e)
    return bytes(buf), None


@settings(max_examples=150, deadline=None)
@given(units_per_block=st.sampled_from([1, 2, 4]),
       layout=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, STORE_UNITS + 8)),
                       min_size=1, max_size=24),
       runs=st.booleans(), zero_holes=st.booleans(), corrupt=st.integers(-1, 23))
def test_same_bytes_and_same_verdict_as_python(stores, units_per_block, layout, runs, zero_holes, corrupt):
    fast, slow, data = stores
    bs = units_per_block * UNIT
    if runs:   # stretch each stored entry into a run of adjacent blocks, as writes lay them out
        ptrs = []
        for p in layout:
            ptrs += [p] if p < 2 else [p + i * units_per_block for i in range(3)]
    else:
        ptrs = layout
    ptrs = np.array(ptrs, np.uint64)
    sums = _sums(data, ptrs, bs)
    stored = np.flatnonzero(ptrs >= 2)
    if corrupt >= 0 and len(stored):
        sums[stored[corrupt % len(stored)]] ^= np.uint64(1)
    got_fast, err_fast = _read(fast, ptrs, sums, bs, zero_holes)
    got_slow, err_slow = _read(slow, ptrs, sums, bs, zero_holes)
    assert err_fast == err_slow
    if err_fast is None:
        assert got_fast == got_slow
    if corrupt >= 0 and len(stored):
        assert err_fast is not None and f"at block {100 + stored[corrupt % len(stored)]}" in err_fast
    else:
        assert err_fast is None
        for i, p in enumerate(ptrs.tolist()):   # and both are right, not just equal
            block = got_fast[i * bs:(i + 1) * bs]
            if p >= 2:
                want = data[p * UNIT:p * UNIT + bs]
                assert block == want + bytes(bs - len(want))   # past the end: zeros
            else:
                assert block == (bytes(bs) if zero_holes else b"\xaa" * bs)


@settings(max_examples=150, deadline=None)
@given(units_per_block=st.sampled_from([1, 4]),
       layout=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, STORE_UNITS + 8)),
                       min_size=1, max_size=6),
       cut=st.tuples(st.floats(0, 0.999), st.floats(0.001, 1)), corrupt=st.integers(-1, 5))
def test_unaligned_range_straight_into_the_buffer(stores, units_per_block, layout, cut, corrupt):
    """A request that starts or ends inside a block (a loop device splits wherever
    its 128 pages end): bytes [skip, skip+length) of the blocks, edge blocks
    checked whole, the same from both paths."""
    fast, slow, data = stores
    bs = units_per_block * UNIT
    ptrs = np.array(layout, np.uint64)
    n = len(ptrs)
    skip = int(cut[0] * bs)
    end = max((n - 1) * bs + max(1, int(cut[1] * bs)), skip + 1)   # every block used
    length = end - skip
    sums = _sums(data, ptrs, bs)
    stored = np.flatnonzero(ptrs >= 2)
    if corrupt >= 0 and len(stored):
        sums[stored[corrupt % len(stored)]] ^= np.uint64(1)
    results = []
    for store in (fast, slow):
        buf = bytearray(b"\xaa" * length + b"\x55" * 16)   # and nothing written past length
        try:
            read_stored(store, ptrs, sums, bs, buf, " here", 100, zero_holes=True, skip=skip, length=length)
            results.append((bytes(buf[:length]), None))
        except CorruptionError as e:
            results.append((None, str(e)))
        assert buf[length:] == b"\x55" * 16
    assert results[0] == results[1]
    if corrupt >= 0 and len(stored):
        assert results[0][1] is not None and f"at block {100 + stored[corrupt % len(stored)]}" in results[0][1]
    else:
        want = bytearray()
        for p in ptrs.tolist():
            block = data[p * UNIT:p * UNIT + bs] if p >= 2 else b""
            want += block + bytes(bs - len(block))
        assert results[0] == (bytes(want[skip:end]), None)


def test_holes_only_never_reach_the_store(stores, monkeypatch):
    fast, _, _ = stores
    monkeypatch.setattr(fast, "read_mapped", lambda *a, **k: pytest.fail("store read for holes"))
    buf = bytearray(b"\xaa" * 2 * UNIT)
    read_stored(fast, np.array([0, 1], np.uint64), np.zeros(2, np.uint64), UNIT, buf, zero_holes=True)
    assert buf == bytes(2 * UNIT)


def test_io_error_is_an_oserror(tmp_path):
    path = str(tmp_path / "data")
    with open(path, "wb") as f:
        f.write(bytes(4 * UNIT))
    store = FileStore(path, writable=False)
    os.close(store.fd)
    try:
        with pytest.raises(OSError) as e:
            read_stored(store, np.array([2], np.uint64), np.zeros(1, np.uint64), UNIT, bytearray(UNIT))
        assert e.value.errno == errno.EBADF
    finally:
        store.fd = os.open(path, os.O_RDONLY)
        store.close()


def test_bad_arguments_are_refused(stores):
    fast, _, _ = stores
    with pytest.raises(TypeError):
        fast.read_mapped(np.array([2], np.int32), np.zeros(1, np.uint64), UNIT, UNIT, bytearray(UNIT),
                         zero_holes=True, verify=True)
    with pytest.raises(ValueError):
        fast.read_mapped(np.array([2, 3], np.uint64), np.zeros(2, np.uint64), UNIT, UNIT, bytearray(UNIT),
                         zero_holes=True, verify=True)
    with pytest.raises(ValueError):
        fast.read_mapped(np.array([2], np.uint64), np.zeros(1, np.uint64), UNIT + 1, UNIT, bytearray(2 * UNIT),
                         zero_holes=True, verify=True)
    with pytest.raises(BufferError):
        fast.read_mapped(np.array([2], np.uint64), np.zeros(1, np.uint64), UNIT, UNIT, bytes(UNIT),
                         zero_holes=True, verify=True)
    for skip, length in [(UNIT, 1), (0, 0), (5, 0), (0, UNIT + 1), (-1, 10)]:   # every block used, no more
        with pytest.raises(ValueError):
            fast.read_mapped(np.array([2], np.uint64), np.zeros(1, np.uint64), UNIT, UNIT, bytearray(2 * UNIT),
                             zero_holes=True, verify=True, skip=skip, length=length)
    with pytest.raises(ValueError):   # out too short for the range
        fast.read_mapped(np.array([2, 3], np.uint64), np.zeros(2, np.uint64), UNIT, UNIT, bytearray(UNIT),
                         zero_holes=True, verify=True, skip=10, length=UNIT + 10)
    with pytest.raises(ValueError):   # a range read cannot leave holes alone
        fast.read_mapped(np.array([2], np.uint64), np.zeros(1, np.uint64), UNIT, UNIT, bytearray(UNIT),
                         zero_holes=False, verify=True, skip=10, length=100)


def test_sizes_that_would_overflow_are_refused(stores):
    """n * block_size and ptr * unit must never wrap into a small, valid-looking number."""
    fast, _, _ = stores
    with pytest.raises(ValueError):   # 4 blocks of 2**62 bytes would wrap n * bs to 0: over the 1 GiB cap
        fast.read_mapped(np.array([0, 2, 2, 2], np.uint64), np.zeros(4, np.uint64), 1 << 62, UNIT,
                         bytearray(UNIT), zero_holes=True, verify=True)
    with pytest.raises(OSError) as e:   # a map entry whose byte offset would wrap to store unit 2
        fast.read_mapped(np.array([(1 << 52) + 2], np.uint64), np.zeros(1, np.uint64), UNIT, UNIT,
                         bytearray(UNIT), zero_holes=True, verify=False)
    assert e.value.errno == errno.EOVERFLOW


def test_python_path_reads_past_a_short_preadv(tmp_path, monkeypatch):
    """One preadv returns at most 2 GiB - 4 KiB: a short read is not the end of the file."""
    path = str(tmp_path / "data")
    data = os.urandom(4 * UNIT)
    with open(path, "wb") as f:
        f.write(data)
    store = PythonStore(path, writable=False)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:UNIT]], off))
    buf = bytearray(b"\xaa" * 5 * UNIT)
    store.preadinto(memoryview(buf), 0)
    store.close()
    assert buf == data + bytes(UNIT)
