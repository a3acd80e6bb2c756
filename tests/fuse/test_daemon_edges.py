"""Daemon edge cases found by trying to break it: mount targets that would hide the
pool, devices still used when asked to detach, cleanup after kill -9 without an
attach, and commands racing for a pool that no daemon serves yet."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

from blocksnap.errors import Busy
from blocksnap.service import loopdev
from tests.conftest import assert_cli_error, run_cli

from .conftest import sh, wait_for


def test_mount_refuses_targets_that_hide_the_pool(served):
    served.attach()
    served.cli("snapshot", "create", "vm1@s1")
    for target in (served.pool, served.tmp, served.pool / "mnt", served.pool / "mnt" / "vm1"):
        res = run_cli(served.pool, "mount", "vm1@s1", target)
        assert_cli_error(res, 1, "cannot mount on")
    res = subprocess.run([sys.executable, "-m", "blocksnap", "--pool", str(served.pool), "mount", "vm1@s1", ""],
                         cwd=served.tmp, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert loopdev.mount_at(str(served.tmp)) is None
    served.cli("pool", "status")          # the daemon is still reachable
    served.cli("stop", "--force")


def test_detach_refuses_a_device_still_in_use(served):
    dev = served.attach()
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({dev!r}, os.O_RDWR); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert_cli_error(run_cli(served.pool, "detach", "vm1"), Busy.exit_code, "is open in", f"pid {holder.pid}")
        assert_cli_error(run_cli(served.pool, "stop"), Busy.exit_code, "in use")
    finally:
        holder.kill()
        holder.wait()
    # a filesystem mounted in another mount namespace holds it too, unseen in ours
    sh("mkfs.ext4", "-q", dev)
    mnt = served.dir("elsewhere")
    ns = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount {dev} {mnt} && echo mounted && exec sleep 60"], stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
    try:
        assert ns.stdout.readline().strip() == "mounted"
        assert_cli_error(run_cli(served.pool, "detach", "vm1"), Busy.exit_code, "in use")
    finally:
        os.killpg(ns.pid, signal.SIGKILL)   # the namespace and its mount go with the last process
        ns.wait()
    assert wait_for(lambda: not loopdev.claimed(dev))
    served.cli("detach", "vm1")
    served.cli("stop")


def test_stop_force_cleans_up_after_a_killed_daemon(served):
    dev = served.attach()
    sh("mkfs.ext4", "-q", dev)
    served.cli("snapshot", "create", "vm1@s1")
    restore = served.dir("restore")
    served.cli("mount", "vm1@s1", restore)
    os.kill(served.daemon_pid(), signal.SIGKILL)
    assert wait_for(lambda: served.daemon_pid() is None or not os.path.exists(f"/proc/{served.daemon_pid()}"))
    res = served.cli("stop", "--force")
    assert "no daemon was running; cleaned up" in res.stderr, res.stderr
    assert loopdev.mount_at(str(restore)) is None
    assert loopdev.mount_at(str(served.pool / "mnt")) is None
    assert loopdev.backing_file(dev) is None or "vm1" not in (loopdev.backing_file(dev) or "")
    assert "nothing to clean up" in served.cli("stop", "--force").stderr
    served.attach()                        # serves again
    served.cli("stop", "--force")


def test_commands_racing_for_an_unserved_pool_wait_their_turn(served):
    served.cli("volume", "create", "vm2", "--size", "16M")
    procs = [subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(served.pool), "attach", v],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("vm1", "vm2")]
    procs += [subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(served.pool), "volume", "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    t = time.monotonic()
    outs = [(p.wait(90), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in outs), outs
    assert outs[0][1].startswith("/dev/loop") and outs[1][1].startswith("/dev/loop")
    assert time.monotonic() - t < 60
    served.cli("stop", "--force")


def test_tree_changes_are_refused_with_eperm(served):
    served.cli("serve", str(served.mnt))
    img = served.mnt / "vm1" / "volume.img"
    for what, fn in (("unlink", lambda: os.unlink(img)), ("mkdir", lambda: os.mkdir(served.mnt / "x")),
                     ("create", lambda: open(served.mnt / "vm1" / "new.img", "w")),
                     ("rename", lambda: os.rename(img, served.mnt / "vm1" / "other.img")),
                     ("rmdir", lambda: os.rmdir(served.mnt / "vm1" / "snapshots"))):
        try:
            fn()
        except OSError as e:
            assert e.errno == errno.EPERM, (what, e)
        else:
            raise AssertionError(f"{what} was allowed")
    with open(img, "r+b") as f:      # the image itself still opens read-write
        f.write(b"x")
    served.cli("stop")


def test_progress_comes_through_the_daemon(served, tmp_path):
    from tests.cli.test_cli import _run_with_tty_stderr
    with open(served.pool / "x", "wb") as f:   # (just a file of random bytes to import)
        f.write(os.urandom(24 << 20))
    served.attach()                             # served from here on
    code, out, tty = _run_with_tty_stderr(served.pool, "volume", "import", "img", served.pool / "x")
    assert code == 0, (out, tty)
    served.cli("snapshot", "create", "img@s")
    code, out, tty = _run_with_tty_stderr(served.pool, "export", "img@s", tmp_path / "out.img")
    assert code == 0 and out.decode().startswith("exported img@s"), (out, tty)
    # the bar's byte counts only move when the daemon reports: 25.2 MB is the total
    assert b"25.2/25.2 MB" in tty, tty[-400:]
    served.cli("stop", "--force")


def test_a_stuck_daemon_does_not_hang_quick_commands(served):
    served.attach()
    pid = served.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        res = run_cli(served.pool, "pool", "status", env={"BLOCKSNAP_DAEMON_TIMEOUT": "2"}, timeout=60)
        assert_cli_error(res, Busy.exit_code, "did not answer", "stop --force")
        assert time.monotonic() - t < 30
    finally:
        os.kill(pid, signal.SIGCONT)
    served.cli("pool", "status")
    served.cli("stop", "--force")


def test_the_daemon_refuses_operations_it_does_not_list(served):
    """Only the listed operations are callable over the socket: a module-level name of
    service.ops that is not in its table, or a made-up one, gets UnknownOperation."""
    import socket

    from blocksnap.errors import UnknownOperation
    from blocksnap.service import control

    served.attach()
    for op in ("stream_file", "Pool", "_snap", "format_disk", "volume_list "):
        with control.connect(str(served.pool), timeout=30) as sock:
            try:
                control.request(sock, op, {})
            except UnknownOperation as e:
                assert "offers no operation" in str(e) and "volume_list" in str(e)
            else:
                raise AssertionError(f"{op!r} was accepted")
    # the listed ones still answer; a raw request gets the error class by name
    with control.connect(str(served.pool), timeout=30) as sock:
        assert [v["name"] for v in control.request(sock, "volume_list", {})] == ["vm1"]
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(served.pool / control.SOCKET_NAME))
        raw.sendall(b'{"op": "rm_rf", "args": {}}\n')
        resp = raw.makefile("rb").readline()
    assert b'"UnknownOperation"' in resp
    served.cli("stop", "--force")
