"""ROW writes cut inside a block (as the loop device cuts 1 MiB writes in two).

The second request writes its part of the shared block in place, from the content
the first one cached, without reading the block back; these tests hold it to that,
and to the cases where the cache must not be used (after a commit, after a failed
write), checking every byte and every checksum (reads verify them; a reopened pool
has no cache to lean on).
"""
from __future__ import annotations

import os

import pytest

import blocksnap
import blocksnap.engine.row_write as row_write
from blocksnap.errors import OutOfSpace

BS = 64 << 10
KiB = 1 << 10


@pytest.fixture
def reads(monkeypatch):
    """Counts the blocks the ROW write path reads back from the data store."""
    count = {"n": 0}
    real = row_write.read_stored

    def counting(store, ptrs, *a, **k):
        count["n"] += len(ptrs)
        return real(store, ptrs, *a, **k)

    monkeypatch.setattr(row_write, "read_stored", counting)
    return count


def _vol(tmp_path, size=4 << 20):
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=64 << 20)
    return pool, pool.create_volume("v", size=size, block_size=BS)


def _reopened_read(tmp_path, pool, length):
    pool.close()
    pool = blocksnap.Pool.open(str(tmp_path / "pool"))
    try:
        assert pool.check()["clean"]
        return pool.volume("v").read(0, length)
    finally:
        pool.close()


def _write_into_cut_block_again(tmp_path, pool, vol, first: bytes) -> None:
    """After a failed write into block 1 (8 KiB of `first` in it, cached): a new
    write into that block must merge with what the store holds, not with a cached
    copy the failed write had already updated."""
    vol.write(BS + 40 * KiB, b"\x11" * KiB)
    expect = first + bytes(32 * KiB) + b"\x11" * KiB + bytes(BS - 41 * KiB)
    assert vol.read(0, 2 * BS) == expect
    vol.flush()
    assert _reopened_read(tmp_path, pool, 2 * BS) == expect


def test_second_half_of_a_cut_write_reads_nothing(tmp_path, reads):
    pool, vol = _vol(tmp_path)
    data = os.urandom(4 << 20)
    for mib in range(4):             # 1 MiB writes cut at 520 KiB, as the loop device does
        base = mib << 20
        vol.write(base, data[base:base + 520 * KiB])
        vol.write(base + 520 * KiB, data[base + 520 * KiB:base + (1 << 20)])
    assert reads["n"] == 0           # first halves meet holes, second halves the cache
    assert vol.read(0, len(data)) == data
    vol.flush()
    assert _reopened_read(tmp_path, pool, len(data)) == data


def test_after_a_commit_the_shared_block_is_merged_again(tmp_path, reads):
    pool, vol = _vol(tmp_path)
    data = os.urandom(1 << 20)
    vol.write(0, data[:520 * KiB])
    vol.flush()                      # block 8 is committed: no longer fresh, never in place
    snap = vol.snapshot("s")
    vol.write(520 * KiB, data[520 * KiB:])
    assert reads["n"] == 1           # block 8 read back and merged into a new block
    assert vol.read(0, len(data)) == data
    assert snap.read(0, 1 << 20) == data[:520 * KiB] + bytes(504 * KiB)
    vol.flush()
    assert _reopened_read(tmp_path, pool, len(data)) == data


def test_a_failed_in_place_write_leaves_no_stale_cache(tmp_path, reads, monkeypatch):
    pool, vol = _vol(tmp_path)
    first = os.urandom(BS + 8 * KiB)
    vol.write(0, first)              # block 1 holds 8 KiB of data: cached
    real = type(pool.store).pwritev

    def full(self, pieces, offset):
        raise OutOfSpace("no space left (simulated)")

    monkeypatch.setattr(type(pool.store), "pwritev", full)
    monkeypatch.setattr(type(pool.store), "merge_write", None)   # (the compiled write: test_inplace)
    with pytest.raises(OutOfSpace):
        vol.write(BS + 8 * KiB, b"\xee" * (16 * KiB))
    monkeypatch.setattr(type(pool.store), "pwritev", real)
    assert vol.read(0, 2 * BS) == first + bytes(BS - 8 * KiB)
    _write_into_cut_block_again(tmp_path, pool, vol, first)


def test_rewriting_a_cached_block_whole_then_in_part(tmp_path, reads):
    pool, vol = _vol(tmp_path)
    vol.write(0, b"\x01" * (8 * KiB))        # block 0 in part: cached
    whole = os.urandom(BS)
    vol.write(0, whole)                      # whole block, in place: the entry is stale now
    vol.write(BS - KiB, b"\x02" * KiB)       # in part again
    expect = whole[:BS - KiB] + b"\x02" * KiB
    assert vol.read(0, BS) == expect
    vol.write(0, bytes(BS))                  # all zeros: the block becomes a hole
    vol.write(4 * KiB, b"\x03" * KiB)
    expect = bytes(4 * KiB) + b"\x03" * KiB + bytes(BS - 5 * KiB)
    assert vol.read(0, BS) == expect
    vol.flush()
    assert _reopened_read(tmp_path, pool, BS) == expect


def test_a_write_refused_for_space_leaves_no_stale_cache(tmp_path, reads):
    """The cached half is updated before the rest of the write is planned; when
    the pool then turns out to be full, the update must not survive."""
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=16 << 20)
    vol = pool.create_volume("v", size=64 << 20, block_size=BS)
    first = os.urandom(BS + 8 * KiB)
    vol.write(0, first)                          # block 1 holds 8 KiB: cached
    with pytest.raises(OutOfSpace):              # its tail, then far more than the pool holds
        vol.write(BS + 8 * KiB, os.urandom(32 << 20))
    _write_into_cut_block_again(tmp_path, pool, vol, first)


def test_zeros_over_a_cached_block_make_a_hole(tmp_path, reads):
    """Thin provisioning holds on the in-place path too: a cut block whose every
    byte ends up zero takes no space."""
    pool, vol = _vol(tmp_path)
    vol.write(0, os.urandom(BS + 8 * KiB))          # block 1 in part: cached
    vol.write(BS, bytes(8 * KiB))                   # its data zeroed, in place from the cache
    assert vol.info()["allocated"] == BS            # block 0 only
    assert reads["n"] == 0
    assert vol.read(BS, BS) == bytes(BS)
    vol.write(BS + 4 * KiB, b"\x05" * KiB)          # and it can be written again
    assert vol.read(BS, BS) == bytes(4 * KiB) + b"\x05" * KiB + bytes(BS - 5 * KiB)
    vol.flush()
    assert pool.check()["clean"]
    pool.close()


def test_two_threads_writing_the_halves_concurrently(tmp_path):
    """As the loop device does: the two halves of every MiB arrive at once, on two
    threads, in either order, with flushes in between; every byte ends right."""
    import threading

    pool, vol = _vol(tmp_path, size=16 << 20)
    data = os.urandom(16 << 20)
    cut = 520 * KiB
    go = [threading.Barrier(2) for _ in range(16)]
    errors: list[BaseException] = []

    def half(second: bool) -> None:
        try:
            for mib in range(16):
                go[mib].wait()
                lo = (mib << 20) + (cut if second else 0)
                hi = (mib << 20) + (1 << 20 if second else cut)
                vol.write(lo, data[lo:hi])
                if mib % 5 == 4 and second:
                    vol.flush()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=half, args=(s,)) for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert vol.read(0, len(data)) == data
    vol.flush()
    assert _reopened_read(tmp_path, pool, len(data)) == data
