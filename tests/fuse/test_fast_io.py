"""The compiled FUSE path for leased blocks (fuse/fast.py, engine/direct.py,
engine/_direct.c): it serves small reads and in-place writes itself, and whatever
it serves matches a model, with writers in threads, unaligned writes, snapshots
between them, commits, a reopen; a block failing its checksum is still EIO.

The pool is served in this process (BlocksnapFS on a real FUSE mount), so the
test can count what the compiled path did: each test fails without it.
"""
from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import threading

import numpy as np
import pytest

import blocksnap.fuse  # noqa: F401 - loads libfuse3 (FUSE_LIBRARY_NAME)
from blocksnap.engine import direct
from blocksnap.engine.layout import UNIT
from blocksnap.engine.pool import Pool
from blocksnap.fuse import fast
from blocksnap.fuse.fs import BlocksnapFS
from blocksnap.fuse.mount import run_fuse
from tests.conftest import run_cli

MiB = 1 << 20


def test_the_compiled_modules_are_built():
    """(setup.py builds them wherever tools/setup.sh ran: their absence is a failure)"""
    assert direct._direct is not None and fast._fastfuse is not None


class Mounted:
    """A pool served by BlocksnapFS in a thread of this process."""

    def __init__(self, tmp_path, *, fast_io: bool = True, size: int = 32 * MiB, origin: str | None = None):
        self.path = str(tmp_path / "pool")
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir(exist_ok=True)
        if not os.path.exists(self.path):
            Pool.create(self.path, size=512 * MiB).close()
            with Pool.open(self.path) as p:
                if origin is None:
                    p.create_volume("v", size)
                else:
                    p.create_volume("v", mode="cow", origin=origin)
        self.pool = Pool.open(self.path)
        self.fs = BlocksnapFS(self.pool, fast_io=fast_io)
        self.thread = threading.Thread(target=run_fuse, args=(self.fs, str(self.mnt)), daemon=True)
        self.thread.start()
        assert self.fs.initialized.wait(20), "FUSE did not start"
        self.img = self.mnt / "v" / "volume.img"

    def stop(self) -> None:
        if subprocess.run(["umount", str(self.mnt)], check=False).returncode:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)   # (a test left a file open)
        self.thread.join(20)
        self.pool.close()


def _counts(m: Mounted) -> tuple[int, int]:
    with m.pool.lock:
        return m.pool.direct.counts()


def test_direct_reads_and_writes_match_a_model_with_snapshots_between(tmp_path):
    m = Mounted(tmp_path)
    region = 4 * MiB
    models = [bytearray(region) for _ in range(4)]
    snaps: list[tuple[str, list[bytes]]] = []
    try:
        fd = os.open(m.img, os.O_RDWR)
        for i in range(4):   # every block stored: later writes may go in place
            data = random.Random(i).randbytes(region)
            os.pwrite(fd, data, i * 8 * MiB)
            models[i][:] = data
        os.fsync(fd)
        os.close(fd)
        failures: list[str] = []

        def worker(i: int, rounds: int, seed: int) -> None:
            rnd = random.Random(seed)
            wfd = os.open(m.img, os.O_RDWR)
            try:
                for _ in range(rounds):
                    n = rnd.choice([512, 4096, 4096, 4096, 1000, 8192, 65536])
                    off = rnd.randrange(0, region - n)
                    if rnd.random() < 0.6:
                        data = rnd.randbytes(n)
                        os.pwrite(wfd, data, i * 8 * MiB + off)
                        models[i][off:off + n] = data
                    elif os.pread(wfd, n, i * 8 * MiB + off) != bytes(models[i][off:off + n]):
                        failures.append(f"region {i}: read at {off} of {n}")
                    if rnd.random() < 0.01:
                        os.fsync(wfd)
            finally:
                os.close(wfd)

        for phase in range(3):
            threads = [threading.Thread(target=worker, args=(i, 1500, phase * 10 + i)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not failures, failures[:5]
            m.fs.drain("v")
            m.pool.volume("v").snapshot(f"s{phase}")
            snaps.append((f"s{phase}", [bytes(x) for x in models]))
        reads, writes = _counts(m)
        assert reads > 1000 and writes > 1000, (reads, writes)   # the compiled path served most
        for name, want in snaps:
            with open(m.mnt / "v" / "snapshots" / f"{name}.img", "rb") as f:
                for i in range(4):
                    f.seek(i * 8 * MiB)
                    assert f.read(region) == want[i], f"snapshot {name}, region {i}"
        with open(m.img, "rb") as f:
            for i in range(4):
                f.seek(i * 8 * MiB)
                assert f.read(region) == bytes(models[i]), f"live, region {i}"
    finally:
        m.stop()
    with Pool.open(m.path) as p:   # the direct writes' checksums were committed
        assert p.check()["clean"]
        vol = p.volume("v")
        for i in range(4):
            assert vol.read(i * 8 * MiB, region) == bytes(models[i]), f"reopened, region {i}"
        for name, want in snaps:
            snap = vol.get_snapshot(name)
            for i in range(4):
                assert snap.read(i * 8 * MiB, region) == want[i], f"reopened snapshot {name}, region {i}"


def test_fsync_makes_direct_writes_durable_without_a_clean_close(tmp_path):
    """fsync, then the pool dropped as a crash would drop it: what fsync covered is
    there, with checksums that match."""
    m = Mounted(tmp_path)
    rnd = random.Random(5)
    model = bytearray(rnd.randbytes(8 * MiB))
    try:
        fd = os.open(m.img, os.O_RDWR)
        os.pwrite(fd, bytes(model), 0)
        os.fsync(fd)
        for _ in range(3000):
            off = rnd.randrange(0, 8 * MiB - 4096) & ~511
            data = rnd.randbytes(4096)
            os.pwrite(fd, data, off)
            model[off:off + 4096] = data
        os.fsync(fd)
        os.close(fd)
        assert _counts(m)[1] > 1000
    finally:
        subprocess.run(["umount", "-l", str(m.mnt)], check=False)
        m.thread.join(20)
        m.pool.abandon()   # no commit at close: only what fsync made durable
    with Pool.open(m.path) as p:
        assert p.check()["clean"]
        assert p.volume("v").read(0, 8 * MiB) == bytes(model)


def test_a_leased_block_that_fails_its_checksum_reads_as_eio(tmp_path):
    m = Mounted(tmp_path)
    try:
        fd = os.open(m.img, os.O_RDWR)
        os.pwrite(fd, random.Random(1).randbytes(MiB), 0)
        os.fsync(fd)
        assert len(os.pread(fd, 4096, 8192)) == 4096   # leases the block
        assert len(os.pread(fd, 4096, 8192)) == 4096   # served by the compiled path
        assert _counts(m)[0] >= 1
        with m.pool.lock:
            vol = m.pool.volume("v")
            unit = int(m.pool.maps.get_range(vol.tree, 0, 1)[0][0])
        with open(m.pool.data_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[unit * UNIT + 100] ^= 0xFF   # the page cache the store reads
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 8192)
        assert e.value.errno == errno.EIO
        os.close(fd)
    finally:
        m.stop()


def test_fast_io_off_serves_every_request_in_python(tmp_path):
    m = Mounted(tmp_path, fast_io=False)
    try:
        fd = os.open(m.img, os.O_RDWR)
        os.pwrite(fd, bytes(range(256)) * 4096, 0)
        for off in range(0, MiB, 4096):
            os.pwrite(fd, b"x" * 512, off)
            assert os.pread(fd, 512, off) == b"x" * 512
        os.close(fd)
        assert _counts(m) == (0, 0)
        assert m.fs.fast is None
    finally:
        m.stop()


def test_lease_rows_follow_the_engine(tmp_path):
    """A read leases its whole leaf page; a snapshot takes every lease back (the
    blocks are shared now), an engine write the lease of the block it writes."""
    m = Mounted(tmp_path)
    nblocks = 32 * MiB // m.pool.volume("v").block_size
    fd = os.open(m.img, os.O_RDWR)
    try:
        os.pwrite(fd, random.Random(2).randbytes(MiB), 0)
        os.fsync(fd)
        os.pread(fd, 4096, 0)
        with m.pool.lock:
            (im,) = m.pool.direct.images.values()
            assert np.count_nonzero(im.table[:, 0]) == nblocks
            assert np.count_nonzero(im.table[:, 3] & np.uint64(2)) == MiB // m.pool.volume("v").block_size
        m.pool.volume("v").write(0, b"y" * 4096)   # the engine's own write takes its block back
        with m.pool.lock:
            assert np.count_nonzero(im.table[:, 0]) == nblocks - 1
        m.pool.volume("v").snapshot("a")
        with m.pool.lock:
            assert not np.count_nonzero(im.table[:, 0])
        os.pread(fd, 4096, 0)
        with m.pool.lock:
            assert np.count_nonzero(im.table[:, 0]) == nblocks
            assert not np.count_nonzero(im.table[:, 3] & np.uint64(2))   # shared: nothing in place
        assert os.pread(fd, 4096, 0) == b"y" * 4096
    finally:
        os.close(fd)
        m.stop()


def test_cow_direct_writes_leave_every_snapshot_its_data(tmp_path):
    """A COW volume: direct reads and writes go to the origin, but never to a block
    the newest snapshot still needs there (its copy is made first, by Python)."""
    origin = tmp_path / "origin.img"
    rnd = random.Random(9)
    model = bytearray(rnd.randbytes(8 * MiB))
    origin.write_bytes(bytes(model))
    m = Mounted(tmp_path, origin=str(origin))
    snaps: list[tuple[str, bytes]] = []
    fd = os.open(m.img, os.O_RDWR)
    try:
        for phase in range(3):
            for _ in range(2000):
                n = rnd.choice([512, 4096, 4096, 8192, 65536])
                off = rnd.randrange(0, 8 * MiB - n) & ~511
                if rnd.random() < 0.6:
                    data = rnd.randbytes(n)
                    os.pwrite(fd, data, off)
                    model[off:off + n] = data
                else:
                    assert os.pread(fd, n, off) == bytes(model[off:off + n]), (phase, off, n)
            m.fs.drain("v")
            m.pool.volume("v").snapshot(f"s{phase}")
            snaps.append((f"s{phase}", bytes(model)))
        reads, writes = _counts(m)
        assert reads > 500 and writes > 500, (reads, writes)
        for name, want in snaps:
            with open(m.mnt / "v" / "snapshots" / f"{name}.img", "rb") as f:
                assert f.read() == want, f"snapshot {name}"
        assert os.pread(fd, 8 * MiB, 0) == bytes(model)
    finally:
        os.close(fd)
        m.stop()
    assert origin.read_bytes() == bytes(model)
    with Pool.open(m.path) as p:
        assert p.check()["clean"]
        for name, want in snaps:
            assert p.volume("v").get_snapshot(name).read(0, 8 * MiB) == want, f"reopened snapshot {name}"


def test_the_daemon_reports_what_the_compiled_path_served(served):
    """Through the real daemon: random 4 KiB I/O on the live image, then `pool
    status` counts the requests that never reached Python."""
    run_cli(served.pool, "serve", str(served.mnt), check=True)
    img = served.mnt / "vm1" / "volume.img"
    rnd = random.Random(3)
    fd = os.open(img, os.O_RDWR)
    try:
        os.pwrite(fd, rnd.randbytes(4 * MiB), 0)
        for _ in range(2000):
            off = rnd.randrange(0, 4 * MiB - 4096) & ~4095
            os.pwrite(fd, rnd.randbytes(4096), off)
            os.pread(fd, 4096, rnd.randrange(0, 4 * MiB - 4096))
    finally:
        os.close(fd)
    st = served.status()
    assert st["direct_reads"] > 1000 and st["direct_writes"] > 1000, st
    assert "served without Python" in served.cli("pool", "status").stdout
    served.cli("stop")
    served.cli("check")


def test_queued_ranges_follow_the_queue():
    """set_queued against a model: the slots always hold exactly the queue's ranges
    (or everything is blocked: an error, or more ranges than slots)."""
    d = direct._direct
    da = direct.DirectAccess.__new__(direct.DirectAccess)   # (its state alone, no pool)
    da.words = (d.H_WORDS, d.IM_WORDS)
    da.state = np.zeros(da.words[0] + da.words[1], np.uint64)
    rnd = random.Random(1)
    ranges: list[tuple[int, int]] = []
    for _ in range(3000):
        if ranges and rnd.random() < 0.5:
            ranges.pop(rnd.randrange(len(ranges)))
        elif len(ranges) < 10:
            start = rnd.randrange(0, 20) << 20
            ranges.append((start, start + (4 << 20)))
        error = rnd.random() < 0.05
        da.set_queued(0, list(ranges), error)
        words = da._im(0)
        slots = words[d.IM_QUEUED:d.IM_QUEUED + 2 * d.QUEUE_SLOTS].reshape(-1, 2)
        if error or len(ranges) > d.QUEUE_SLOTS:
            assert words[d.IM_PENDING] == 1
        else:
            assert words[d.IM_PENDING] == 0
            assert sorted((int(a), int(b)) for a, b in slots.tolist() if b) == sorted(set(ranges))
