"""Filesystem freeze on a real ext4 loop device, and every layer of the thaw guarantee:
try/finally, signals, the deadline thread, the watchdog process (kill -9, SIGSTOP) and
the frozen.json record re-thawed by recover_stale_freezes()."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from blocksnap.hooks import FreezePlan, HookError, current_deadline, recover_stale_freezes, run_frozen

from .conftest import (
    assert_one_error_line,
    assert_thawed,
    blocked,
    cli_argv,
    needs_root,
    run_freeze,
    start_writer,
    thaw,
    wait_done,
)

pytestmark = needs_root

FIFREEZE = 0xC0045877


def state_entries(runtime_dir: Path) -> list[dict]:
    p = runtime_dir / "frozen.json"
    return json.loads(p.read_text())["entries"] if p.exists() else []


def wait_for(pred, within: float, what: str) -> None:
    end = time.monotonic() + within
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_write_blocks_during_action_and_completes_after(fs, runtime_dir):
    seen = {}

    def action():
        w = start_writer(fs / "during")
        seen["blocked"] = blocked(w, 0.5)
        seen["writer"] = w
        seen["deadline"] = current_deadline()
        seen["state"] = state_entries(runtime_dir)
        return "snap-1"

    rec = run_frozen(FreezePlan(fs=[str(fs)], volume="vm1", snapshot="s1"), action)
    assert seen["blocked"], "a write from another process went through while frozen"
    wait_done(seen["writer"], 5)  # thawed: the blocked write finishes
    assert (fs / "during").read_text() == "data\n"
    assert_thawed(fs)
    json.dumps(rec)
    assert rec["consistency"] == "filesystem" and rec["result"] == "snap-1" and rec["errors"] == []
    (h,) = rec["hooks"]
    assert h["kind"] == "fs" and h["target"] == str(fs) and h["status"] == "ok" and h["fstype"] == "ext4"
    assert 400 <= rec["freeze_ms"] < 5000
    assert seen["deadline"] and abs(seen["deadline"] - (time.time() + 10)) < 15
    # the record of frozen mounts existed while frozen, in the runtime dir, and is gone now
    assert [m["path"] for m in seen["state"][0]["mounts"]] == [str(fs)]
    assert seen["state"][0]["pid"] == os.getpid()
    assert state_entries(runtime_dir) == []


def test_freeze_window_is_short(fs):
    rec = run_frozen(FreezePlan(fs=[str(fs)]), lambda: None)
    assert rec["consistency"] == "filesystem"
    assert rec["freeze_ms"] < 1000, rec["freeze_ms"]  # target is < 100 ms; lenient for loaded CI


def test_same_filesystem_twice_is_frozen_once(fs):
    rec = run_frozen(FreezePlan(fs=[str(fs), str(fs) + "/"]), lambda: None)
    assert rec["consistency"] == "filesystem"
    assert [h["status"] for h in rec["hooks"]] == ["ok", "ok"]
    assert rec["hooks"][1]["same_filesystem_as"] == str(fs)


def test_not_a_mountpoint(fs, tmp_path):
    (fs / "sub").mkdir(exist_ok=True)
    for bad, why in ((fs / "sub", "not a mountpoint"), (tmp_path / "nope", "no such directory")):
        with pytest.raises(HookError) as ei:
            run_frozen(FreezePlan(fs=[str(bad)]), lambda: None)
        assert why in str(ei.value)


def test_unsupported_filesystem(tmp_path):
    # /dev/shm is a tmpfs: no FIFREEZE
    if not os.path.ismount("/dev/shm"):
        pytest.skip("no /dev/shm mount")
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(fs=["/dev/shm"]), lambda: None)
    assert "does not support freezing" in str(ei.value)


def test_already_frozen_by_someone_else_is_left_alone(fs):
    fd = os.open(fs, os.O_RDONLY)
    fcntl.ioctl(fd, FIFREEZE, 0)
    try:
        with pytest.raises(HookError) as ei:
            run_frozen(FreezePlan(fs=[str(fs)]), lambda: None)
        assert "already frozen" in str(ei.value)
        assert thaw(fs), "blocksnap thawed a freeze it did not make"
    finally:
        os.close(fd)


def test_action_exception_thaws_and_runs_abort_hooks(fs, tmp_path):
    log = tmp_path / "abort.log"

    def action():
        raise RuntimeError("engine exploded")

    with pytest.raises(RuntimeError):
        run_frozen(FreezePlan(fs=[str(fs)], post=[f"sh -c 'echo $BLOCKSNAP_PHASE:$BLOCKSNAP_MOUNTPOINTS >> {log}'"]),
                   action)
    assert log.read_text() == f"abort:{fs}\n"
    assert_thawed(fs)


def test_runtime_dir_on_the_frozen_fs_is_refused(fs, monkeypatch):
    monkeypatch.setenv("BLOCKSNAP_RUNTIME_DIR", str(fs / "run"))
    ran = []
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(fs=[str(fs)]), lambda: ran.append(1))
    assert "runtime directory" in str(ei.value) and ran == []
    assert_thawed(fs)


def test_deadline_thread_thaws_a_hanging_action(fs):
    """The action overruns: the filesystem is thawed at the deadline while it still runs."""
    seen = {}

    def action():
        time.sleep(1.4)  # timeout is 1 s
        w = start_writer(fs / "late")
        seen["blocked"] = blocked(w, 0.3)
        w.wait(5)
        return "late"

    t0 = time.monotonic()
    rec = run_frozen(FreezePlan(fs=[str(fs)], timeout=1), action)
    assert time.monotonic() - t0 < 5
    assert seen["blocked"] is False  # already thawed at 1.4 s
    assert rec["consistency"] == "crash" and rec["result"] == "late"
    assert rec["errors"] and "timeout" in rec["errors"][0]
    assert rec["hooks"][0]["status"] == "timeout"


def plant_stale_record(runtime_dir, ident: str, pid: int, fs, dev: int) -> None:
    """frozen.json as a blocksnap killed while `fs` was frozen would have left it."""
    (runtime_dir / "frozen.json").write_text(json.dumps({"version": 1, "entries": [
        {"id": ident, "pid": pid, "start_time": 1, "deadline": time.time() + 30,
         "mounts": [{"path": str(fs), "dev": dev}]}]}))


def test_stale_record_is_rethawed(fs, runtime_dir):
    """A dead blocksnap left a frozen fs and its frozen.json entry: recovery thaws it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    fd = os.open(fs, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        runtime_dir.mkdir(exist_ok=True)
        plant_stale_record(runtime_dir, "x", dead.pid, fs, os.fstat(fd).st_dev)
        w = start_writer(fs / "stale")
        assert blocked(w, 0.3)
        res = recover_stale_freezes()
        assert res == [{"path": str(fs), "pid": dead.pid, "status": "thawed"}]
        wait_done(w, 5)
        assert state_entries(runtime_dir) == []
    finally:
        os.close(fd)


def test_stale_record_of_a_live_process_is_kept(fs, runtime_dir):
    runtime_dir.mkdir(exist_ok=True)
    entry = {"id": "y", "pid": os.getpid(), "start_time": None, "deadline": time.time() + 30,
             "mounts": [{"path": str(fs), "dev": os.stat(fs).st_dev}]}
    (runtime_dir / "frozen.json").write_text(json.dumps({"version": 1, "entries": [entry]}))
    assert recover_stale_freezes() == []
    assert state_entries(runtime_dir) == [entry]
    (runtime_dir / "frozen.json").unlink()


# ------------------------------------------------------------------ the CLI process

def _start_cli(fs: Path, tmp_path: Path, timeout: float, env: dict) -> tuple[subprocess.Popen, Path]:
    pidfile = tmp_path / "cmd.pid"
    argv = cli_argv("freeze", "--fs", str(fs), "--timeout", str(timeout), "--json", "--",
                    "sh", "-c", f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 30")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    wait_for(pidfile.exists, 20, "the command to start")
    return proc, pidfile


def _kill_cmd(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def test_cli_freeze_json(fs):
    res = run_freeze("--fs", str(fs), "--json", "--", "sh", "-c", "exit 3")
    assert res.returncode == 3, res.stderr
    rec = json.loads(res.stdout)
    assert rec["consistency"] == "filesystem" and rec["result"]["exit_code"] == 3
    assert rec["hooks"][0]["target"] == str(fs)


def test_cli_kill9_leaves_fs_thawed(fs, tmp_path, runtime_dir):
    proc, pidfile = _start_cli(fs, tmp_path, 20, {"BLOCKSNAP_RUNTIME_DIR": str(runtime_dir)})
    try:
        w = start_writer(fs / "k9")
        assert blocked(w, 0.3), "not frozen while COMMAND runs"
        proc.kill()  # kill -9 of the CLI: no finally, no signal handler
        proc.wait()
        took = wait_done(w, 5)  # the watchdog thaws as soon as its parent is gone
        assert took < 2, took
        assert_thawed(fs)
        # the record of the dead process is cleaned up at the next start
        assert [e["pid"] for e in state_entries(runtime_dir)] == [proc.pid]
        assert recover_stale_freezes() == [{"path": str(fs), "pid": proc.pid, "status": "not-frozen"}]
        assert state_entries(runtime_dir) == []
    finally:
        _kill_cmd(pidfile)


def test_cli_stopped_process_is_thawed_by_watchdog_at_deadline(fs, tmp_path, runtime_dir):
    proc, pidfile = _start_cli(fs, tmp_path, 1.5, {"BLOCKSNAP_RUNTIME_DIR": str(runtime_dir)})
    try:
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)  # neither the finally nor the deadline thread can run
        w = start_writer(fs / "stop")
        wait_done(w, 5)
        assert time.monotonic() - t0 < 3
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 124, err
        rec = json.loads(out)
        assert rec["consistency"] == "crash"
        assert any("watchdog" in e for e in rec["errors"]), rec["errors"]
    finally:
        _kill_cmd(pidfile)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_signal_thaws_and_kills_command(fs, tmp_path, runtime_dir, sig):
    proc, pidfile = _start_cli(fs, tmp_path, 20, {"BLOCKSNAP_RUNTIME_DIR": str(runtime_dir)})
    cmd_pid = int(pidfile.read_text())
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 1
        assert err.strip().splitlines()[-1] == \
            f"error: interrupted by {sig.name}; snapshot aborted, nothing left frozen or locked"
        assert json.loads(out)["aborted"] is True
        assert_thawed(fs)
        wait_for(lambda: not os.path.exists(f"/proc/{cmd_pid}") or
                 open(f"/proc/{cmd_pid}/stat").read().split(") ")[1][0] == "Z", 5, "COMMAND to be killed")
        assert state_entries(runtime_dir) == []
    finally:
        _kill_cmd(pidfile)


def test_cli_timeout_kills_command_and_thaws(fs):
    t0 = time.monotonic()
    res = run_freeze("--fs", str(fs), "--timeout", "1", "--", "sleep", "30")
    assert time.monotonic() - t0 < 6
    assert res.returncode == 124
    assert "consistency crash" in res.stderr and "killed at the deadline" in res.stderr


def test_cli_bad_dsn_nothing_frozen(fs, tmp_path):
    marker = tmp_path / "ran"
    res = run_freeze("--fs", str(fs), "--pg", "host=/nonexistent/sock dbname=x password=Hunter2pw",
                     "--", "touch", str(marker))
    line = assert_one_error_line(res, "cannot connect", "aborted")
    assert "Hunter2pw" not in line
    assert not marker.exists()
    w = start_writer(fs / "after-bad-dsn")
    wait_done(w, 2)


def test_cli_not_a_mountpoint(fs):
    (fs / "dir").mkdir(exist_ok=True)
    assert_one_error_line(run_freeze("--fs", str(fs / "dir"), "--", "true"), "not a mountpoint")


def test_from_a_worker_thread(fs):
    """The service layer may call run_frozen off the main thread (no signal handlers
    there): the freeze, the deadline thread and the watchdog still work."""
    import threading

    out = {}

    def work():
        def action():
            w = start_writer(fs / "thread")
            out["blocked"] = blocked(w, 0.3)
            out["w"] = w
            return 5
        out["rec"] = run_frozen(FreezePlan(fs=[str(fs)]), action)

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    wait_done(out["w"], 5)
    assert out["blocked"] and out["rec"]["consistency"] == "filesystem" and out["rec"]["result"] == 5


def test_cli_startup_rethaws_stale_freeze(fs, runtime_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    fd = os.open(fs, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        runtime_dir.mkdir(exist_ok=True)
        plant_stale_record(runtime_dir, "z", dead.pid, fs, os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    res = run_freeze("--", "true", env={"BLOCKSNAP_RUNTIME_DIR": str(runtime_dir)})
    assert res.returncode == 0, res.stderr
    assert f"warning: thawed {fs}, left frozen by blocksnap pid {dead.pid}" in res.stderr
    assert_thawed(fs)
