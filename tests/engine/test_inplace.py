"""Small writes into blocks only the live map reaches are written in place
(engine/row_write.write_small, engine/inplace.py): only their bytes reach the data
store, the block's checksum follows, snapshots and clones never see them, and a
crash before the next commit leaves blocks that read back, not checksum errors.
"""
from __future__ import annotations

import os
import random

import pytest

import blocksnap
from blocksnap.engine import scrub
from blocksnap.errors import CorruptionError

from .faulty import PowerCut, install

BS = 64 << 10
KiB = 1 << 10


def _pool(tmp_path, size=2 << 20):
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=64 << 20)
    vol = pool.create_volume("v", size=size, block_size=BS)
    data = bytearray(os.urandom(size))
    vol.write(0, data)
    vol.flush()
    return pool, vol, data


def _written(pool) -> int:
    return pool.status()["store_written"]


def test_a_4k_write_into_a_committed_block_writes_4k(tmp_path):
    pool, vol, data = _pool(tmp_path)
    rng = random.Random(1)
    before = _written(pool)
    for _ in range(50):
        off = rng.randrange(len(data) // 4096) * 4096
        new = os.urandom(4096)
        vol.write(off, new)
        data[off:off + 4096] = new
    assert _written(pool) - before == 50 * 4096      # not 50 blocks of 64 KiB
    assert vol.read(0, len(data)) == data              # every block checked on the way
    vol.flush()
    assert pool.status()["used"] == len(data)          # no new blocks
    pool.close()
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        assert pool.check()["clean"]
        assert pool.volume("v").read(0, len(data)) == data
        assert scrub(pool, "v")["bad"] == []


@pytest.mark.parametrize("share", ["snapshot", "clone"])
def test_a_shared_block_is_redirected_not_overwritten(tmp_path, share):
    pool, vol, data = _pool(tmp_path)
    snap = vol.snapshot("s")
    other = snap.clone("c") if share == "clone" else None
    target = other if other is not None else vol
    before = _written(pool)
    target.write(5 * BS + 8 * KiB, b"\x01" * 4096)
    assert _written(pool) - before == BS              # the merged block, elsewhere
    before = _written(pool)
    target.write(5 * BS + 16 * KiB, b"\x02" * 4096)  # now fresh: in place
    assert _written(pool) - before == 4096
    assert snap.read(0, len(data)) == data
    if other is not None:
        assert vol.read(0, len(data)) == data
    want = bytearray(data)
    want[5 * BS + 8 * KiB:5 * BS + 12 * KiB] = b"\x01" * 4096
    want[5 * BS + 16 * KiB:5 * BS + 20 * KiB] = b"\x02" * 4096
    assert target.read(0, len(data)) == want
    pool.close()


def test_a_crash_after_in_place_writes_rehashes_the_blocks(tmp_path):
    """The writes reached the data file but no commit recorded their checksums: the
    log names their region, and the next open gives the blocks the checksums of
    what they hold (without it, reading them is a checksum error)."""
    pool, vol, data = _pool(tmp_path)
    vol.write(3 * BS + 4096, b"\x07" * 4096)
    vol.write(9 * BS + 123, b"\x08" * 999)
    data[3 * BS + 4096:3 * BS + 8192] = b"\x07" * 4096
    data[9 * BS + 123:9 * BS + 1122] = b"\x08" * 999
    pool.abandon()                                     # as kill -9 would leave it
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        assert pool.reclaimed_on_open["rehashed_blocks"] == 2
        assert pool.check()["clean"]
        assert pool.volume("v").read(0, len(data)) == data
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:   # and the log is empty now
        assert pool.reclaimed_on_open["rehashed_blocks"] == 0


def test_without_the_log_the_same_crash_reads_as_corrupt(tmp_path):
    """What the log is for: the same crash with the log emptied behind the engine's
    back leaves a block whose committed checksum no longer matches."""
    pool, vol, _ = _pool(tmp_path)
    vol.write(3 * BS + 4096, b"\x07" * 4096)
    pool.abandon()
    with open(tmp_path / "pool" / "inplace", "r+b") as f:
        f.truncate(0)
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        with pytest.raises(CorruptionError, match="block 3"):
            pool.volume("v").read(0, 4 * BS)


def test_corruption_in_a_block_is_still_reported_before_an_in_place_write(tmp_path):
    """The merge reads the old block and checks it: a bad block is named, not
    re-checksummed by a write into it."""
    pool, vol, _ = _pool(tmp_path)
    off = pool.volume("v").pool.maps.get_range(vol.tree, 4, 5)[0][0] * 4096
    pool.close()
    with open(pool.data_path, "r+b") as f:
        f.seek(int(off) + 100)
        f.write(b"\xff" * 8)
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        vol = pool.volume("v")
        with pytest.raises(CorruptionError, match="block 4"):
            vol.write(4 * BS + 8192, b"\x01" * 4096)
        assert [b["block"] for b in scrub(pool, "v")["bad"]] == [4]


@pytest.mark.slow
def test_power_cut_during_in_place_writes(fast_tmp_path, monkeypatch):
    """A power cut at every I/O of a run of small in-place writes, flushes and a
    snapshot, with unsynced writes lost or torn per sector: the pool opens clean,
    each sector holds a value it had since the last flush, the snapshot is exact."""
    disk = install(monkeypatch)
    rng = random.Random(7)
    size = 16 * BS
    ops = []
    for k in range(24):
        if k in (8, 16):
            ops.append(("flush",))
        elif k == 12:
            ops.append(("snapshot",))
        else:
            off = rng.randrange(size // 512) * 512
            ops.append(("write", off, rng.randbytes(min(rng.choice([512, 4096, 8192]), size - off))))
    # dry run: count the I/O calls
    path = str(fast_tmp_path / "dry")
    _build(path, size)
    with blocksnap.Pool.open(path) as pool:
        disk.arm(None)
        _run(pool, ops, [])
        total = disk.calls
    disk.reset()
    assert total > 20
    hit_log = False
    for n in range(1, total + 1):
        path = str(fast_tmp_path / f"cut{n}")
        base = _build(path, size)
        pool = blocksnap.Pool.open(path)
        disk.arm(n)
        done: list = []
        with pytest.raises(PowerCut):
            _run(pool, ops, done)
        hit_log |= "inplace" in disk.where
        pool.abandon()
        disk.armed = disk.is_cut = False
        disk.revert(rng, "random" if n % 2 else "all")
        disk.reset()
        allowed, snap = _allowed(base, ops, len(done))
        with blocksnap.Pool.open(path) as pool:
            assert pool.check()["clean"], n
            got = pool.volume("v").read(0, size)
            for i in range(size // 512):
                assert got[i * 512:(i + 1) * 512] in allowed[i], (n, i, disk.where)
            names = [s.name for s in pool.volume("v").snapshots()]
            if snap is not None:
                assert names == ["s"] and pool.volume("v").get_snapshot("s").read(0, size) == snap
    assert hit_log   # some cuts fell on the log's own write or fsync


def _build(path: str, size: int) -> bytes:
    data = random.Random(3).randbytes(size)
    with blocksnap.Pool.create(path, size=32 << 20) as pool:
        vol = pool.create_volume("v", size=size, block_size=BS)
        vol.write(0, data)
        vol.flush()
    return data


def _run(pool, ops, done) -> None:
    vol = pool.volume("v")
    for op in ops:
        if op[0] == "write":
            vol.write(op[1], op[2])
        elif op[0] == "flush":
            vol.flush()
        else:
            vol.snapshot("s")
        done.append(op)


def _allowed(base: bytes, ops, completed: int) -> tuple[list[set[bytes]], bytes | None]:
    """Per sector: the values allowed after a cut during ops[completed] (the op in
    flight may or may not have happened); and the snapshot's content if it was
    created (a snapshot in flight may exist or not: not asked)."""
    data = bytearray(base)
    allowed = [{bytes(data[i:i + 512])} for i in range(0, len(data), 512)]
    snap = None
    for k, op in enumerate(ops[:completed + 1]):
        if op[0] == "write":
            data[op[1]:op[1] + len(op[2])] = op[2]
            for i in range(op[1] // 512, -(-(op[1] + len(op[2])) // 512)):
                allowed[i].add(bytes(data[i * 512:(i + 1) * 512]))
        elif k < completed:
            allowed = [{bytes(data[i:i + 512])} for i in range(0, len(data), 512)]
            if op[0] == "snapshot":
                snap = bytes(data)
    return allowed, snap


@pytest.mark.parametrize("pure", ["1", "0"])
def test_compiled_and_python_in_place_writes_agree(tmp_path, monkeypatch, pure):
    """store/_blockread.c's merge_write and the Python merge: the same bytes, the
    same checksums (reads and scrub verify them), cached blocks included."""
    from blocksnap.store import FileStore
    monkeypatch.setenv("BLOCKSNAP_PURE_PYTHON", pure)
    assert FileStore.merge_write is not None   # built (setup.py), as CI must prove
    pool, vol, data = _pool(tmp_path)
    assert (pool.store.merge_write is None) == (pure == "1")
    rng = random.Random(4)
    for k in range(300):
        off = rng.randrange(len(data) - 1)
        n = rng.randint(1, min(BS, len(data) - off))
        new = bytes(n) if k % 17 == 0 else rng.randbytes(n)
        vol.write(off, new)
        data[off:off + n] = new
        if k % 50 == 0:
            vol.flush()
    assert vol.read(0, len(data)) == data
    assert scrub(pool, "v")["bad"] == []
    pool.close()
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        assert pool.volume("v").read(0, len(data)) == data
        assert pool.check()["clean"]


@pytest.mark.parametrize("pure", ["1", "0"])
def test_a_failed_in_place_write_leaves_a_readable_block(tmp_path, monkeypatch, pure):
    """A write that fails part way (the disk, here a 1-byte write then EIO) leaves the
    block with some of the new bytes: its checksum follows what it holds, so the
    block reads back (old and new bytes, as a disk leaves a failed write), and the
    writer got the error."""
    import errno as errno_mod

    from blocksnap.store import filestore
    monkeypatch.setenv("BLOCKSNAP_PURE_PYTHON", pure)
    pool, vol, data = _pool(tmp_path)
    vol.write(2 * BS, b"\x05" * 100)      # the region is logged, the block cached
    vol.flush()                            # (committed: in place, not fresh)
    data[2 * BS:2 * BS + 100] = b"\x05" * 100
    real_pwrite = os.pwrite
    real_pwritev = os.pwritev

    def failing(fd, buf, pos, *a):
        if fd == pool.store.fd:
            real_pwrite(fd, bytes(memoryview(buf)[:1]), pos)
            raise OSError(errno_mod.EIO, "injected")
        return real_pwrite(fd, buf, pos, *a)

    def failing_v(fd, bufs, pos):
        if fd == pool.store.fd:
            real_pwrite(fd, bytes(memoryview(bufs[0])[:1]), pos)
            raise OSError(errno_mod.EIO, "injected")
        return real_pwritev(fd, bufs, pos)

    monkeypatch.setattr(os, "pwritev", failing_v)
    if pure == "0":   # the compiled write: fail its pwrite through the same errno
        real_merge = filestore._blockread.merge_write

        def merge(fd, pos, lo, d, block, have, old):
            real_pwrite(fd, bytes(memoryview(d)[:1]), pos + lo)
            raise filestore.WriteFailed(OSError(errno_mod.EIO, "injected"))

        monkeypatch.setattr(pool.store, "merge_write", lambda *a: merge(pool.store.fd, *a))
        del real_merge
    with pytest.raises(OSError):
        vol.write(2 * BS + 4096, b"\x09" * 4096)
    monkeypatch.undo()
    data[2 * BS + 4096] = 0x09
    assert vol.read(0, len(data)) == data
    vol.flush()
    pool.close()
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        assert pool.volume("v").read(0, len(data)) == data
        assert pool.check()["clean"]


def test_cow_writers_on_threads_share_commits(tmp_path, monkeypatch):
    """COW with a snapshot: each first write to a block copies it and must see the
    copy committed before the origin is written. Writers on several threads share
    those commits (one commits for all that copied meanwhile): fewer commits than
    copying writes, and every snapshot and the live volume exact."""
    import threading

    origin = tmp_path / "origin.img"
    base = random.Random(9).randbytes(256 * 4096)
    origin.write_bytes(base)
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=64 << 20)
    vol = pool.create_volume("c", mode="cow", origin=str(origin), block_size=4096)
    vol.snapshot("s")
    commits = {"n": 0}
    real = pool.commit

    def slow_commit(*a, **k):   # a slow disk: writers pile up behind a commit
        commits["n"] += 1
        import time
        time.sleep(0.02)
        return real(*a, **k)

    monkeypatch.setattr(pool, "commit", slow_commit)
    want = bytearray(base)

    def writer(t: int) -> None:
        for k in range(16):
            off = (t * 32 + k * 2) * 4096       # distinct blocks: every write copies
            data = bytes([t + 1]) * 4096
            vol.write(off, data)
            want[off:off + 4096] = data

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert commits["n"] < 8 * 16, commits      # (how many fewer depends on the threads' scheduling: 83-124 seen)
    assert vol.read(0, len(base)) == want
    assert vol.get_snapshot("s").read(0, len(base)) == base
    monkeypatch.undo()
    pool.close()
    with blocksnap.Pool.open(str(tmp_path / "pool")) as pool:
        assert pool.check()["clean"]
        assert pool.volume("c").get_snapshot("s").read(0, len(base)) == base
