"""send | receive as users run them (real subprocesses, real pipes), between two
pools: full and incremental streams from ROW and COW volumes arrive bit for bit,
and every damaged stream or wrong target is refused without changing the pool."""
from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
import time

import pytest

import blocksnap
from blocksnap.errors import AlreadyExists, Busy, NotFound, OutOfSpace
from blocksnap.service.daemon_server import answer

from ..conftest import assert_cli_error, history_pool, run_cli

M = 1 << 20
SIZE = 24 * M


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def ok(pool, *args, **kw) -> subprocess.CompletedProcess:
    res = run_cli(pool, *args, **kw)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    return res


def pipe(src_pool, send_args, dst_pool, recv_args,
         quiet: bool = False) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`blocksnap send ... | blocksnap receive ...` through a real pipe."""
    base = [sys.executable, "-m", "blocksnap"] + (["-q"] if quiet else [])
    sender = subprocess.Popen(base + ["--pool", str(src_pool), "send", *send_args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    recv = subprocess.run(base + ["--pool", str(dst_pool), "receive", *recv_args], stdin=sender.stdout,
                          capture_output=True, timeout=120)
    sender.stdout.close()
    serr = sender.stderr.read()
    sender.wait(60)
    return (subprocess.CompletedProcess(sender.args, sender.returncode, b"", serr),
            subprocess.CompletedProcess(recv.args, recv.returncode, recv.stdout, recv.stderr))


def contents(pool_path, volume: str) -> dict[str, bytes]:
    """Every snapshot of `volume`, read back whole, plus the live volume as '@live'."""
    with blocksnap.Pool.open(str(pool_path)) as pool:
        vol = pool.volume(volume)
        out = {s.name: s.read(0, s.size) for s in vol.snapshots()}
        out["@live"] = vol.read(0, vol.size)
        return out


@pytest.fixture
def src(tmp_path):
    """A ROW volume with three snapshots: data, then overwrites, zeros, a discard, a resize."""
    return history_pool(tmp_path / "src", SIZE)


@pytest.fixture
def dst(tmp_path):
    path = tmp_path / "dst"
    blocksnap.Pool.create(str(path), size=256 * M).close()
    return path


def test_full_then_incrementals_arrive_bit_for_bit(src, dst, tmp_path):
    s, r = pipe(src, ["v@s1"], dst, ["w"])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    assert b"sent v@s1 (full)" in s.stderr and b"received w@s1 (full" in r.stdout
    ok(src, "send", "v@s2", "--from", "v@s1", "-o", tmp_path / "inc12")
    ok(dst, "receive", "w", "-i", tmp_path / "inc12")
    s, r = pipe(src, ["v@s3", "--from", "v@s2"], dst, ["w"], quiet=True)
    assert (s.returncode, r.returncode, s.stderr, r.stdout, r.stderr) == (0, 0, b"", b"", b"")
    want, got = contents(src, "v"), contents(dst, "w")
    for name in ("s1", "s2", "s3"):
        assert got[name] == want[name], name
    assert got["@live"] == want["s3"]
    with blocksnap.Pool.open(str(dst)) as pool:
        w = pool.volume("w")
        assert [x.name for x in w.snapshots()] == ["s1", "s2", "s3"]
        assert w.get_snapshot("s1").labels == {"why": "test"}
        assert w.size == SIZE + 4 * M
        assert pool.check()["clean"]
    # the incremental stream carries the changes, not the volume
    assert os.path.getsize(tmp_path / "inc12") < 2 * M


def test_cow_volume_streams(tmp_path, dst):
    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:
        f.truncate(8 * M)
        f.seek(M)
        f.write(rand(M, 7))
    path = tmp_path / "cowpool"
    with blocksnap.Pool.create(str(path), size=64 * M) as pool:
        v = pool.create_volume("db", mode="cow", origin=str(origin))
        v.snapshot("a")
        v.write(M + 4096, rand(70_000, 8))
        v.write(5 * M, rand(M, 9))
        v.snapshot("b")
    for args in (["db@a"], ["db@b", "--from", "db@a"]):
        s, r = pipe(path, args, dst, ["copy"])
        assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    want, got = contents(path, "db"), contents(dst, "copy")
    assert got["a"] == want["a"] and got["b"] == want["b"]


def damaged_variants(stream: bytes) -> dict[str, bytes]:
    n = len(stream)
    out = {"empty": b"", "junk": b"not a stream at all" * 100, "magic only": stream[:8]}
    for at in (12, 30, n // 3, n // 2, n - 40, n - 3):
        b = bytearray(stream)
        b[at] ^= 0x10
        out[f"flip@{at}"] = bytes(b)
    for cut in (20, n // 2, n - 1):
        out[f"cut@{cut}"] = stream[:cut]
    out["trailing"] = stream + b"\0"
    return out


def test_damaged_full_streams_make_no_volume(src, dst, tmp_path):
    good = tmp_path / "full"
    ok(src, "-q", "send", "v@s2", "-o", good)
    for what, data in damaged_variants(good.read_bytes()).items():
        res = run_cli(dst, "receive", "x", input=data)
        assert_cli_error(res, 1)
        assert any(k in res.stderr for k in ("damaged", "ends early", "not a blocksnap")), (what, res.stderr)
        if what == f"flip@{len(data) // 2}":
            # inside a record's data (random data does not compress: payloads fill the
            # stream): caught by that record's own checksum, before it is written
            assert "fails its checksum" in res.stderr or "does not decompress" in res.stderr, res.stderr
    res = ok(dst, "volume", "list", "--json")
    assert json.loads(res.stdout) == [], "a refused stream left a volume behind"
    with blocksnap.Pool.open(str(dst)) as pool:
        assert pool.check()["clean"]
        assert pool.status()["used"] == 0


def test_damaged_incremental_rolls_back(src, dst, tmp_path):
    ok(src, "send", "v@s1", "-o", tmp_path / "full")
    ok(dst, "receive", "w", "-i", tmp_path / "full")
    ok(src, "send", "v@s2", "--from", "v@s1", "-o", tmp_path / "inc")
    good = (tmp_path / "inc").read_bytes()
    before = contents(dst, "w")
    for what, data in damaged_variants(good).items():
        res = run_cli(dst, "receive", "w", input=data)
        assert_cli_error(res, 1)
        assert contents(dst, "w") == before, f"{what}: the volume changed"
    ok(dst, "receive", "w", "-i", tmp_path / "inc")
    assert contents(dst, "w")["s2"] == contents(src, "v")["s2"]


def test_incremental_needs_its_base(src, dst, tmp_path):
    for name, args in (("full1", ["v@s1"]), ("inc12", ["v@s2", "--from", "v@s1"]),
                       ("inc23", ["v@s3", "--from", "v@s2"]), ("inc13", ["v@s3", "--from", "v@s1"])):
        ok(src, "send", *args, "-o", tmp_path / name)
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc12"), NotFound.exit_code, "no volume 'w'")
    ok(dst, "receive", "w", "-i", tmp_path / "full1")
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "full1"), AlreadyExists.exit_code, "already exists")
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc23"), 1, "newest snapshot of w is s1")
    # written since its base: refused until rolled back
    with blocksnap.Pool.open(str(dst)) as pool:
        pool.volume("w").write(0, b"local change")
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc12"), 1, "written since", "rollback")
    ok(dst, "receive", "w", "-i", tmp_path / "inc12", "--force")   # rolls back to s1 first
    assert contents(dst, "w")["s2"] == contents(src, "v")["s2"]
    ok(dst, "snapshot", "delete", "w@s2")
    ok(dst, "snapshot", "rollback", "w@s1")
    with blocksnap.Pool.open(str(dst)) as pool:
        pool.volume("w").resize(SIZE + M)       # a resize is a change too
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc12"), 1, "written since")
    ok(dst, "snapshot", "rollback", "w@s1")
    ok(dst, "receive", "w", "-i", tmp_path / "inc12")
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc12"), AlreadyExists.exit_code,
                     "w@s2 already exists")
    # s1 -> s3 also applies on top of s1 (another branch: roll back to s1 first)
    # a base of the same name from another pool is not the base
    other = tmp_path / "other"
    with blocksnap.Pool.create(str(other), size=64 * M) as pool:
        v = pool.create_volume("v", size=SIZE)
        v.snapshot("s1")
    ok(other, "send", "v@s1", "-o", tmp_path / "other-full")
    ok(dst, "receive", "z", "-i", tmp_path / "other-full")
    assert_cli_error(run_cli(dst, "receive", "z", "-i", tmp_path / "inc12"), 1, "not the snapshot this stream")


def test_base_deleted_and_made_again_is_not_the_base(src, dst, tmp_path):
    ok(src, "send", "v@s1", "-o", tmp_path / "full")
    ok(src, "send", "v@s2", "--from", "v@s1", "-o", tmp_path / "inc")
    ok(dst, "receive", "w", "-i", tmp_path / "full")
    with blocksnap.Pool.open(str(dst)) as pool:
        w = pool.volume("w")
        w.write(0, b"X" * 65536)
        w.get_snapshot("s1").delete()
        w.snapshot("s1")          # same name, other content
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "inc"), 1, "not the snapshot this stream")


def _record_stream(header: dict, records: list[tuple[int, int, int, bytes, int]]) -> bytes:
    """A stream made by hand: (kind, offset, length, payload, checksum) per record."""
    import struct

    import xxhash

    from blocksnap.streams import format as fmt
    body = json.dumps(header).encode()
    out = fmt.MAGIC + struct.pack("<II", fmt.VERSION, len(body)) + body + struct.pack(
        "<Q", xxhash.xxh3_64_intdigest(body))
    for kind, off, length, payload, check in records:
        out += struct.pack("<BQQIQ", kind, off, length, len(payload), check) + payload
    data = sum(r[2] for r in records if r[0] == fmt.DATA)
    return out + struct.pack("<BQQIQ", fmt.END, len(records), data, 0, xxhash.xxh3_64_intdigest(out))


def test_hostile_streams(dst):
    import xxhash
    import zstandard
    head = {"kind": "full", "source": {"volume": "v", "snapshot": "s", "created": 1.0}, "base": None,
            "size": 8 * M, "block_size": 65536, "labels": {}, "consistency": "crash"}
    # a record of 4 KiB whose payload unpacks to 64 MiB: refused before unpacking it
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * M))
    res = run_cli(dst, "receive", "x", input=_record_stream(head, [(1, 0, 4096, bomb, 0)]))
    assert_cli_error(res, 1, "does not decompress")
    # header values the snapshot could not take are refused before any data
    good = [(1, 0, 4096, zstandard.ZstdCompressor().compress(b"a" * 4096), xxhash.xxh3_64_intdigest(b"a" * 4096))]
    for bad in ({"consistency": "crash-plus"}, {"labels": {"k": 1}}, {"labels": ["x"]}, {"base": "s0"},
                {"source": {"volume": "v"}}, {"size": -1}, {"block_size": "64K"}):
        res = run_cli(dst, "receive", "x", input=_record_stream(dict(head, **bad), good))
        assert_cli_error(res, 1, "damaged stream")
    ok(dst, "receive", "x", input=_record_stream(head, good))   # the same stream, well formed
    assert contents(dst, "x")["s"][:4097] == b"a" * 4096 + b"\0"


def test_closed_standard_streams_and_broken_pipes(src, tmp_path):
    blocksnap_cmd = f"{sys.executable} -m blocksnap --pool {src}"
    for cmd in (f"{blocksnap_cmd} send v@s1 >&-", f"{blocksnap_cmd} receive w <&-"):
        res = subprocess.run(["bash", "-c", cmd], stderr=subprocess.PIPE, timeout=60)
        assert res.returncode == 1 and res.stderr.decode().startswith("error: no standard"), res.stderr
    sender = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(src), "send", "v@s1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender.stdout.read(100)
    sender.stdout.close()     # like `| head -c 100`
    err = sender.stderr.read().decode()
    assert sender.wait(60) == 1 and err.startswith("error: ") and "broken pipe" in err and err.count("\n") == 1


def test_send_refusals_leave_no_file(src, tmp_path):
    out = tmp_path / "s"
    assert_cli_error(run_cli(src, "send", "v@s1", "--from", "v@s2", "-o", out), 1, "must be older")
    assert_cli_error(run_cli(src, "send", "v@nope", "-o", out), NotFound.exit_code, "no snapshot v@nope")
    assert_cli_error(run_cli(src, "send", "nope@s1", "-o", out), NotFound.exit_code, "nope")
    assert_cli_error(run_cli(src, "send", "v@s2", "--from", "x@s1", "-o", out), 1, "different volumes")
    assert not out.exists()
    out.write_bytes(b"keep me")
    assert_cli_error(run_cli(src, "send", "v@s1", "-o", out), 1, "exists")
    assert out.read_bytes() == b"keep me"
    assert_cli_error(run_cli(src, "receive", "w", "-i", tmp_path / "missing"), 1, "no such file")
    # a binary stream is never written to (or read from) a terminal
    master, slave = pty.openpty()
    try:
        for args in (["send", "v@s1"], ["receive", "w"]):
            res = subprocess.run([sys.executable, "-m", "blocksnap", "--pool", str(src), *args],
                                 stdin=slave, stdout=slave, stderr=subprocess.PIPE, timeout=60)
            assert res.returncode == 1 and b"terminal" in res.stderr, res.stderr
    finally:
        os.close(master)
        os.close(slave)


def test_receive_into_a_full_pool(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    with blocksnap.Pool.create(str(big), size=64 * M) as pool:
        v = pool.create_volume("v", size=SIZE)
        v.write(0, rand(20 * M, 11))
        v.snapshot("s1")
    blocksnap.Pool.create(str(small), size=16 * M).close()
    ok(big, "send", "v@s1", "-o", tmp_path / "full")
    assert_cli_error(run_cli(small, "receive", "w", "-i", tmp_path / "full"), OutOfSpace.exit_code, "space")
    with blocksnap.Pool.open(str(small)) as pool:
        assert [v.name for v in pool.volumes()] == []
        assert pool.check()["clean"]


def test_receive_killed_midway(tmp_path, dst):
    """kill -9 of a receive: the pool stays clean and the half-made volume says what it is."""
    big = tmp_path / "big"
    with blocksnap.Pool.create(str(big), size=64 * M) as pool:
        v = pool.create_volume("v", size=SIZE)
        v.write(0, rand(20 * M, 12))
        v.snapshot("s1")
    ok(big, "send", "v@s1", "-o", tmp_path / "full")
    stream = (tmp_path / "full").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(dst), "receive", "w"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(stream[:len(stream) // 2])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while os.stat(dst / "data").st_blocks * 512 < 4 * M:   # data of the stream written
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    with blocksnap.Pool.open(str(dst)) as pool:
        assert pool.check()["clean"]
    assert_cli_error(run_cli(dst, "receive", "w", "-i", tmp_path / "full"), AlreadyExists.exit_code,
                     "interrupted", "volume delete w")
    ok(dst, "volume", "delete", "w")
    ok(dst, "receive", "w", "-i", tmp_path / "full")
    assert contents(dst, "w")["s1"] == contents(big, "v")["s1"]


def test_daemon_takes_only_passed_descriptors():
    seen = []
    resp = answer(lambda op, args: seen.append(args) or "done", b'{"op": "send", "args": {"fd": 1}}\n')
    assert resp == {"ok": "done"} and seen == [{}]
    r, w = os.pipe()
    try:
        answer(lambda op, args: seen.append(args), b'{"op": "receive", "args": {"fd": 1}}\n', [r])
        assert seen[-1] == {"fd": r}
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, FUSE)")
def test_daemon_receive_is_guarded_and_dies_with_its_client(src, dst, tmp_path):
    """While a receive runs in the daemon nothing else changes its volume; when its
    client is killed, the daemon notices and undoes the receive."""
    ok(src, "send", "v@s1", "-o", tmp_path / "full")
    ok(src, "send", "v@s3", "--from", "v@s1", "-o", tmp_path / "inc")
    ok(dst, "receive", "w", "-i", tmp_path / "full")
    ok(dst, "volume", "create", "dummy", "--size", "1M")
    ok(dst, "attach", "dummy")                              # the pool is served from here on
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(dst), "receive", "w", "-i", fifo],
                            stderr=subprocess.PIPE)
    writer = open(fifo, "wb")
    try:
        inc = (tmp_path / "inc").read_bytes()
        writer.write(inc[:len(inc) // 2])                   # then the stream stalls
        writer.flush()
        deadline = time.monotonic() + 30
        while "being received" not in run_cli(dst, "snapshot", "rollback", "w@s1").stderr:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        for args in (["snapshot", "create", "w@x"], ["snapshot", "delete", "w@s1"], ["volume", "resize", "w", "64M"],
                     ["volume", "delete", "w", "--recursive"], ["attach", "w"], ["stop"]):
            assert_cli_error(run_cli(dst, *args), Busy.exit_code, "receiv")
        mnt = json.loads(ok(dst, "pool", "status", "--json").stdout).get("daemon", {}).get("mountpoint") \
            or str(dst / "mnt")
        with pytest.raises(OSError) as e:
            open(os.path.join(mnt, "w", "volume.img"), "r+b")
        assert e.value.errno == 16                           # EBUSY
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while "being received" in run_cli(dst, "snapshot", "create", "w@probe").stderr:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        writer.close()
        ok(dst, "stop", "--force")
    with blocksnap.Pool.open(str(dst)) as pool:
        w = pool.volume("w")
        assert [s.name for s in w.snapshots()] == ["s1", "probe"]
        assert w.read(0, w.size) == w.get_snapshot("s1").read(0, w.size), "the receive was not undone"
        assert pool.check()["clean"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, FUSE)")
def test_send_and_receive_through_daemons(src, dst):
    ok(src, "attach", "v")
    try:
        ok(dst, "volume", "create", "busy", "--size", "1M")
        ok(dst, "attach", "busy")
        try:
            # both pools served: the stream goes through both daemons' sockets as descriptors
            s, r = pipe(src, ["v@s2"], dst, ["w"])
            assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
            ok(src, "snapshot", "create", "v@s4")
            s, r = pipe(src, ["v@s4", "--from", "v@s2"], dst, ["w"])
            assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
            ok(dst, "attach", "w")
            s, r = pipe(src, ["v@s4"], dst, ["w"])
            assert r.returncode == Busy.exit_code and b"attached" in r.stderr and b"Traceback" not in r.stderr
        finally:
            ok(dst, "stop", "--force")
    finally:
        ok(src, "stop", "--force")
    want, got = contents(src, "v"), contents(dst, "w")
    assert got["s2"] == want["s2"] and got["s4"] == want["s4"]
