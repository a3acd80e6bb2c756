"""Threads reading, writing, snapshotting and flushing one pool at once (as FUSE does).

Reads do their I/O outside the pool lock; these tests hold that to: no false
checksum errors from torn reads of blocks being rewritten, snapshots that never
change while the live volume churns, and no block reused while a read may still
be looking at it (check clean, every snapshot equal to what it held).
"""
from __future__ import annotations

import os
import random
import threading

import blocksnap

BS = 4096
NBLOCKS = 256


def _pattern(block: int, gen: int) -> bytes:
    return (block.to_bytes(4, "little") + gen.to_bytes(4, "little")) * (BS // 8)


def test_readers_writers_snapshots(tmp_path):
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=64 << 20)
    vol = pool.create_volume("v", size=NBLOCKS * BS, block_size=BS)
    gens = [0] * NBLOCKS
    for b in range(NBLOCKS):
        vol.write(b * BS, _pattern(b, 0))
    vol.flush()
    stop = threading.Event()
    errors: list[BaseException] = []
    snaps: dict[str, list[int]] = {}
    state_lock = threading.Lock()

    def writer(seed: int) -> None:
        r = random.Random(seed)
        made = 0
        try:
            while not stop.is_set():
                b = r.randrange(NBLOCKS)
                with state_lock:  # the model and the volume change together
                    gens[b] += 1
                    vol.write(b * BS, _pattern(b, gens[b]))
                if r.random() < 0.05:
                    vol.flush()
                if r.random() < 0.02:
                    with state_lock:
                        made += 1
                        name = f"s{made}"
                        vol.snapshot(name)
                        snaps[name] = list(gens)
                # (bounded: a quick machine makes more snapshots in the 6 s than the pool holds)
                if len(snaps) > 8 or (r.random() < 0.01 and len(snaps) > 3):
                    with state_lock:
                        victim = r.choice(sorted(snaps))
                        vol.get_snapshot(victim).delete()
                        del snaps[victim]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                b = r.randrange(NBLOCKS)
                data = vol.read(b * BS, BS)
                # live: some generation of this block, never a torn mix
                assert data[:4] == b.to_bytes(4, "little")
                assert data == _pattern(b, int.from_bytes(data[4:8], "little"))
                with state_lock:
                    items = list(snaps.items())
                if items:
                    name, g = r.choice(items)
                    try:
                        got = vol.get_snapshot(name).read(b * BS, BS)
                    except (blocksnap.NotFound, blocksnap.Busy):
                        continue  # deleted meanwhile
                    assert got == _pattern(b, g[b]), f"snapshot {name} changed at block {b}"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=writer, args=(1,))]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    timer = threading.Timer(6.0, stop.set)
    timer.start()
    for t in threads:
        t.join()
    timer.cancel()
    assert not errors, errors[0]
    assert pool.check()["clean"]
    for name, g in snaps.items():
        snap = vol.get_snapshot(name)
        for b in range(NBLOCKS):
            assert snap.read(b * BS, BS) == _pattern(b, g[b])
    pool.close()
    pool = blocksnap.Pool.open(str(tmp_path / "pool"))
    assert pool.check()["clean"]
    pool.close()
    assert os.path.exists(tmp_path / "pool" / "catalog.db")


def test_block_not_reused_while_an_unlocked_read_uses_it(tmp_path, monkeypatch):
    """Deterministic version of the race: between resolving the map and reading the
    data, the snapshot is deleted (committed) and the allocator pointed at the
    released block. The read must still return the snapshot's bytes."""
    import blocksnap.engine.row as row

    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=16 << 20)
    vol = pool.create_volume("v", size=6 << 20, block_size=BS)
    old = b"A" * BS
    vol.write(0, old)
    snap = vol.snapshot("s")
    vol.write(0, b"B" * BS)
    vol.flush()
    real = row.read_stored
    fired = []

    def delayed(store, ptrs, *args, **kwargs):
        if not fired:
            fired.append(True)
            snap.delete()               # commits: the old block is released
            pool.space.cursor = 0       # make the allocator look there first
            for off in range(0, vol.size, 1 << 20):
                vol.write(off, b"C" * (1 << 20))
            vol.flush()
        return real(store, ptrs, *args, **kwargs)

    monkeypatch.setattr(row, "read_stored", delayed)
    assert snap.read(0, BS) == old
    monkeypatch.setattr(row, "read_stored", real)
    assert pool.check()["clean"]
    pool.close()


def test_concurrent_writers_end_with_whole_writes(tmp_path):
    """Several writers (as FUSE threads), some on shared blocks, with checksums
    computed before the pool lock is taken: every block ends as one whole write
    (never a mix), the blocks each writer owns end as its last write,
    flush/snapshot interleave, and the pool checks clean, before and after
    reopening."""
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=128 << 20)
    vol = pool.create_volume("v", size=NBLOCKS * BS, block_size=BS)
    last: dict[int, bytes] = {}
    errors: list[BaseException] = []
    shared = range(0, 16)            # written by everybody
    writers = 4

    def writer(w: int) -> None:
        r = random.Random(w)
        own = [b for b in range(16, NBLOCKS) if b % writers == w]
        try:
            for i in range(400):
                if r.random() < 0.3:
                    b = r.choice(list(shared))
                else:
                    b = r.choice(own)
                n = 1 if b in shared else min(r.randrange(1, 4), NBLOCKS - b)
                run = [x for x in range(b, b + n) if x in own] or [b]
                data = b"".join(_pattern(x, w * 10000 + i) for x in run)
                vol.write(run[0] * BS, data)
                if b not in shared:
                    for x in run:
                        last[x] = _pattern(x, w * 10000 + i)
                if r.random() < 0.05:
                    vol.flush()
                if r.random() < 0.01:
                    vol.snapshot(f"w{w}-{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for b in range(NBLOCKS):
        data = vol.read(b * BS, BS)
        if b in last:
            assert data == last[b], f"block {b}"
        elif data != bytes(BS):
            assert data == _pattern(b, int.from_bytes(data[4:8], "little")), f"torn block {b}"
    assert pool.check()["clean"]
    pool.close()
    pool = blocksnap.Pool.open(str(tmp_path / "pool"))
    assert pool.check()["clean"]
    pool.close()


def _lock_free_from_another_thread(pool) -> bool:
    got = []

    def probe() -> None:
        if pool.lock.acquire(timeout=2):
            got.append(True)
            pool.lock.release()
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(got)


def test_reads_do_their_io_without_the_pool_lock(tmp_path, monkeypatch):
    """While a ROW read moves its data, another thread can take the pool lock (so
    FUSE threads read in parallel and a read does not wait behind a commit)."""
    import blocksnap.engine.row as row

    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=64 << 20)
    vol = pool.create_volume("v", size=NBLOCKS * BS, block_size=BS)
    vol.write(0, _pattern(0, 1) * 4)
    vol.flush()
    seen: dict[str, bool] = {}
    real_read = row.read_stored

    def read_probe(*a, **k):
        seen.setdefault("read", _lock_free_from_another_thread(pool))
        return real_read(*a, **k)

    monkeypatch.setattr(row, "read_stored", read_probe)
    assert vol.read(0, 4 * BS) == _pattern(0, 1) * 4
    assert seen == {"read": True}
    monkeypatch.setattr(row, "read_stored", real_read)
    assert pool.check()["clean"]
    pool.close()
