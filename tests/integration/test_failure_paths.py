"""Failure paths of `snapshot create` / `freeze` through the real CLI, on filesystems
that live on FUSE-attached blocksnap volumes: a hook timeout, a lock held by another
session, a database that is down, bad DSNs, kill -9 while frozen. Each must end with one
`error:` line (or, for kill -9, nothing at all), no snapshot, and nothing left frozen or
locked: a write to the filesystem completes promptly and the database takes writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import (
    MariaDB,
    PgServer,
    Sql,
    assert_fs_writable,
    assert_one_error,
    kill_pid,
    mariadb_writable,
    needs_mariadb,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _frozen_entries(runtime_dir) -> list:
    p = runtime_dir / "frozen.json"
    return json.loads(p.read_text())["entries"] if p.exists() else []


def _assert_nothing_left(stack, mnt, runtime_dir, volume: str = "vol", snapshots=()) -> None:
    assert stack.snapshots(volume) == list(snapshots)
    assert_fs_writable(mnt)
    assert _frozen_entries(runtime_dir) == []
    # the daemon is fine and the pool clean
    assert stack.cli_json("check")["clean"]


def _gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def _writer_blocked(mnt) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", f"echo data > '{mnt}/during-freeze'"])


def _stalled_snapshot(stack, ref: str, *args: str) -> subprocess.Popen:
    """`snapshot create REF ARGS` that stalls inside the frozen window, just before the
    snapshot request (stalled_cli.py); returns once it is there."""
    ready = stack.base / f"stalled-{ref.replace('@', '-')}"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("stalled_cli.py")), "--pool", str(stack.pool),
         "snapshot", "create", ref, *args],
        env={**os.environ, "BLOCKSNAP_TEST_STALL_READY": str(ready)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.on_cleanup(f"stalled snapshot create {ref}", lambda: (proc.poll() is None and proc.kill(), proc.wait()))
    wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the snapshot request")
    if not ready.exists():
        _, err = proc.communicate()
        raise AssertionError(f"snapshot create ended before its snapshot request: {err}")
    assert int(ready.read_text()) == proc.pid
    return proc


# ------------------------------------------------------------------ generic hooks

def test_pre_hook_timeout(stack, runtime_dir):
    mnt = stack.volume_fs("vol", "256M")
    hook_pid = stack.base / "hook.pid"
    t0 = time.monotonic()
    res = stack.cli("snapshot", "create", "vol@h1", "--freeze", str(mnt),
                    "--pre", f"sh -c 'echo $$ > {hook_pid}; exec sleep 30'", "--freeze-timeout", "2",
                    check=False)
    took = time.monotonic() - t0
    line = assert_one_error(res, "aborted")
    assert "timeout" in line.lower() or "timed out" in line.lower(), line
    assert took < 15, took
    _assert_nothing_left(stack, mnt, runtime_dir)
    # the hook was killed (with its process group), not left running
    pid = int(hook_pid.read_text())
    stack.on_cleanup("pre hook", lambda: kill_pid(pid))
    wait_for(lambda: _gone(pid), 5, "the hook to be killed")
    # and a snapshot with the same name works afterwards
    stack.cli("snapshot", "create", "vol@h1", "--freeze", str(mnt), "--pre", "true")
    assert stack.show("vol@h1")["consistency"] == "filesystem"


# ------------------------------------------------------------------ MariaDB: locks, kill -9

def test_mariadb_lock_held_and_kill9(stack, runtime_dir):
    needs_mariadb()
    mnt = stack.volume_fs("vol", "1G")
    db = MariaDB(stack, mnt / "mysql", "my1")
    db.install()
    db.start()
    c = db.connect()
    with c.cursor() as cur:
        cur.execute("CREATE DATABASE app")
        cur.execute("CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB")
        cur.execute("CREATE TABLE app.u (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB")
        cur.execute("CREATE TABLE app.m (v INT) ENGINE=MyISAM")
    c.close()

    # 1. another session holds LOCK TABLES ... WRITE: the lock is not granted in time
    holder = db.connect()
    with holder.cursor() as cur:
        cur.execute("LOCK TABLES app.t WRITE")
    t0 = time.monotonic()
    res = stack.cli("snapshot", "create", "vol@l1", "--freeze", str(mnt), "--mysql", db.url,
                    "--freeze-timeout", "2", check=False)
    took = time.monotonic() - t0
    assert_one_error(res, "not granted", "aborted")
    assert took < 12, took
    _assert_nothing_left(stack, mnt, runtime_dir)
    assert mariadb_writable(db), "the server was left read-only"
    with holder.cursor() as cur:
        cur.execute("UNLOCK TABLES")
    holder.close()
    assert mariadb_writable(db, "INSERT INTO app.t (v) VALUES (1)")

    # 2. a long non-transactional write (MyISAM INSERT ... SELECT SLEEP) is running
    long_conn = db.connect()
    long_q = Sql(long_conn, "INSERT INTO app.m SELECT SLEEP(4)")
    long_q.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    res = stack.cli("snapshot", "create", "vol@l2", "--freeze", str(mnt), "--mysql", db.url,
                    "--freeze-timeout", "1.5", check=False)
    assert_one_error(res, "not granted")
    assert time.monotonic() - t0 < 12
    _assert_nothing_left(stack, mnt, runtime_dir)
    assert mariadb_writable(db), "InnoDB commits blocked after the aborted snapshot"
    long_q.join(20)
    long_conn.close()

    # 3. kill -9 of `blocksnap snapshot create` while it holds BACKUP STAGE BLOCK_COMMIT
    #    and the filesystem frozen: the watchdog thaws at once, the server drops the dead
    #    session's locks, no snapshot exists, the next run cleans the record up
    proc = _stalled_snapshot(stack, "vol@k9", "--freeze", str(mnt), "--mysql", db.url,
                             "--freeze-timeout", "30")
    w = _writer_blocked(mnt)
    time.sleep(0.5)
    assert w.poll() is None, "the filesystem was not frozen before the snapshot request"
    assert not mariadb_writable(db, within=0.5), "commits were not blocked before the snapshot request"
    t0 = time.monotonic()
    proc.kill()
    proc.wait()
    w.wait(timeout=10)  # thawed by the watchdog as soon as its parent is gone
    assert time.monotonic() - t0 < 3, "not thawed promptly after kill -9"
    assert mariadb_writable(db)
    assert [e["pid"] for e in _frozen_entries(runtime_dir)] == [proc.pid]
    _assert_nothing_left(stack, mnt, runtime_dir)  # its CLI calls drop the dead record
    n = db.query("SELECT COUNT(*) FROM app.u")[0][0]
    assert n >= 2
    db.stop()


# ------------------------------------------------------------------ PostgreSQL down, bad DSNs

def test_postgres_down_then_kill9_in_backup_mode(stack, runtime_dir):
    mnt = stack.volume_fs("vol", "512M")
    pg = PgServer(stack, mnt / "pg" / "data", "pg1", 54393)
    pg.initdb()
    pg.start()
    pg.execute("CREATE TABLE t (x int)")
    pg.stop("fast")

    # the database is down: one error line, abort hooks run, nothing frozen
    post = stack.base / "post-ran"
    t0 = time.monotonic()
    res = stack.cli("snapshot", "create", "vol@d1", "--freeze", str(mnt), "--pg", pg.dsn,
                    "--post", f"touch {post}", "--freeze-timeout", "5", check=False)
    assert_one_error(res, "cannot connect", "aborted")
    assert time.monotonic() - t0 < 15
    assert post.exists(), "the abort hooks did not run"
    _assert_nothing_left(stack, mnt, runtime_dir)
    pg.start()  # nothing was left behind on its filesystem
    pg.execute("INSERT INTO t VALUES (1)")

    # kill -9 of `snapshot create --pg-mode backup` inside the frozen window, with the
    # backup started on its session: the backup dies with the session, nothing stays frozen.
    # (Watch from a session opened beforehand: a new backend writes to the frozen filesystem
    # while it starts, so it would wait for the thaw.)
    mon = pg.connect()
    proc = _stalled_snapshot(stack, "vol@d2", "--freeze", str(mnt), "--pg", pg.dsn,
                             "--pg-mode", "backup", "--freeze-timeout", "30")
    queries = [q for (q,) in mon.execute("SELECT query FROM pg_stat_activity"
                                         " WHERE application_name = 'blocksnap-freeze'").fetchall()]
    mon.close()
    assert len(queries) == 2, queries  # its held session (in backup mode) and its control one
    proc.kill()
    proc.wait()
    assert_fs_writable(mnt)
    wait_for(lambda: pg.query("SELECT count(*) FROM pg_stat_activity"
                              " WHERE application_name = 'blocksnap-freeze'")[0][0] == 0, 10,
             "the dead CLI's sessions to end")
    _assert_nothing_left(stack, mnt, runtime_dir)
    pg.execute("INSERT INTO t VALUES (2)")
    assert pg.query("SELECT count(*) FROM t") == [(2,)]

    # and then both modes work again
    stack.cli("snapshot", "create", "vol@d3", "--freeze", str(mnt), "--pg", pg.dsn, "--pg-mode", "backup")
    stack.cli("snapshot", "create", "vol@d4", "--freeze", str(mnt), "--pg", pg.dsn)
    assert [stack.show(f"vol@{n}")["consistency"] for n in ("d3", "d4")] == ["application"] * 2
    assert stack.snapshots("vol") == ["d3", "d4"]
    pg.stop("fast")


BAD_DSNS = [
    # refused before anything runs (not even the pre hook)
    ("--pg", "host='/tmp dbname=x password=Hunter2pw", ["invalid"]),             # unterminated quote
    ("--pg", "nosuchkey=1 password=Hunter2pw", ["invalid"]),                     # unknown keyword
    ("--mysql", "mysql://root:Hunter2pw@localhost:notaport/", ["invalid"]),
    ("--mysql", "postgresql://root:Hunter2pw@localhost/", ["invalid"]),          # wrong scheme
    # well-formed, but nothing listens there: the pre hook ran, the abort hooks run
    ("--pg", "host=/nonexistent/dir dbname=x password=Hunter2pw", ["cannot connect", "aborted"]),
    ("--mysql", "mysql://root:Hunter2pw@localhost/?unix_socket=/nonexistent/m.sock",
     ["cannot connect", "aborted"]),
]


def test_bad_dsn(stack, runtime_dir):
    mnt = stack.volume_fs("vol", "128M")
    for option, dsn, needles in BAD_DSNS:
        pre, post = stack.base / "pre-ran", stack.base / "post-ran"
        res = stack.cli("snapshot", "create", "vol@b1", "--freeze", str(mnt), option, dsn,
                        "--pre", f"touch {pre}", "--post", f"touch {post}", "--freeze-timeout", "5",
                        check=False)
        line = assert_one_error(res, *needles)
        assert "Hunter2pw" not in res.stderr + res.stdout, line
        syntax_error = needles == ["invalid"]
        assert pre.exists() == (not syntax_error) and post.exists() == (not syntax_error), (dsn, line)
        pre.unlink(missing_ok=True)
        post.unlink(missing_ok=True)
        assert_fs_writable(mnt)
    _assert_nothing_left(stack, mnt, runtime_dir)


# ------------------------------------------------------------------ kill -9 while frozen

def test_kill9_of_freeze_cli_on_fuse_fs(stack, runtime_dir):
    """`blocksnap freeze --fs` on a filesystem served by the pool's own FUSE daemon,
    killed with SIGKILL while frozen: the watchdog thaws it at once; the daemon (which
    serves the frozen filesystem's device) is unaffected; snapshots work afterwards."""
    mnt = stack.volume_fs("vol", "256M")
    (mnt / "before").write_text("before\n")
    ready = stack.base / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blocksnap", "freeze", "--fs", str(mnt), "--timeout", "30", "--",
         "sh", "-c", f"echo $$ > {ready}.tmp && mv {ready}.tmp {ready}; exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stack.on_cleanup("freeze CLI", lambda: (proc.poll() is None and proc.kill(), proc.wait()))
    wait_for(ready.exists, 30, "the frozen command to start")
    cmd_pid = int(ready.read_text())
    stack.on_cleanup("frozen command", lambda: kill_pid(cmd_pid))
    assert [e["pid"] for e in _frozen_entries(runtime_dir)] == [proc.pid]

    w = _writer_blocked(mnt)
    time.sleep(0.5)
    assert w.poll() is None, "the filesystem was not frozen while the command ran"
    # while frozen, the daemon still answers (nothing it does needs the frozen filesystem)
    stack.cli("snapshot", "create", "vol@while-frozen", timeout=20)
    t0 = time.monotonic()
    proc.kill()
    proc.wait()
    w.wait(timeout=10)
    assert time.monotonic() - t0 < 3, "not thawed promptly after kill -9"
    assert w.returncode == 0
    assert_fs_writable(mnt)
    kill_pid(cmd_pid)

    # the record of the dead process is dropped by the next blocksnap command
    stack.cli("snapshot", "create", "vol@after", "--freeze", str(mnt))
    assert _frozen_entries(runtime_dir) == []
    assert stack.show("vol@after")["consistency"] == "filesystem"
    # the snapshot taken while frozen is a clean filesystem (crash-consistent label: no hooks)
    assert stack.show("vol@while-frozen")["consistency"] == "crash"
    snapdir = stack.dir("snap")
    stack.cli("mount", "vol@while-frozen", str(snapdir))
    assert (snapdir / "before").read_text() == "before\n"
    assert not (snapdir / "during-freeze").exists()
    stack.cli("umount", str(snapdir))
