"""The daemon and its control socket: tree, live listing, refusals, security."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import tempfile

import pytest

from blocksnap.errors import Busy, NotFound
from blocksnap.service import loopdev
from blocksnap.service.control import NOT_RUNNING, try_remote
from tests.conftest import assert_cli_error, run_cli

from .conftest import sh, wait_for

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def test_tree_io_and_live_listing(served):
    served.cli("serve", str(served.mnt))
    img = served.mnt / "vm1" / "volume.img"
    assert sorted(os.listdir(served.mnt)) == ["vm1"]
    assert sorted(os.listdir(served.mnt / "vm1")) == ["snapshots", "volume.img"]
    assert img.stat().st_size == 128 << 20
    assert stat.S_IMODE(img.stat().st_mode) == 0o600
    assert stat.S_IMODE(served.mnt.stat().st_mode) == 0o700

    fd = os.open(img, os.O_RDWR)
    try:
        os.pwrite(fd, b"A" * (1 << 20), 0)
        os.pwrite(fd, b"odd", 12345)  # unaligned write
        os.fsync(fd)
        served.cli("snapshot", "create", "vm1@s1")  # through the socket, volume open
        assert wait_for(lambda: os.listdir(served.mnt / "vm1" / "snapshots") == ["s1.img"])
        os.pwrite(fd, b"B" * 4096, 0)
        # punch a hole (discard) and zero a range: both read back as zeros
        assert _libc.fallocate(fd, 0x02 | 0x01, 1 << 19, 1 << 18) == 0
        assert _libc.fallocate(fd, 0x10, 8192, 4096) == 0
        os.fsync(fd)
        data = os.pread(fd, 1 << 20, 0)
        assert data[:4096] == b"B" * 4096
        assert data[8192:12288] == bytes(4096)
        assert data[1 << 19:(1 << 19) + (1 << 18)] == bytes(1 << 18)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 1 << 20)
        assert e.value.errno == errno.EPERM
    finally:
        os.close(fd)

    snap = served.mnt / "vm1" / "snapshots" / "s1.img"
    with open(snap, "rb") as f:
        old = f.read(1 << 20)
    assert old[:12345] == b"A" * 12345 and old[12345:12348] == b"odd"
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(snap, flags)
        assert e.value.errno in (errno.EROFS, errno.EACCES)

    diff = json.loads(served.cli("snapshot", "diff", "vm1@s1", "--json").stdout)
    assert diff["changed_bytes"] > 0
    listed = json.loads(served.cli("snapshot", "list", "--json").stdout)
    assert [s["ref"] for s in listed] == ["vm1@s1"]
    served.cli("snapshot", "delete", "vm1@s1")
    assert wait_for(lambda: os.listdir(served.mnt / "vm1" / "snapshots") == [])
    served.cli("volume", "create", "vm2", "--size", "4M")
    assert wait_for(lambda: sorted(os.listdir(served.mnt)) == ["vm1", "vm2"])
    served.cli("stop")
    assert not (served.pool / "daemon.sock").exists()
    assert loopdev.mount_at(str(served.mnt)) is None
    assert "stopped" in (served.pool / "daemon.log").read_text()


def test_socket_security_and_second_serve(served):
    served.cli("serve", str(served.mnt))
    sock = served.pool / "daemon.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    res = run_cli(served.pool, "serve", str(served.tmp / "other"))
    assert_cli_error(res, Busy.exit_code, "already served")

    # another user: the file mode stops them; even with the mode opened (and a hard link
    # where they can reach it), SO_PEERCRED does
    pub = tempfile.mkdtemp(dir="/tmp")  # reachable by nobody, same filesystem
    os.chmod(pub, 0o755)
    link = os.path.join(pub, "sock")
    os.link(sock, link)
    os.chmod(link, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody and try the socket
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.connect(link)
            s.sendall(b'{"op": "pool_status", "args": {}}\n')
            os.write(w, s.makefile("rb").readline() or b"closed")
        except BaseException as e:  # noqa: BLE001
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 65536)
    os.waitpid(pid, 0)
    os.chmod(sock, 0o600)
    shutil.rmtree(pub)
    assert b"permission denied" in got and b'"ok"' not in got, got


def test_refusals(served):
    res = run_cli(served.pool, "attach", "nosuch")
    assert_cli_error(res, NotFound.exit_code, "no volume")
    dev = served.attach()
    assert_cli_error(run_cli(served.pool, "attach", "vm1"), Busy.exit_code, "already attached")
    assert_cli_error(run_cli(served.pool, "mount", "vm1@nosuch", str(served.dir("m"))), NotFound.exit_code,
                     "no snapshot")
    assert_cli_error(run_cli(served.pool, "stop"), Busy.exit_code, "detach")
    assert_cli_error(run_cli(served.pool, "serve", str(served.tmp / "x")), Busy.exit_code, "already served")
    served.cli("snapshot", "create", "vm1@s1")
    for args, needle in ((("snapshot", "rollback", "vm1@s1"), "attached"),
                         (("volume", "delete", "vm1", "-r"), "attached"),
                         (("volume", "resize", "vm1", "256M"), "attached")):
        assert_cli_error(run_cli(served.pool, *args), Busy.exit_code, needle)
    assert_cli_error(run_cli(served.pool, "detach", "vm2"), NotFound.exit_code, "not attached")
    assert_cli_error(run_cli(served.pool, "umount", str(served.dir("m"))), NotFound.exit_code, "not a snapshot")
    served.cli("detach", dev)
    served.cli("snapshot", "rollback", "vm1@s1")
    served.cli("stop")
    # without a daemon, the commands that need one say so
    assert_cli_error(run_cli(served.pool, "detach", "vm1"), 1, "no daemon")


def test_stale_socket_means_no_daemon(served):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(served.pool / "daemon.sock"))
    s.close()  # a socket file nobody listens on, as a killed daemon leaves it
    assert try_remote(str(served.pool), "pool_status", {}) is NOT_RUNNING
    out = json.loads(served.cli("volume", "list", "--json").stdout)
    assert [v["name"] for v in out] == ["vm1"]


def test_read_only(served):
    served.cli("serve", str(served.mnt), "--read-only")
    img = served.mnt / "vm1" / "volume.img"
    assert stat.S_IMODE(img.stat().st_mode) == 0o400
    with pytest.raises(OSError) as e:
        os.open(img, os.O_RDWR)
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    assert_cli_error(run_cli(served.pool, "attach", "vm1"), 1, "read-only")
    dev = served.attach("vm1", "--read-only")
    assert sh("blockdev", "--getro", dev).stdout.strip() == "1"
    res = sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=1", "oflag=direct", check=False)
    assert res.returncode != 0
    served.cli("detach", "vm1")
    served.cli("stop")


def test_read_only_loop_on_rw_daemon(served):
    dev = served.attach("vm1", "--read-only")
    assert sh("blockdev", "--getro", dev).stdout.strip() == "1"
    res = sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=1", "oflag=direct", check=False)
    assert res.returncode != 0
    served.cli("detach", dev)
    served.cli("stop")
