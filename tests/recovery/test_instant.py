"""Instant recovery: `volume create NAME --from-backup ID` gives a live volume at once,
hydrating in the background, through the real command line, daemon, FUSE, loop
devices and mounts; kill -9 of the daemon and an unreachable S3 endpoint mid-way."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.backup.conftest import S3_ENV, Repo, export
from tests.conftest import assert_cli_error
from tests.fuse.conftest import sh, wait_for

from .conftest import ext4_backup, s3_bucket, tree

M = 1 << 20
pytestmark = pytest.mark.root


class Instant:
    """The backed-up volume's pool, served, and helpers around the restored volume."""

    def __init__(self, b, tmp: Path):
        self.b, self.tmp, self.pool = b, tmp, b.pool
        self.mnt = tmp / "served"
        self.mnt.mkdir(exist_ok=True)

    def cli(self, *args, **kw):
        return self.b.cli(*args, **kw)

    def serve(self) -> None:
        self.cli("serve", str(self.mnt))

    def daemon_pid(self) -> int:
        return json.loads((self.pool / "daemon.json").read_text())["pid"]

    def create(self, name: str = "r", *extra: str) -> dict:
        return json.loads(self.cli("volume", "create", name, "--from-backup", self.b.id, "--json", *extra).stdout)

    def show(self, name: str = "r") -> dict:
        return json.loads(self.cli("volume", "show", name, "--json").stdout)

    def hydration(self, name: str = "r") -> dict:
        return self.show(name)["hydration"]

    def wait_hydrated(self, name: str = "r", timeout: float = 240) -> dict:
        assert wait_for(lambda: self.hydration(name)["state"] == "done", timeout, 0.5), self.hydration(name)
        return self.hydration(name)

    def image(self, name: str = "r") -> Path:
        return self.mnt / name / "volume.img"

    def hydrator_log(self, name: str = "r") -> str:
        p = self.pool / "hydrate" / f"{name}.log"
        return p.read_text() if p.exists() else ""

    def daemon_log(self) -> str:
        return (self.pool / "daemon.log").read_text()


def repo_state(url: str) -> dict[str, str]:
    """Every object of a file:// repository and its content's hash (locks left out)."""
    root = Path(url[len("file://"):])
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not str(p.relative_to(root)).startswith("locks")}


def read_image(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def assert_clean(inst: Instant, name: str = "r") -> None:
    chk = json.loads(inst.cli("check", "--json").stdout)
    assert chk["clean"], chk
    scrub = json.loads(inst.cli("scrub", name, "--json").stdout)
    assert scrub["clean"] and scrub["checked_blocks"] > 0, scrub


@pytest.fixture
def inst(local_backup, tmp_path):
    i = Instant(local_backup, tmp_path)
    yield i
    for name in ("r", "r2"):
        try:
            pid = json.loads((i.pool / "hydrate" / f"{name}.pid").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
    if (i.pool / "daemon.json").exists():
        i.cli("stop", "--force", check=False, timeout=60)


def test_mounted_at_once_files_equal_while_hydrating(inst, tmp_path):
    """The restored filesystem is attached and mounted while most of it is still in the
    repository; its files equal the snapshot's; then it hydrates, and the volume equals
    the snapshot, check and scrub are clean, the repository is unchanged, and the volume
    reads whole with the repository gone."""
    want = export(inst.pool, "v@s1", tmp_path / "want.img")
    before = repo_state(inst.b.repo.url)
    inst.serve()
    info = inst.create("r", "--hydrate-rate", "2M")
    h = info["hydration"]
    assert h["state"] == "hydrating" and h["backup"] == inst.b.id and info["size"] == len(want)
    dev = inst.cli("attach", "r").stdout.strip()
    fs = tmp_path / "fs"
    fs.mkdir()
    sh("mount", "-o", "ro,noload", dev, str(fs))
    try:
        assert tree(fs) == tree(inst.b.files)
        mid = inst.hydration()
        assert mid["state"] == "hydrating" and mid["pending"] > 0, mid      # not all of it local yet
        vols = {v["name"]: v for v in json.loads(inst.cli("pool", "status", "--json").stdout)["volume_list"]}
        assert vols["r"]["hydration"]["state"] == "hydrating"              # what `status` reads
    finally:
        sh("umount", str(fs))
    done = inst.wait_hydrated()
    assert "pending" not in done and done["finished"] > 0
    assert read_image(inst.image()) == want
    inst.cli("detach", "r")
    assert_clean(inst)
    assert repo_state(inst.b.repo.url) == before
    inst.cli("verify")
    # the volume no longer needs the repository
    root = Path(inst.b.repo.url[len("file://"):])
    root.rename(root.with_name("gone"))
    try:
        assert read_image(inst.image()) == want
    finally:
        root.with_name("gone").rename(root)
    assert not (inst.pool / "hydrate" / "r.runs").exists()


def fio_verify(dev: str, offset: int, size: int, seed: int) -> None:
    """crc32c-verified random 4 KiB writes (most of them inside 64 KiB blocks not local
    yet: read-modify-write), read back and checked by fio itself."""
    sh("fio", "--name=hydrating", f"--filename={dev}", "--rw=randwrite", "--bs=4k", "--direct=1",
       "--ioengine=psync", f"--offset={offset}", f"--size={size}", "--verify=crc32c", "--do_verify=1",
       "--verify_fatal=1", "--verify_state_save=0", f"--randseed={seed}", "--fsync_on_close=1",
       "--output-format=terse", timeout=600)      # (no verify state file left in the working directory)


def pwrite_model(img: Path, model: bytearray, rnd: random.Random, n: int, bs: int = 64 << 10) -> None:
    """Writes of every shape (partial, whole-block, spanning, all-zero over stored data)
    through the FUSE image, applied to the model too, then fsynced."""
    fd = os.open(img, os.O_RDWR)
    try:
        for i in range(n):
            kind = i % 4
            if kind == 0:       # a partial write inside a block
                off, data = rnd.randrange(len(model) - 5000), rnd.randbytes(rnd.randrange(1, 5000))
            elif kind == 1:     # whole blocks
                off, data = rnd.randrange(len(model) // bs - 2) * bs, rnd.randbytes(bs * rnd.randrange(1, 3))
            elif kind == 2:     # zeros over a whole block: the backup's data must not come back
                off, data = rnd.randrange(len(model) // bs - 1) * bs, bytes(bs)
            else:               # spanning two blocks, unaligned
                off, data = rnd.randrange(bs, len(model) - 2 * bs), rnd.randbytes(bs + 777)
            assert os.pwrite(fd, data, off) == len(data)
            model[off:off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fio_writes_and_kill9_of_the_daemon_mid_hydration(inst, tmp_path):
    """fio's verified writes and writes of every shape while the volume hydrates, the
    daemon killed -9 mid-way and started again: hydration goes on, and the volume ends
    equal to the model (backup plus the writes); check and scrub clean, repository
    unchanged. The hydrator killed -9 too: `volume hydrate` starts it again."""
    model = bytearray(export(inst.pool, "v@s1", tmp_path / "want.img"))
    before = repo_state(inst.b.repo.url)
    inst.serve()
    inst.create("r", "--hydrate-rate", "256K")
    dev = inst.cli("attach", "r").stdout.strip()
    fio_verify(dev, 8 * M, 4 * M, seed=1)
    with open(dev, "rb", buffering=0) as f:
        model[8 * M:12 * M] = os.pread(f.fileno(), 4 * M, 8 * M)
    rnd = random.Random(5)
    pwrite_model(inst.image(), model, rnd, 60)
    assert inst.hydration()["pending"] > 0
    os.kill(inst.daemon_pid(), signal.SIGKILL)
    time.sleep(0.5)
    inst.serve()                     # cleans up after the dead one (its loop device too)
    assert inst.hydration()["state"] == "hydrating"
    mid = inst.hydration()["pending"]
    assert mid > 0 and inst.hydration()["hydrator_running"]
    # the hydrator killed too: pending blocks cannot be read, written ones can; restarted
    hpid = json.loads((inst.pool / "hydrate" / "r.pid").read_text())["pid"]
    os.kill(hpid, signal.SIGKILL)
    assert wait_for(lambda: not inst.hydration()["hydrator_running"], 10)
    pwrite_model(inst.image(), model, rnd, 20)
    inst.cli("volume", "hydrate", "r")
    dev = inst.cli("attach", "r").stdout.strip()
    fio_verify(dev, 20 * M, 2 * M, seed=2)
    with open(dev, "rb", buffering=0) as f:
        model[20 * M:22 * M] = os.pread(f.fileno(), 2 * M, 20 * M)
    inst.wait_hydrated()
    assert read_image(inst.image()) == bytes(model)
    inst.cli("detach", "r")
    assert_clean(inst)
    assert repo_state(inst.b.repo.url) == before
    log = inst.hydrator_log()
    assert "hydrated" in log and "Traceback" not in log, log


class Proxy:
    """A TCP forwarder in front of the S3 server that can be stopped and started on the
    same port: while stopped, the endpoint refuses connections (and open ones are cut)."""

    def __init__(self, target: str):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.lsock: socket.socket | None = None

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.lsock = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def stop(self) -> None:
        ls, self.lsock = self.lsock, None
        if ls is not None:
            ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns = []

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def s3_objects(server: str, bucket: str) -> dict[str, str]:
    import boto3
    s3 = boto3.client("s3", endpoint_url=server, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            if "/locks/" not in o["Key"]:
                out[o["Key"]] = o["ETag"]
    return out


@pytest.fixture
def s3_inst(tmp_path, s3_server, request):
    import blocksnap
    pool = tmp_path / "pool"
    blocksnap.Pool.create(str(pool), size=256 * M).close()
    bucket = s3_bucket(s3_server, request.node.name)
    proxy = Proxy(s3_server)
    proxy.start()
    repo = Repo(pool, f"s3://{bucket}/backups", dict(S3_ENV, BLOCKSNAP_S3_ENDPOINT=proxy.url))
    i = Instant(ext4_backup(repo, tmp_path), tmp_path)
    i.proxy, i.bucket, i.server = proxy, bucket, s3_server
    yield i
    proxy.stop()
    try:
        os.kill(json.loads((i.pool / "hydrate" / "r.pid").read_text())["pid"], signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass
    if (i.pool / "daemon.json").exists():
        i.cli("stop", "--force", check=False, timeout=60)


def pending_block(inst: Instant) -> int:
    """The last block the backup stores: the copy takes it last (a rate-limited copy
    is far from it in the test's first seconds)."""
    import numpy as np
    with np.load(inst.pool / "hydrate" / "r.runs") as z:
        starts, counts = z["starts"], z["counts"]
    return int(starts[-1] + counts[-1] - 1)      # the last stored block: copied last


def test_s3_endpoint_down_mid_hydration(s3_inst, tmp_path):
    """The S3 endpoint stops answering mid-hydration: a read of a block not local yet is
    EIO, with one clear line in the daemon's log however many reads fail; writes go on
    (whole blocks, and blocks already local) and are kept; hydration resumes when the
    endpoint is back, and the volume ends equal to the model, the bucket unchanged."""
    inst = s3_inst
    model = bytearray(export(inst.pool, "v@s1", tmp_path / "want.img"))
    before = s3_objects(inst.server, inst.bucket)
    inst.serve()
    inst.create("r", "--hydrate-rate", "128K")
    bs = 64 << 10
    last = pending_block(inst)
    with open(inst.image(), "rb", buffering=0) as f:
        assert os.pread(f.fileno(), 4096, 0) == model[:4096]          # read on demand, endpoint up
    inst.proxy.stop()
    fd = os.open(inst.image(), os.O_RDWR)
    try:
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, last * bs)
            assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == model[:4096]                  # local already: still reads
        whole = random.Random(9).randbytes(bs)                        # a whole pending block: no fetch
        assert os.pwrite(fd, whole, (last - 1) * bs) == bs
        model[(last - 1) * bs:last * bs] = whole
        assert os.pwrite(fd, b"kept", 100) == 4                       # a block already local
        model[100:104] = b"kept"
        with pytest.raises(OSError) as e:                             # part of a pending block needs it
            os.pwrite(fd, b"x", last * bs + 10)
        assert e.value.errno == errno.EIO
        os.fsync(fd)
    finally:
        os.close(fd)
    lines = [ln for ln in inst.daemon_log().splitlines() if "cannot be read from backup" in ln]
    assert len(lines) == 1, lines
    assert f"block {last}" in lines[0] and "EIO" in lines[0]
    assert inst.hydration()["state"] == "hydrating"
    time.sleep(3)                                                     # the copy meets the outage too
    inst.proxy.start()
    assert wait_for(lambda: "resumes" in inst.hydrator_log(), 60, 0.5), inst.hydrator_log()
    assert_cli_error(inst.cli("volume", "hydrate", "r", check=False), 5, "already has a hydrator")
    inst.cli("volume", "hydrate", "r", "--stop")                      # and again without the rate limit
    inst.cli("volume", "hydrate", "r")
    done = inst.wait_hydrated()
    assert done["state"] == "done"
    assert read_image(inst.image()) == bytes(model)
    assert_clean(inst)
    assert s3_objects(inst.server, inst.bucket) == before
    log = inst.hydrator_log()
    assert log.count("hydration paused") == 1 and "Traceback" not in log, log


def test_without_a_daemon_an_incremental_backup(inst, tmp_path):
    """No daemon: the hydrator writes into the pool itself (opened a moment at a time).
    The backup is an incremental one: its blocks lie in two packs, so the copy's
    batches are not in block order (a batch must fill only its own blocks)."""
    import blocksnap
    rnd = random.Random(11)
    with blocksnap.Pool.open(str(inst.pool)) as p:
        v = p.volume("v")
        for b in range(3, 400, 37):
            v.write(b * v.block_size + 512, rnd.randbytes(3000))
        v.snapshot("s2")
    b2 = inst.b.repo.backup("v@s2", "--mode", "incremental")
    want = export(inst.pool, "v@s2", tmp_path / "want.img")
    assert want != export(inst.pool, "v@s1", tmp_path / "old.img")
    inst.cli("volume", "create", "r", "--from-backup", b2["id"])
    inst.wait_hydrated()
    inst.cli("snapshot", "create", "r@after")
    assert export(inst.pool, "r@after", tmp_path / "got.img") == want
    assert_clean(inst)


def test_bad_inputs_leave_nothing(inst, tmp_path):
    """Unknown backup, a name taken, a wrong password, a snapshot of a hydrating volume:
    one error line each, no volume, no hydration file, no hydrator."""
    inst.serve()
    res = inst.cli("volume", "create", "r", "--from-backup", "0123abcd", check=False)
    assert_cli_error(res, 3, "0123abcd")
    res = inst.cli("volume", "create", "v", "--from-backup", inst.b.id, check=False)
    assert_cli_error(res, 4, "already exists")
    res = inst.cli("volume", "create", "r", "--from-backup", inst.b.id, check=False,
                   env={"BLOCKSNAP_REPO_PASSWORD": "wrong"})
    assert_cli_error(res, 1)
    res = inst.cli("volume", "create", "r", "--from-backup", inst.b.id, "--size", "1G", check=False)
    assert_cli_error(res, 1, "--from-backup")
    names = [v["name"] for v in json.loads(inst.cli("volume", "list", "--json").stdout)]
    assert names == ["v"]
    hd = inst.pool / "hydrate"
    assert not hd.exists() or [p.name for p in hd.iterdir() if not p.name.endswith(".log")] == []
    assert subprocess.run(["pgrep", "-f", f"{inst.pool} volume create r --from-backup"],
                          capture_output=True).stdout == b""            # no hydrator (a fork of the command)
    inst.create("r", "--hydrate-rate", "64K")
    res = inst.cli("snapshot", "create", "r@s", check=False)
    assert_cli_error(res, 5, "hydrates")
    res = inst.cli("volume", "hydrate", "v", check=False)
    assert_cli_error(res, 1, "not hydrating")
    inst.cli("volume", "delete", "r")                                 # while it hydrates: its pending set goes
    assert not (inst.pool / "hydrate" / "r.runs").exists()
    assert [v["name"] for v in json.loads(inst.cli("volume", "list", "--json").stdout)] == ["v"]
