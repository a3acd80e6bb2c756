"""Space behaviour: COW copies once per block however many snapshots, ROW is thin
(holes read zeros without touching the store), discard gives space back to the pool
and to the host after the transaction commits, import keeps holes, the allocator never
hands out a unit twice, and concurrent writers (the FUSE threads) are safe. (A full
pool is in test_bad_input.py.)"""
from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest

import blocksnap
from blocksnap.engine.layout import HEADER_UNITS
from blocksnap.engine.space import Space

K = 1 << 10
M = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def host_allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def make_origin(path, nblocks: int, bs: int, seed: int = 1) -> bytes:
    """An image whose every block holds non-zero data."""
    data = rand(nblocks * bs, seed)
    with open(path, "wb") as f:
        f.write(data)
    return data


# -- COW: one copy per block, not per snapshot ------------------------------------------

@pytest.mark.parametrize("bs", [4 * K, 64 * K])
def test_cow_fifty_snapshots_copy_each_block_once(pool, tmp_path, bs):
    nb = 64
    origin = tmp_path / "origin.img"
    old = make_origin(origin, nb, bs)
    vol = pool.create_volume("db", mode="cow", origin=str(origin), block_size=bs)
    for i in range(50):
        vol.snapshot(f"s{i}")
    used0 = pool.status()["used"]
    assert used0 == 0  # a COW snapshot stores no data until the origin changes

    # scattered (non-sequential: no copy-ahead) overwrites of N blocks, in random order
    touched = random.Random(7).sample(range(0, nb, 3), 10)
    for b in touched:
        vol.write(b * bs, rand(bs, 1000 + b))
    vol.flush()
    assert pool.status()["used"] - used0 == len(touched) * bs

    # overwriting the same blocks again copies nothing more
    for b in touched:
        vol.write(b * bs + 100, b"x" * 10)
    vol.flush()
    assert pool.status()["used"] - used0 == len(touched) * bs

    # a partial write to another block copies exactly that one block
    other = next(b for b in range(1, nb, 3) if b - 1 not in touched and b + 2 not in touched)
    vol.write(other * bs + 1, b"yz")
    vol.flush()
    assert pool.status()["used"] - used0 == (len(touched) + 1) * bs

    for s in vol.snapshots():
        assert s.read(0, nb * bs) == old, s.name
    # after one more snapshot, the next first write copies again, once
    vol.snapshot("s50")
    vol.write(touched[0] * bs, b"\1" * bs)
    vol.flush()
    assert pool.status()["used"] - used0 == (len(touched) + 2) * bs
    assert pool.check()["clean"]


def test_cow_copies_do_not_depend_on_the_number_of_snapshots(tmp_path):
    """Any write pattern (sequential ones included) copies the same with 1 or 50
    snapshots: the copies serve every snapshot."""
    bs = 16 * K
    nb = 128
    used = {}
    for nsnaps in (1, 50):
        d = tmp_path / str(nsnaps)
        d.mkdir()
        origin = d / "origin.img"
        old = make_origin(origin, nb, bs)
        with blocksnap.Pool.create(str(d / "pool"), size=32 * M) as pool:
            vol = pool.create_volume("db", mode="cow", origin=str(origin), block_size=bs)
            for i in range(nsnaps):
                vol.snapshot(f"s{i}")
            rng = random.Random(3)
            for _ in range(40):
                off = rng.randrange(nb * bs - 4 * bs)
                vol.write(off, rng.randbytes(rng.randint(1, 3 * bs)))
            for off in range(10 * bs, 40 * bs, bs // 2):  # a sequential writer
                vol.write(off, b"\5" * (bs // 2))
            vol.flush()
            used[nsnaps] = pool.status()["used"]
            for s in vol.snapshots():
                assert s.read(0, nb * bs) == old
            assert pool.check()["clean"]
    assert used[1] == used[50] > 0


def test_cow_sequential_overwrite_commits_rarely_and_copies_little_extra(tmp_path, monkeypatch):
    """A long sequential overwrite after a snapshot (dd, a VM rewriting a file)
    preserves blocks ahead of itself: far fewer commits than requests, and never
    more than a quarter extra copied."""
    bs, nb = 64 * K, 2048                        # a 128 MiB origin
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=256 * M)
    origin = tmp_path / "origin.img"
    old = make_origin(origin, nb, bs)
    vol = pool.create_volume("db", mode="cow", origin=str(origin), block_size=bs)
    snap = vol.snapshot("s")
    commits = {"n": 0}
    real = type(pool).commit

    def counting(self, **kw):
        commits["n"] += 1
        return real(self, **kw)

    monkeypatch.setattr(type(pool), "commit", counting)
    written = 96 * M
    new = rand(written, 5)
    for i, mib in enumerate(range(0, written, M)):
        # as the loop device sends them: each MiB cut in two (first half of the
        # stream) or three pieces (second half), arriving in any order: the halves
        # swapped every other MiB, the small last piece first every other MiB
        if mib < written // 2:
            cuts = [(mib, mib + 520 * K), (mib + 520 * K, mib + M)]
        else:
            cuts = [(mib, mib + 832 * K), (mib + 832 * K, mib + M)]
        for lo, hi in (cuts[::-1] if i % 2 else cuts):
            vol.write(lo, new[lo:hi])
    assert commits["n"] <= 40, commits["n"]      # (34; about 90 with a window of only the previous request)
    copied = pool.status()["used"]
    assert written <= copied <= written * 5 // 4 + 64 * K, copied
    vol.flush()
    assert snap.read(0, nb * bs) == old
    assert vol.read(0, written) == new
    assert pool.check()["clean"]
    pool.close()


def test_cow_zero_block_copy_takes_no_space(pool, tmp_path):
    bs = 16 * K
    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:
        f.truncate(8 * bs)  # all zeros (holes)
    vol = pool.create_volume("c", mode="cow", origin=str(origin), block_size=bs)
    snap = vol.snapshot("s")
    vol.write(0, b"\xff" * (8 * bs))
    vol.flush()
    assert pool.status()["used"] == 0
    assert snap.read(0, 8 * bs) == bytes(8 * bs)
    assert vol.read(0, 8 * bs) == b"\xff" * (8 * bs)


# -- ROW: thin ------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_row_holes_read_zeros_without_touching_the_store(pool, monkeypatch, compiled):
    vol = pool.create_volume("big", size=16 << 30, block_size=64 * K)
    assert vol.info()["allocated"] == 0
    assert pool.status()["used"] == 0
    vol.write(5 * M, b"data")
    calls = []
    if compiled:
        real_mapped = pool.store.read_mapped
        assert real_mapped is not None, "the compiled read path was not built"
        monkeypatch.setattr(pool.store, "read_mapped",
                            lambda *a, **k: (calls.append(a), real_mapped(*a, **k))[1])
    else:
        monkeypatch.setattr(pool.store, "read_mapped", None)
        real = pool.store.preadinto
        monkeypatch.setattr(pool.store, "preadinto", lambda buf, off: (calls.append(off), real(buf, off))[1])
    for off, n in [(0, 4096), (1 << 30, 128 * K), ((16 << 30) - 100, 100), (5 * M + 64 * K, 64 * K)]:
        assert vol.read(off, n) == bytes(n)
    assert calls == []
    snap = vol.snapshot("s")
    assert snap.read(3 << 30, 1 * M) == bytes(M)
    assert calls == []
    assert vol.read(5 * M, 6) == b"data\0\0"
    assert len(calls) == 1
    assert pool.status()["used"] == 64 * K


def test_row_overwrite_of_shared_block_redirects(pool):
    bs = 64 * K
    vol = pool.create_volume("v", size=1 * M, block_size=bs)
    vol.write(0, b"a" * bs)
    vol.flush()
    assert pool.status()["used"] == bs
    snap = vol.snapshot("s")
    vol.write(0, b"b" * bs)          # shared with the snapshot: a fresh block
    vol.write(0, b"c" * bs)          # not yet committed: rewritten in place
    vol.flush()
    assert pool.status()["used"] == 2 * bs
    vol.write(10, b"d")              # committed since: redirected again
    vol.flush()
    assert pool.status()["used"] == 2 * bs  # the old live block went back
    assert snap.read(0, bs) == b"a" * bs
    assert vol.read(0, 12) == b"c" * 10 + b"d" + b"c"


def test_discard_gives_space_back_after_commit(pool):
    bs = 64 * K
    vol = pool.create_volume("v", size=8 * M, block_size=bs)
    data = rand(4 * M, 3)
    vol.write(0, data)
    vol.flush()
    st = pool.status()
    assert st["used"] == 4 * M
    data_file = st["data"]
    host0 = host_allocated(data_file)
    assert host0 >= 4 * M

    vol.discard(1 * M, 2 * M)
    # freed in the open transaction: not reusable, not counted free, until it commits
    assert pool.status()["used"] == 4 * M
    vol.flush()
    assert pool.status()["used"] == 2 * M
    assert host_allocated(data_file) <= host0 - 2 * M + 64 * K  # holes punched in the data file
    assert vol.read(0, 4 * M) == data[:1 * M] + bytes(2 * M) + data[3 * M:]

    # unaligned discard: whole blocks inside go, the partial edges are zeroed
    vol.discard(100, bs + 200)
    vol.flush()
    assert vol.read(0, 2 * bs) == data[:100] + bytes(bs + 200) + data[bs + 300:2 * bs]
    assert pool.status()["used"] == 2 * M  # the edge blocks still hold data
    assert vol.info()["allocated"] == 2 * M
    assert pool.check()["clean"]


def test_discard_shared_with_snapshot_keeps_snapshot_space(pool):
    bs = 16 * K
    vol = pool.create_volume("v", size=1 * M, block_size=bs)
    data = rand(1 * M, 4)
    vol.write(0, data)
    snap = vol.snapshot("s")
    vol.discard(0, 1 * M)
    vol.flush()
    assert pool.status()["used"] == 1 * M  # the snapshot still holds every block
    assert vol.read(0, 1 * M) == bytes(1 * M)
    assert vol.info()["allocated"] == 0
    snap.delete()
    assert pool.status()["used"] == 0
    assert pool.check()["clean"]


def test_import_keeps_holes(pool, tmp_path):
    bs = 64 * K
    src = tmp_path / "src.img"
    content = bytearray(4 * M)
    with open(src, "wb") as f:
        f.truncate(4 * M)
        for b, seed in [(0, 1), (7, 2), (40, 3)]:
            block = rand(bs, seed)
            content[b * bs:(b + 1) * bs] = block
            f.seek(b * bs)
            f.write(block)
        # explicit zeros (allocated in the file, but zero): must not be stored either
        f.seek(20 * bs)
        f.write(bytes(3 * bs))
        # a partial block at the very end
        f.seek(4 * M - 10)
        f.write(b"0123456789")
        content[4 * M - 10:] = b"0123456789"
    vol = pool.import_volume("imp", str(src), block_size=bs)
    assert vol.size == 4 * M
    assert vol.info()["allocated"] == 4 * bs
    assert pool.status()["used"] == 4 * bs
    assert vol.read(0, 4 * M) == bytes(content)


def _free_rows(s: Space, units: int) -> int:
    rows = s.total // units
    lo = -(-HEADER_UNITS // units)
    return int((~s.used[lo * units:rows * units].reshape(-1, units).any(axis=1)).sum())


def test_allocator_never_hands_out_a_unit_twice():
    """Random allocations of mixed block sizes (1, 4 and 16 units) and frees in a store
    whose size is not a multiple of the larger ones, with the cursor anywhere: every
    allocation is aligned, inside the store, overlaps nothing, and fails with ENOSPC
    exactly when there are not enough free aligned blocks."""
    for seed in range(300):
        rng = random.Random(seed)
        s = Space(HEADER_UNITS + rng.randint(40, 700))
        owned: list[tuple[int, int]] = []   # (start, units) of live blocks
        for _ in range(rng.randint(5, 40)):
            if rng.random() < 0.15:
                s.cursor = rng.randrange(s.total + 1)
            if owned and rng.random() < 0.35:  # free some, commit
                for _ in range(rng.randint(1, len(owned))):
                    st, u = owned.pop(rng.randrange(len(owned)))
                    s.decref(np.array([st], np.uint64), u)
                s.after_commit()
                continue
            units = rng.choice([1, 4, 16])
            n = rng.randint(1, 30)
            avail = _free_rows(s, units)
            if n > avail:
                with pytest.raises(blocksnap.OutOfSpace):
                    s.alloc(n, units)
                continue
            got = s.alloc(n, units).astype(np.int64)
            assert len(got) == n, seed
            assert (got % units == 0).all() and (got >= HEADER_UNITS).all(), seed
            assert (got + units <= s.total).all(), (seed, got, s.total)
            owned.extend((int(g), units) for g in got)
            cover = np.zeros(s.total, np.int32)
            for st, u in owned:
                cover[st:st + u] += 1
            assert cover.max() == 1, f"seed {seed}: a unit was handed out twice"
            assert (s.used[cover == 1]).all()


# -- threads ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["row", "cow"])
def test_concurrent_writers_and_readers(pool, tmp_path, mode):
    """The FUSE layer calls read/write/flush from several threads at once."""
    bs = 16 * K
    nthreads, per = 4, 16
    size = nthreads * per * bs
    if mode == "row":
        vol = pool.create_volume("t", size=size, block_size=bs)
        model = bytearray(size)
    else:
        origin = tmp_path / "origin.img"
        model = bytearray(make_origin(origin, nthreads * per, bs))
        vol = pool.create_volume("t", mode="cow", origin=str(origin), block_size=bs)
    errors = []
    snaps = {}
    # one lock per writer: writers run concurrently, a snapshot takes them all so the
    # model and the volume agree at that instant
    locks = [threading.Lock() for _ in range(nthreads)]

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(60):
                b = t * per + rng.randrange(per)
                off = b * bs + rng.randrange(bs // 2)
                data = rng.randbytes(rng.randint(1, bs // 2))
                with locks[t]:
                    vol.write(off, data)
                    model[off:off + len(data)] = data
                assert vol.read(off, len(data)) == data
                if i % 20 == 0:
                    vol.flush()
                if t == 0 and i % 15 == 7:
                    for lk in locks:
                        lk.acquire()
                    try:
                        name = f"s{i}"
                        vol.snapshot(name)
                        snaps[name] = bytes(model)
                    finally:
                        for lk in locks:
                            lk.release()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert vol.read(0, size) == bytes(model)
    for name, want in snaps.items():
        assert vol.get_snapshot(name).read(0, size) == want
    assert pool.check()["clean"]
