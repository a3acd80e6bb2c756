"""Real filesystems on attached volumes: snapshots, snapshot mounts, fsck, rollback,
fstrim, and kill -9 of the daemon."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from blocksnap.errors import Busy
from blocksnap.service import loopdev
from tests.conftest import assert_cli_error, run_cli

from .conftest import sh, wait_for

FS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], ["e2fsck", "-fn"]),
    "xfs": (["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"]),
}


def _mkfs(kind: str, dev: str) -> None:
    if shutil.which(FS[kind][0][0]) is None:
        pytest.skip(f"{FS[kind][0][0]} not installed")
    sh(*FS[kind][0], dev)


def _fsck(kind: str, target: str) -> None:
    res = sh(*FS[kind][1], target, check=False)
    assert res.returncode == 0, f"fsck of {target}:\n{res.stdout}\n{res.stderr}"


def _replay_log(img, where) -> None:
    dev = sh("losetup", "-f", "--show", str(img)).stdout.strip()
    try:
        sh("mount", "-o", "nouuid", dev, str(where))  # the live copy is mounted too
        sh("umount", str(where))
    finally:
        sh("losetup", "-d", dev)


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_snapshot_mount_fsck_rollback(served, kind):
    if kind == "xfs":  # xfs wants at least 300 MiB
        served.cli("volume", "resize", "vm1", "320M")
    dev = served.attach()
    _mkfs(kind, dev)
    fs = served.dir("fs")
    sh("mount", dev, str(fs))
    (fs / "keep.txt").write_text("version 1\n")
    (fs / "data.bin").write_bytes(os.urandom(3 << 20))
    # frozen: a read-only mount replays no journal/log, so the snapshot must not need one
    sh("fsfreeze", "-f", str(fs))
    try:
        served.cli("snapshot", "create", "vm1@before")  # through the socket, while mounted
    finally:
        sh("fsfreeze", "-u", str(fs))
    (fs / "keep.txt").write_text("version 2\n")
    (fs / "new.txt").write_text("after the snapshot\n")
    os.unlink(fs / "data.bin")
    sh("sync")

    snapdir = served.dir("snap")
    out = json.loads(served.cli("mount", "vm1@before", str(snapdir), "--json").stdout)
    assert out["fstype"] == kind
    assert (snapdir / "keep.txt").read_text() == "version 1\n"
    assert (snapdir / "data.bin").stat().st_size == 3 << 20
    assert not (snapdir / "new.txt").exists()
    with pytest.raises(OSError):
        (snapdir / "x").write_text("no")  # mounted read-only
    assert_cli_error(run_cli(served.pool, "snapshot", "delete", "vm1@before"), Busy.exit_code, "mounted")
    served.cli("umount", str(snapdir))
    assert loopdev.mount_at(str(snapdir)) is None
    assert loopdev.backing_file(out["device"]) is None

    # an exported snapshot of a frozen filesystem is clean
    img = served.tmp / "export.img"
    served.cli("export", "vm1@before", str(img))
    if kind == "xfs":  # freeze leaves lazy counters in the log: replay it, as a restore would
        _replay_log(img, served.dir("replay"))
    _fsck(kind, str(img))

    assert_cli_error(run_cli(served.pool, "snapshot", "rollback", "vm1@before"), Busy.exit_code, "attached")
    sh("umount", str(fs))
    served.cli("detach", "vm1")
    served.cli("snapshot", "rollback", "vm1@before")
    dev = served.attach()
    sh("mount", dev, str(fs))
    assert (fs / "keep.txt").read_text() == "version 1\n"
    assert not (fs / "new.txt").exists()
    sh("umount", str(fs))
    _fsck(kind, dev)
    served.cli("detach", dev)
    served.cli("stop")


def test_fstrim_frees_pool_space(served):
    dev = served.attach()
    _mkfs("ext4", dev)
    fs = served.dir("fs")
    sh("mount", "-o", "nodiscard", dev, str(fs))
    base = served.status()["used"]
    (fs / "big").write_bytes(os.urandom(40 << 20))
    sh("sync")
    full = served.status()["used"]
    assert full >= base + (38 << 20)
    os.unlink(fs / "big")
    sh("sync")
    sh("fstrim", str(fs))
    assert wait_for(lambda: served.status()["used"] <= base + (2 << 20), timeout=10), \
        (base, full, served.status()["used"])
    assert_cli_error(run_cli(served.pool, "stop"), Busy.exit_code, "--force")
    served.cli("stop", "--force")  # unmounts the filesystem on the device, detaches, stops
    assert loopdev.mount_at(str(fs)) is None
    assert loopdev.backing_file(dev) is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_kill9_then_reattach(served, kind):
    if kind == "xfs":
        served.cli("volume", "resize", "vm1", "320M")
    dev = served.attach()
    _mkfs(kind, dev)
    fs = served.dir("fs")
    sh("mount", dev, str(fs))
    payload = os.urandom(5 << 20)
    (fs / "synced.bin").write_bytes(payload)
    sh("sync")
    (fs / "unsynced.bin").write_bytes(os.urandom(1 << 20))  # may or may not survive
    pid = served.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    sh("umount", "-l", str(fs))

    dev2 = served.attach()  # cleans up the dead mount and device, serves again
    assert served.daemon_pid() != pid
    assert loopdev.backing_file(dev) in (None, os.path.join(served.mnt, "vm1", "volume.img"))
    stale = [d for d, f in loopdev.bound_loops().items() if f.startswith(str(served.mnt)) and d != dev2]
    assert not stale, stale
    sh("mount", dev2, str(fs))  # replays the journal
    assert (fs / "synced.bin").read_bytes() == payload
    sh("umount", str(fs))
    _fsck(kind, dev2)
    served.cli("detach", dev2)
    assert json.loads(served.cli("check", "--json").stdout)["clean"]
    served.cli("stop")


def test_sigterm_shuts_down_cleanly(served):
    dev = served.attach()
    _mkfs("ext4", dev)
    fs = served.dir("fs")
    sh("mount", dev, str(fs))
    (fs / "f.txt").write_text("written before SIGTERM\n")  # not synced: shutdown must flush
    served.cli("snapshot", "create", "vm1@s1")
    snapdir = served.dir("snap")
    served.cli("mount", "vm1@s1", str(snapdir))
    pid = served.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30)
    assert loopdev.mount_at(str(fs)) is None and loopdev.mount_at(str(snapdir)) is None
    assert loopdev.mount_at(str(served.mnt)) is None
    assert not loopdev.loops_under(str(served.mnt))
    assert not (served.pool / "daemon.sock").exists() and not (served.pool / "daemon.json").exists()
    assert "SIGTERM: shutting down" in (served.pool / "daemon.log").read_text()
    dev = served.attach()
    sh("mount", dev, str(fs))
    assert (fs / "f.txt").read_text() == "written before SIGTERM\n"
    sh("umount", str(fs))
    served.cli("stop", "--force")


def test_cow_volume_through_fuse(served):
    origin = served.tmp / "origin.img"
    origin.write_bytes(b"O" * (8 << 20))
    served.cli("volume", "create", "db", "--mode", "cow", "--origin", str(origin))
    dev = served.attach("db")
    with open(dev, "r+b", buffering=0) as f:
        f.write(b"N" * (1 << 20))
        os.fsync(f.fileno())
        served.cli("snapshot", "create", "db@s1")
        f.seek(4096)
        f.write(b"M" * 8192)
        os.fsync(f.fileno())
    snap = served.mnt / "db" / "snapshots" / "s1.img"
    with open(snap, "rb") as f:
        assert f.read(1 << 20) == b"N" * (1 << 20)
        assert f.read(1 << 20) == b"O" * (1 << 20)
    with open(origin, "rb") as f:  # the live data is in the origin, written in place
        assert f.read(4096 + 8192)[4096:] == b"M" * 8192
    served.cli("detach", "db")
    served.cli("stop")


def test_umount_after_daemon_died(served):
    dev = served.attach()
    _mkfs("ext4", dev)
    served.cli("snapshot", "create", "vm1@s1")
    snapdir = served.dir("snap")
    served.cli("mount", "vm1@s1", str(snapdir))
    os.kill(served.daemon_pid(), signal.SIGKILL)
    served.cli("umount", str(snapdir))  # from the records in daemon.json
    assert loopdev.mount_at(str(snapdir)) is None
    served.attach()  # the next daemon cleans up the rest
    served.cli("stop", "--force")
