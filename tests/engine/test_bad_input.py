"""Bad input, through the real command line and the API: every refusal is one clear
`error:` line on stderr, exit code 1 (2 for usage errors), no traceback, and the pool
is exactly as it was afterwards (check clean, same volumes, snapshots and bytes)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import pytest

import blocksnap
from blocksnap.engine.layout import UNIT
from blocksnap.errors import AlreadyExists, Busy, CorruptionError, NotAPool, NotFound, OutOfSpace

from ..conftest import TEST_POOL_SIZE, assert_cli_error, run_cli

K = 1 << 10
M = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fill_pool(pool, bs: int):
    """A volume written block by block until the pool refuses with ENOSPC."""
    filler = pool.create_volume("f", size=64 * M, block_size=bs)
    off = 0
    with pytest.raises(blocksnap.OutOfSpace):
        while True:
            filler.write(off, rand(bs, off))
            off += bs
    return filler


def make_origin(path, nblocks: int, bs: int, seed: int = 1) -> bytes:
    data = rand(nblocks * bs, seed)
    with open(path, "wb") as f:
        f.write(data)
    return data


def fingerprint(path) -> dict:
    """Everything a bad command must not change, read through the API."""
    with blocksnap.Pool.open(str(path)) as pool:
        rep = pool.check()
        assert rep["clean"], rep["errors"]
        out = {"used": pool.status()["used"]}
        for v in pool.volumes():
            out[v.name] = (v.mode, v.size, v.block_size, hashlib.sha256(v.read(0, v.size)).hexdigest())
            for s in v.snapshots():
                out[s.ref] = (s.size, s.labels, hashlib.sha256(s.read(0, s.size)).hexdigest())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pool with ROW volumes vm1 and vm2 (each with snapshot s1) and a COW volume c1,
    plus files the bad commands point at."""
    d = tmp_path_factory.mktemp("bad")
    path = d / "pool"
    origin = d / "origin.img"
    origin.write_bytes(os.urandom(512 * K))
    with blocksnap.Pool.create(str(path), size=TEST_POOL_SIZE) as pool:
        vm1 = pool.create_volume("vm1", size=1 * M, block_size=64 * K)
        vm1.write(0, os.urandom(200 * K))
        vm1.snapshot("s1", labels={"k": "v"})
        vm1.write(300 * K, b"after")
        vm2 = pool.create_volume("vm2", size=2 * M, block_size=4 * K)
        vm2.write(4 * K, os.urandom(8 * K))
        vm2.snapshot("s1")
        c1 = pool.create_volume("c1", mode="cow", origin=str(origin), block_size=16 * K)
        c1.snapshot("s1")
        c1.write(0, b"changed")
    (d / "existing.img").write_bytes(b"keep me")
    (d / "odd.img").write_bytes(os.urandom(1000))
    (d / "good.img").write_bytes(os.urandom(64 * K))
    (d / "empty.img").write_bytes(b"")
    (d / "notempty").mkdir()
    (d / "notempty" / "file").write_text("x")
    (d / "emptydir").mkdir()
    (d / "plainfile").write_text("not a pool")
    return {"dir": d, "pool": path, "fp": fingerprint(path)}


# (name, arguments, exit code, text the one error line holds); the exit codes are the
# error classes' (docs/usage.md, "Exit codes"): 1 general, 2 usage, 3 not found, 4 exists, 5 busy

BAD = [
    # names
    ("name-space", ["volume", "create", "bad name", "--size", "1M"], 1, "invalid volume name"),
    ("name-slash", ["volume", "create", "a/b", "--size", "1M"], 1, "invalid volume name"),
    ("name-leading-dot", ["volume", "create", ".hidden", "--size", "1M"], 1, "invalid volume name"),
    ("name-too-long", ["volume", "create", "a" * 65, "--size", "1M"], 1, "invalid volume name"),
    ("name-at", ["volume", "create", "a@b", "--size", "1M"], 1, "invalid volume name"),
    ("name-unicode", ["volume", "create", "vol\u00e9", "--size", "1M"], 1, "invalid volume name"),
    ("snap-name", ["snapshot", "create", "vm1@bad name"], 1, "invalid snapshot name"),
    ("snap-no-at", ["snapshot", "create", "vm1"], 1, "VOLUME@NAME"),
    ("snap-two-at", ["snapshot", "create", "vm1@a@b"], 1, "VOLUME@NAME"),
    ("snap-empty-name", ["snapshot", "create", "vm1@"], 1, "invalid snapshot name"),
    ("clone-bad-name", ["snapshot", "clone", "vm1@s1", "new/vol"], 1, "invalid volume name"),
    ("label", ["snapshot", "create", "vm1@s9", "--label", "novalue"], 1, "invalid label"),
    # sizes
    ("size-word", ["volume", "create", "v", "--size", "abc"], 2, "invalid size"),
    ("size-negative", ["volume", "create", "v", "--size", "-5"], 2, "invalid size"),
    ("size-unit", ["volume", "create", "v", "--size", "10X"], 2, "invalid size"),
    ("size-zero", ["volume", "create", "v", "--size", "0"], 1, "invalid volume size"),
    ("size-not-512", ["volume", "create", "v", "--size", "1000"], 1, "multiple of 512"),
    ("size-missing", ["volume", "create", "v"], 1, "--size"),
    # block sizes
    ("bs-3K", ["volume", "create", "v", "--size", "1M", "--block-size", "3K"], 1, "block size"),
    ("bs-2M", ["volume", "create", "v", "--size", "4M", "--block-size", "2M"], 1, "block size"),
    ("bs-0", ["volume", "create", "v", "--size", "1M", "--block-size", "0"], 1, "block size"),
    ("bs-2K", ["volume", "create", "v", "--size", "1M", "--block-size", "2K"], 1, "block size"),
    ("bs-import", ["volume", "import", "v", "{dir}/good.img", "--block-size", "3K"], 1, "block size"),
    # modes and origins
    ("mode", ["volume", "create", "v", "--size", "1M", "--mode", "zfs"], 2, "mode"),
    ("cow-no-origin", ["volume", "create", "v", "--mode", "cow"], 1, "origin"),
    ("cow-missing-origin", ["volume", "create", "v", "--mode", "cow", "--origin", "{dir}/nope.img"], 3,
     "no such file"),
    ("cow-origin-dir", ["volume", "create", "v", "--mode", "cow", "--origin", "{dir}/emptydir"], 1,
     "not a regular file"),
    ("cow-origin-in-use", ["volume", "create", "v", "--mode", "cow", "--origin", "{dir}/origin.img"], 5,
     "already the origin"),
    ("cow-size-mismatch", ["volume", "create", "v", "--mode", "cow", "--origin", "{dir}/odd.img",
                           "--size", "4K"], 1, "differs"),
    ("row-with-origin", ["volume", "create", "v", "--size", "1M", "--origin", "{dir}/odd.img"], 1,
     "--origin"),
    # duplicates
    ("dup-volume", ["volume", "create", "vm1", "--size", "1M"], 4, "already exists"),
    ("dup-import", ["volume", "import", "vm1", "{dir}/good.img"], 4, "already exists"),
    ("dup-snapshot", ["snapshot", "create", "vm1@s1"], 4, "already exists"),
    ("dup-clone", ["snapshot", "clone", "vm1@s1", "vm2"], 4, "already exists"),
    # things that do not exist
    ("show-no-volume", ["volume", "show", "nope"], 3, "no volume"),
    ("delete-no-volume", ["volume", "delete", "nope"], 3, "no volume"),
    ("resize-no-volume", ["volume", "resize", "nope", "1M"], 3, "no volume"),
    ("snap-no-volume", ["snapshot", "create", "nope@s1"], 3, "no volume"),
    ("show-no-snap", ["snapshot", "show", "vm1@nope"], 3, "no snapshot"),
    ("delete-no-snap", ["snapshot", "delete", "vm1@nope"], 3, "no snapshot"),
    ("rollback-no-snap", ["snapshot", "rollback", "vm1@nope"], 3, "no snapshot"),
    ("clone-no-snap", ["snapshot", "clone", "vm1@nope", "x"], 3, "no snapshot"),
    ("diff-no-snap", ["snapshot", "diff", "vm1@s1", "vm1@nope"], 3, "no snapshot"),
    ("export-no-snap", ["export", "vm1@nope", "{dir}/out.img"], 3, "no snapshot"),
    ("list-no-volume", ["snapshot", "list", "nope"], 3, "no volume"),
    ("scrub-no-volume", ["scrub", "nope"], 3, "no volume"),
    ("scrub-no-snap", ["scrub", "vm1@nope"], 3, "no snapshot"),
    # operations that do not apply
    ("diff-across-volumes", ["snapshot", "diff", "vm1@s1", "vm2@s1"], 1, "different volumes"),
    ("delete-with-snapshots", ["volume", "delete", "vm1"], 5, "snapshot"),
    ("resize-cow", ["volume", "resize", "c1", "1M"], 1, "cow"),
    ("resize-zero", ["volume", "resize", "vm1", "0"], 1, "invalid volume size"),
    ("resize-odd", ["volume", "resize", "vm1", "1001"], 1, "multiple of 512"),
    ("resize-word", ["volume", "resize", "vm1", "big"], 2, "invalid size"),
    ("export-exists", ["export", "vm1@s1", "{dir}/existing.img"], 4, "exists"),
    ("export-to-dir", ["export", "vm1@s1", "{dir}/emptydir"], 2, "directory"),
    ("import-odd-size", ["volume", "import", "v", "{dir}/odd.img"], 1, "multiple of 512"),
    ("import-empty", ["volume", "import", "v", "{dir}/empty.img"], 1, "multiple of 512"),
    ("import-missing", ["volume", "import", "v", "{dir}/nope.img"], 3, "no such file"),
    ("import-dir", ["volume", "import", "v", "{dir}/emptydir"], 2, "directory"),
    ("import-cow-mode", ["volume", "import", "v", "{dir}/good.img", "--mode", "cow"], 2, "mode"),
    ("freeze-timeout", ["snapshot", "create", "vm1@s9", "--freeze-timeout", "1000"], 2, "freeze-timeout"),
    # usage
    ("no-such-command", ["bogus"], 2, "no such command"),
    ("no-such-option", ["volume", "list", "--bogus"], 2, "no such option"),
    ("missing-argument", ["volume", "create"], 2, "missing argument"),
    ("extra-argument", ["volume", "show", "vm1", "vm2"], 2, "unexpected extra argument"),
]


@pytest.mark.parametrize("args,code,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_cli_refuses_bad_input_and_leaves_pool_intact(world, args, code, needle):
    args = [a.replace("{dir}", str(world["dir"])) for a in args]
    res = run_cli(world["pool"], *args)
    assert_cli_error(res, code, needle)
    assert res.stdout == ""
    assert fingerprint(world["pool"]) == world["fp"]
    assert (world["dir"] / "existing.img").read_bytes() == b"keep me"
    assert not (world["dir"] / "out.img").exists()
    leftovers = [p for p in os.listdir(world["dir"]) if "partial" in p]
    assert not leftovers


def test_bad_input_with_debug_shows_the_traceback(world):
    res = run_cli(world["pool"], "--debug", "volume", "show", "nope")
    assert res.returncode == NotFound.exit_code
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: no volume")


@pytest.mark.parametrize("where", ["emptydir", "plainfile", "missing", "notempty"])
def test_not_a_pool(world, where):
    path = world["dir"] / where
    before = sorted(os.listdir(path)) if path.is_dir() else None
    for args in (["pool", "status"], ["volume", "list"], ["snapshot", "list"], ["check"]):
        res = run_cli(path, *args)
        assert_cli_error(res, NotAPool.exit_code, "not a blocksnap pool")
    if before is not None:
        assert sorted(os.listdir(path)) == before  # nothing created in it
    assert not (world["dir"] / "missing").exists()
    with pytest.raises(blocksnap.NotAPool):
        blocksnap.Pool.open(str(path))


def test_pool_init_refuses_non_empty_dir_and_existing_pool(world, tmp_path):
    res = run_cli(world["dir"] / "notempty", "pool", "init", "--size", "16M")
    assert_cli_error(res, 1, "not an empty directory")
    assert os.listdir(world["dir"] / "notempty") == ["file"]
    res = run_cli(world["pool"], "pool", "init", "--size", "16M")
    assert_cli_error(res, AlreadyExists.exit_code, "already a blocksnap pool")
    assert fingerprint(world["pool"]) == world["fp"]
    res = run_cli(world["dir"] / "plainfile", "pool", "init", "--size", "16M")
    assert_cli_error(res, 1)
    # too small, or a --data file that does not exist: nothing left behind
    for args, code, needle in ((["--size", "1M"], 1, "too small"),
                               (["--data", str(tmp_path / "nodata.img")], NotFound.exit_code, "no such file"),
                               (["--size", "lots"], 2, "invalid size")):
        p = tmp_path / "p"
        res = run_cli(p, "pool", "init", *args)
        assert_cli_error(res, code, needle)
        assert not p.exists()


def test_pool_whose_data_store_is_not_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        blocksnap.Pool.create(str(p), size=16 * M).close()
    os.replace(b / "data", a / "data")
    res = run_cli(a, "pool", "status")
    assert_cli_error(res, NotAPool.exit_code, "does not belong")


def test_missing_cow_origin(tmp_path):
    path = tmp_path / "pool"
    origin = tmp_path / "origin.img"
    origin.write_bytes(os.urandom(64 * K))
    with blocksnap.Pool.create(str(path), size=16 * M) as pool:
        pool.create_volume("c", mode="cow", origin=str(origin), block_size=4 * K).snapshot("s")
    os.rename(origin, tmp_path / "moved.img")
    res = run_cli(path, "snapshot", "create", "c@s2")
    assert_cli_error(res, NotFound.exit_code, "missing")
    res = run_cli(path, "export", "c@s", tmp_path / "out.img")
    assert_cli_error(res, NotFound.exit_code, "missing")
    assert not (tmp_path / "out.img").exists()
    res = run_cli(path, "volume", "show", "c", "--json")  # metadata needs no origin
    assert res.returncode == 0, res.stderr
    res = run_cli(path, "check")
    assert res.returncode == 0 and "clean" in res.stdout


# -- out of range, through the API -------------------------------------------------------

@pytest.mark.parametrize("mode", ["row", "cow"])
def test_out_of_range_io(pool, tmp_path, mode):
    size = 256 * K
    if mode == "row":
        vol = pool.create_volume("v", size=size, block_size=16 * K)
    else:
        origin = tmp_path / "o.img"
        origin.write_bytes(bytes(size))
        vol = pool.create_volume("v", mode="cow", origin=str(origin), block_size=16 * K)
    vol.write(0, b"abc")
    snap = vol.snapshot("s")
    for bad in [lambda: vol.read(size - 10, 11), lambda: vol.read(-1, 5), lambda: vol.read(0, -1),
                lambda: vol.write(size - 2, b"abc"), lambda: vol.write(-1, b"a"),
                lambda: vol.write(size, b"a"), lambda: vol.discard(size - 512, 1024),
                lambda: vol.discard(-512, 512), lambda: snap.read(size, 1),
                lambda: snap.read(size - 1, 2)]:
        with pytest.raises(blocksnap.InvalidArgument, match="past the end|negative"):
            bad()
    assert vol.read(size - 3, 3) == bytes(3)
    assert vol.read(size, 0) == b""
    vol.write(size - 3, b"xyz")
    assert vol.read(size - 3, 3) == b"xyz"
    assert vol.read(0, 3) == b"abc" and snap.read(0, 3) == b"abc"
    assert pool.check()["clean"]


def test_api_names_and_arguments(pool, tmp_path):
    for bad in ["", "a b", "-x", "a" * 65, "ä", "a/b", None, 5]:
        with pytest.raises(blocksnap.InvalidArgument):
            pool.create_volume(bad, size=1 * M)
    pool.create_volume("a" * 64, size=1 * M)  # 64 characters is the limit
    for bs in [0, 3 * K, 2 * M, 8 * K + 1, 2 * K, -4096]:
        with pytest.raises(blocksnap.InvalidArgument):
            pool.create_volume("v", size=1 * M, block_size=bs)
    for size in [0, -512, 1000]:
        with pytest.raises(blocksnap.InvalidArgument):
            pool.create_volume("v", size=size)
    with pytest.raises(blocksnap.InvalidArgument):
        pool.create_volume("v", size=1 * M, mode="zfs")
    with pytest.raises(blocksnap.NotFound):
        pool.create_volume("v", mode="cow", origin=str(tmp_path / "nope"))
    vol = pool.create_volume("v", size=1 * M)
    with pytest.raises(blocksnap.AlreadyExists):
        pool.create_volume("v", size=1 * M)
    vol.snapshot("s")
    with pytest.raises(blocksnap.AlreadyExists):
        vol.snapshot("s")
    with pytest.raises(blocksnap.InvalidArgument):
        vol.snapshot("bad name")
    with pytest.raises(blocksnap.InvalidArgument):
        vol.snapshot("ok", labels={"a=b": "c"})
    with pytest.raises(blocksnap.InvalidArgument):
        vol.snapshot("ok", consistency="perfect")
    with pytest.raises(blocksnap.NotFound):
        vol.get_snapshot("nope")
    with pytest.raises(blocksnap.NotFound):
        pool.volume("nope")
    with pytest.raises(blocksnap.Busy):
        vol.delete()
    snap = vol.get_snapshot("s")
    snap.delete()
    with pytest.raises(blocksnap.BlocksnapError):
        snap.read(0, 1)  # a deleted snapshot's handle
    assert [v.name for v in pool.volumes()] == ["a" * 64, "v"]
    assert pool.check()["clean"]


# -- a full pool (ENOSPC) -----------------------------------------------------------------------

@pytest.mark.parametrize("bs,chunk_blocks", [(64 * K, 7), (4 * K, 13), (64 * K, 1)])
def test_full_pool_out_of_space_keeps_pool_intact(tmp_path, bs, chunk_blocks):
    path = str(tmp_path / "pool")
    pool = blocksnap.Pool.create(path, size=16 * M)
    try:
        vol = pool.create_volume("v", size=64 * M, block_size=bs)
        base = rand(2 * M, 5)
        vol.write(0, base)
        snap = vol.snapshot("s1")
        model = bytearray(64 * M)
        model[:2 * M] = base
        off, chunk, i = 0, chunk_blocks * bs, 0
        with pytest.raises(blocksnap.OutOfSpace):
            while off < 64 * M:
                data = rand(chunk, 100 + i)
                vol.write(off, data)
                model[off:off + chunk] = data
                off += chunk
                i += 1
        assert off > 10 * M  # the pool really filled up (15 MiB usable)
        st = pool.status()
        assert st["free"] < chunk
        rep = pool.check()
        assert rep["clean"], rep["errors"]
        assert snap.read(0, 2 * M) == base
        assert vol.read(0, off + chunk) == bytes(model[:off + chunk])

        # reopen: the same, nothing lost that was written before ENOSPC
        pool.close()
        pool = blocksnap.Pool.open(path)
        vol = pool.volume("v")
        assert pool.check()["clean"]
        assert vol.read(0, off + chunk) == bytes(model[:off + chunk])
        assert vol.get_snapshot("s1").read(0, 2 * M) == base

        # deleting the snapshot (whose blocks the live volume overwrote) frees 2 MiB
        free0 = pool.status()["free"]
        vol.get_snapshot("s1").delete()
        assert pool.status()["free"] == free0 + 2 * M
        more = rand(2 * M, 999)
        vol.write(off, more)  # fits now
        model[off:off + 2 * M] = more
        vol.flush()
        assert vol.read(0, off + 2 * M) == bytes(model[:off + 2 * M])
        # deleting the volume gives everything back
        vol.delete()
        assert pool.status()["used"] == 0
        assert pool.check()["clean"]
    finally:
        pool.close()


def test_full_pool_cow_write_refused_before_touching_origin(tmp_path):
    """When the copy of the old block cannot be stored, the origin is not written."""
    bs = 64 * K
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=16 * M)
    try:
        origin = tmp_path / "origin.img"
        old = make_origin(origin, 16, bs)
        cow = pool.create_volume("c", mode="cow", origin=str(origin), block_size=bs)
        snap = cow.snapshot("s")
        filler = fill_pool(pool, bs)
        with pytest.raises(blocksnap.OutOfSpace):
            cow.write(3 * bs, b"\x01" * bs)
        assert cow.read(0, 16 * bs) == old
        assert snap.read(0, 16 * bs) == old
        assert pool.check()["clean"]
        with open(origin, "rb") as f:
            assert f.read() == old
        filler.discard(0, 4 * bs)
        filler.flush()
        cow.write(3 * bs, b"\x01" * bs)
        assert snap.read(0, 16 * bs) == old
        assert cow.read(3 * bs, bs) == b"\x01" * bs
        assert pool.check()["clean"]
    finally:
        pool.close()


def test_full_pool_failed_shrink_changes_nothing(tmp_path):
    """Shrinking to a size inside a block zeroes the rest of that block, which needs a
    fresh block when a snapshot shares it: without space the resize fails as a whole."""
    bs = 64 * K
    path = str(tmp_path / "pool")
    pool = blocksnap.Pool.create(path, size=16 * M)
    try:
        vol = pool.create_volume("v", size=4 * M, block_size=bs)
        data = rand(4 * M, 1)
        vol.write(0, data)
        vol.snapshot("s")
        fill_pool(pool, bs)
        with pytest.raises(blocksnap.OutOfSpace):
            vol.resize(1 * M + 512, shrink=True)
        assert vol.size == 4 * M
        assert vol.read(0, 4 * M) == data
        assert pool.check()["clean"]
        pool.close()
        pool = blocksnap.Pool.open(path)
        vol = pool.volume("v")
        assert vol.size == 4 * M and vol.read(0, 4 * M) == data
        # with room again it works, and the cut-off part of the last block reads zeros
        pool.volume("f").discard(0, 1 * M)
        pool.volume("f").flush()  # freed space is reusable once the discard commits
        vol.resize(1 * M + 512, shrink=True)
        vol.resize(2 * M)
        assert vol.read(0, 2 * M) == data[:1 * M + 512] + bytes(1 * M - 512)
        assert vol.get_snapshot("s").read(0, 4 * M) == data
        assert pool.check()["clean"]
    finally:
        pool.close()


def test_full_pool_failed_clone_and_import_leave_no_trace(tmp_path):
    """A COW clone (which copies origin blocks) or an import that runs out of space
    half way is undone completely: no volume, no leaked block or page, check clean."""
    bs = 4 * K
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=16 * M)
    try:
        origin = tmp_path / "origin.img"
        old = make_origin(origin, 2048, bs)  # 8 MiB: two map leaves' worth of blocks
        cow = pool.create_volume("c", mode="cow", origin=str(origin), block_size=bs)
        snap = cow.snapshot("s")
        cow.write(0, b"\2" * (3 * bs))
        filler = pool.create_volume("f", size=64 * M, block_size=bs)
        filler.write(0, rand(10 * M, 8))
        filler.flush()
        used = pool.status()["used"]
        with pytest.raises(blocksnap.OutOfSpace):
            snap.clone("cl")
        assert [v.name for v in pool.volumes()] == ["c", "f"]
        rep = pool.check()
        assert rep["clean"], rep["errors"]
        assert pool.status()["used"] == used
        assert snap.read(0, len(old)) == old

        src = tmp_path / "big.img"
        with open(src, "wb") as f:
            f.write(rand(8 * M, 9))
        with pytest.raises(blocksnap.OutOfSpace):
            pool.import_volume("imp", str(src), block_size=bs)
        assert [v.name for v in pool.volumes()] == ["c", "f"]
        rep = pool.check()
        assert rep["clean"], rep["errors"]
        assert pool.status()["used"] == used

        # with room again, the clone works and shares the copied blocks
        filler.delete()
        clone = snap.clone("cl")
        assert clone.read(0, len(old)) == old
        assert pool.check()["clean"]
    finally:
        pool.close()


def test_cli_full_pool(tmp_path):
    """Through the command line: ENOSPC is one error line, and nothing is left behind."""
    path = tmp_path / "pool"
    assert run_cli(path, "pool", "init", "--size", "16M").returncode == 0
    src = tmp_path / "big.img"
    src.write_bytes(rand(20 * M, 1))
    res = run_cli(path, "volume", "import", "big", src)
    assert_cli_error(res, OutOfSpace.exit_code, "out of space")
    res = run_cli(path, "volume", "list", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    with blocksnap.Pool.open(str(path)) as pool:
        assert pool.status()["used"] == 0
        assert pool.check()["clean"]
    small = tmp_path / "small.img"
    small.write_bytes(rand(4 * M, 2))
    assert run_cli(path, "volume", "import", "small", small).returncode == 0


# -- two openers ----------------------------------------------------------------------------

def test_two_processes_cannot_open_one_pool(tmp_path):
    path = tmp_path / "pool"
    with blocksnap.Pool.create(str(path), size=16 * M) as pool:
        pool.create_volume("v", size=1 * M).write(0, b"hello")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         ("import sys, time, blocksnap; p = blocksnap.Pool.open(sys.argv[1]); "
          "print('open', flush=True); time.sleep(60)"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        res = run_cli(path, "volume", "list")
        line = assert_cli_error(res, Busy.exit_code, "in use")
        assert str(holder.pid) in line
        res = run_cli(path, "snapshot", "create", "v@s")
        assert_cli_error(res, Busy.exit_code, "in use")
        with pytest.raises(blocksnap.Busy, match="in use"):
            blocksnap.Pool.open(str(path))
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone (even killed), the pool opens and is intact
    with blocksnap.Pool.open(str(path)) as pool:
        assert pool.volume("v").read(0, 5) == b"hello"
        assert pool.volume("v").snapshots() == []
        assert pool.check()["clean"]


def test_second_open_in_one_process_is_busy_too(tmp_path):
    path = str(tmp_path / "pool")
    with blocksnap.Pool.create(path, size=16 * M):
        t = time.monotonic()
        with pytest.raises(blocksnap.Busy):
            blocksnap.Pool.open(path, wait=0.2)
        assert time.monotonic() - t >= 0.2
    blocksnap.Pool.open(path).close()


# -- silent corruption -------------------------------------------------------------------------

def _flip_byte_of_block(data_file: str, block: bytes) -> int:
    """Find the stored copy of `block` in the data file and flip one byte of it."""
    with open(data_file, "r+b") as f:
        content = f.read()
        at = content.find(block)
        assert at >= 0 and at % UNIT == 0 and content.find(block, at + 1) < 0
        f.seek(at + 1234)
        old = f.read(1)
        f.seek(at + 1234)
        f.write(bytes([old[0] ^ 0x40]))
    return at


def test_corrupt_block_is_named_by_scrub_and_refused_by_reads(tmp_path):
    path = tmp_path / "pool"
    bs = 16 * K
    blocks = [os.urandom(bs) for _ in range(6)]
    with blocksnap.Pool.create(str(path), size=16 * M) as pool:
        vol = pool.create_volume("vm1", size=1 * M, block_size=bs)
        for i, b in enumerate(blocks):
            vol.write((10 + i) * bs, b)
        vol.snapshot("s1")
        data_file = pool.status()["data"]
    store_off = _flip_byte_of_block(data_file, blocks[3])  # volume block 13

    res = run_cli(path, "scrub", "vm1")
    assert_cli_error(res, CorruptionError.exit_code, "vm1", "checksum")  # the report is on stdout, one error line
    bad = [line for line in res.stdout.splitlines() if line.startswith("bad block")]
    assert bad and all(f"offset {13 * bs} " in line for line in bad), res.stdout
    assert {"vm1", "vm1@s1"} == {line.split()[2] for line in bad}
    assert all(f"data store offset {store_off})" in line for line in bad)
    res = run_cli(path, "scrub", "vm1@s1", "--json")
    assert_cli_error(res, CorruptionError.exit_code, "vm1@s1", "checksum")
    rep = json.loads(res.stdout)
    assert rep["clean"] is False
    assert [(b["where"], b["block"], b["offset"], b["store_offset"]) for b in rep["bad"]] == \
        [("vm1@s1", 13, 13 * bs, store_off)]

    out = tmp_path / "out.img"
    res = run_cli(path, "export", "vm1@s1", out)
    assert_cli_error(res, CorruptionError.exit_code, "checksum", "block 13")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]

    with blocksnap.Pool.open(str(path)) as pool:
        vol = pool.volume("vm1")
        with pytest.raises(blocksnap.CorruptionError, match="block 13"):
            vol.read(0, 1 * M)
        with pytest.raises(blocksnap.CorruptionError, match="block 13"):
            vol.read(10 * bs, 6 * bs)   # one run in the store: the fast path
        with pytest.raises(blocksnap.CorruptionError, match="block 13"):
            vol.get_snapshot("s1").read(13 * bs + 5, 1)
        with pytest.raises(blocksnap.CorruptionError):
            vol.write(13 * bs + 1, b"x")  # a partial write must read the block first
        # the rest is readable, and a whole-block overwrite replaces the bad copy
        assert vol.read(10 * bs, 3 * bs) == b"".join(blocks[:3])
        assert vol.read(14 * bs, 2 * bs) == b"".join(blocks[4:])
        vol.write(13 * bs, b"\7" * bs)
        assert vol.read(13 * bs, bs) == b"\7" * bs
        assert pool.check()["clean"]  # metadata is fine: only data was hit
    res = run_cli(path, "scrub", "vm1")
    assert_cli_error(res, CorruptionError.exit_code, "1 block(s)")
    assert "vm1@s1" in res.stdout  # the snapshot still holds the bad copy


def test_check_reports_broken_metadata(tmp_path):
    """A map page missing from the catalog (which no crash can cause: SQLite commits are
    atomic) is reported by `check` with an error line; --repair cuts the dangling pointer."""
    import sqlite3
    path = tmp_path / "pool"
    with blocksnap.Pool.create(str(path), size=16 * M) as pool:
        vol = pool.create_volume("v", size=8 * M, block_size=4 * K)  # two leaves
        vol.write(0, b"a" * 4096)
        vol.write(5 * M, b"b" * 4096)
    db = sqlite3.connect(path / "catalog.db")
    leaves = [r[0] for r in db.execute("SELECT id FROM pages WHERE kind = 2 ORDER BY id")]
    assert len(leaves) == 2
    db.execute("DELETE FROM pages WHERE id = ?", (leaves[1],))
    db.commit()
    db.close()
    res = run_cli(path, "check")
    assert_cli_error(res, CorruptionError.exit_code, "problem")
    assert res.stdout.startswith("problem: ")
    res = run_cli(path, "check", "--repair")
    assert res.returncode == 0 and "repaired: " in res.stdout, (res.stdout, res.stderr)
    res = run_cli(path, "check")
    assert res.returncode == 0 and res.stdout.strip() == "clean", (res.stdout, res.stderr)
    with blocksnap.Pool.open(str(path)) as pool:
        assert pool.volume("v").read(0, 4096) == b"a" * 4096
        assert pool.volume("v").read(5 * M, 4096) == bytes(4096)  # what the lost page held
