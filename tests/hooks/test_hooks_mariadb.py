"""MariaDB hooks (BACKUP STAGE) against a real MariaDB started by the fixture."""
from __future__ import annotations

import json
import time

import pytest

from blocksnap.hooks import FreezePlan, HookError, run_frozen

from .conftest import (
    Sql,
    assert_one_error_line,
    assert_thawed,
    blocked,
    needs_root,
    run_freeze,
    start_writer,
    wait_done,
)

pytestmark = [needs_root, pytest.mark.slow]


def Insert(conn, sql="INSERT INTO app.t (v) VALUES (1)") -> Sql:
    """INSERT ... (autocommit) on its own connection, in a thread (see Sql)."""
    return Sql(conn, sql)


def writable(my_conn, within: float = 2.0) -> bool:
    """True if a commit on a fresh connection completes within `within` seconds."""
    ins = Insert(my_conn())
    ins.start()
    ins.join(within)
    return ins.done_at is not None and ins.error is None


def count(my_conn) -> int:
    with my_conn().cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM app.t")
        return cur.fetchone()[0]


def test_backup_stage_blocks_commit_during_action(mariadb_server, my_conn):
    n0 = count(my_conn)
    seen = {}

    def action():
        ins = Insert(my_conn())
        ins.start()
        time.sleep(0.7)
        seen["blocked"] = ins.done_at is None
        seen["ins"] = ins
        return "snap"

    t_end = None
    rec = run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]], volume="db", snapshot="s1"), action)
    t_end = time.monotonic()
    ins = seen["ins"]
    ins.join(5)
    assert seen["blocked"], "a commit went through during BACKUP STAGE BLOCK_COMMIT"
    assert ins.error is None and ins.done_at is not None and ins.done_at <= t_end + 0.5
    assert count(my_conn) == n0 + 1
    json.dumps(rec)
    assert rec["consistency"] == "application" and rec["errors"] == [] and rec["result"] == "snap"
    (h,) = rec["hooks"]
    assert h["kind"] == "mysql" and h["flavor"] == "mariadb" and h["status"] == "ok"
    assert h["locks"] == ["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
    assert h["binlog_file"].startswith("binlog.") and h["binlog_position"] > 0
    assert "gtid_binlog_pos" in h
    assert h["target"] == mariadb_server["root_url"]
    assert rec["freeze_ms"] >= 700


def test_coordinates_match_the_binlog(mariadb_server, my_conn):
    rec = run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]]), lambda: None)
    h = rec["hooks"][0]
    with my_conn().cursor() as cur:
        cur.execute("SHOW MASTER STATUS")
        file, pos = cur.fetchone()[:2]
        cur.execute("SELECT @@gtid_binlog_pos")
        gtid = cur.fetchone()[0]
    assert (h["binlog_file"], h["binlog_position"], h["gtid_binlog_pos"]) == (file, pos, gtid)


def test_lock_tables_write_makes_freeze_fail_within_timeout(mariadb_server, my_conn):
    holder = my_conn()
    with holder.cursor() as cur:
        cur.execute("LOCK TABLES app.t WRITE")
    ran = []
    try:
        t0 = time.monotonic()
        with pytest.raises(HookError) as ei:
            run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]], timeout=1.5), lambda: ran.append(1))
        took = time.monotonic() - t0
        assert took < 4, took
        msg = str(ei.value)
        assert "not granted within" in msg and "BACKUP STAGE" in msg and "aborted" in msg, msg
        assert ran == []
        # the server is not left read-only: other tables take writes at once
        assert writable_sql(my_conn, "INSERT INTO app.m VALUES (1)")
    finally:
        with holder.cursor() as cur:
            cur.execute("UNLOCK TABLES")
    assert writable(my_conn)


def writable_sql(my_conn, sql, within=2.0) -> bool:
    ins = Insert(my_conn(), sql)
    ins.start()
    ins.join(within)
    return ins.done_at is not None and ins.error is None


def test_long_running_write_makes_freeze_fail_and_is_not_blocked_forever(mariadb_server, my_conn):
    """A long non-transactional write (MyISAM INSERT ... SELECT SLEEP) keeps BLOCK_COMMIT
    from being granted: the request is killed at the timeout, InnoDB commits go on."""
    long_q = Insert(my_conn(), "INSERT INTO app.m SELECT SLEEP(4)")
    long_q.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]], timeout=1), lambda: None)
    assert time.monotonic() - t0 < 3.5
    assert "not granted" in str(ei.value)
    assert writable(my_conn)
    long_q.join(10)


def test_deadline_during_action_drops_the_locks(mariadb_server, my_conn):
    """The action overruns: the held session is dropped at the deadline, the server takes
    commits again before the action ends, and the record says crash."""
    seen = {}

    def action():
        ins = Insert(my_conn())
        ins.start()
        ins.join(2.5)  # timeout is 1 s
        seen["done_during_action"] = ins.done_at is not None
        return "late"

    rec = run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]], timeout=1), action)
    assert seen["done_during_action"], "locks were still held after the deadline"
    assert rec["consistency"] == "crash" and rec["result"] == "late"
    assert rec["hooks"][0]["status"] == "failed"
    assert writable(my_conn)


def test_dead_daemon_is_a_clean_error(tmp_path):
    url = f"mysql://root@localhost/?unix_socket={tmp_path}/nothing.sock"
    t0 = time.monotonic()
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(mysql=[url]), lambda: None)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert msg.startswith(f"mysql {url}: cannot connect") and "\n" not in msg
    res = run_freeze("--mysql", url, "--", "true")
    assert_one_error_line(res, "cannot connect")


def test_password_sources_and_redaction(mariadb_server, tmp_path, monkeypatch):
    pw = mariadb_server["password"]
    url = mariadb_server["bk_url"]
    monkeypatch.delenv("MYSQL_PWD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # in the URL (percent-encoded)
    from urllib.parse import quote
    with_pw = url.replace("mysql://bk@", f"mysql://bk:{quote(pw, safe='')}@")
    rec = run_frozen(FreezePlan(mysql=[with_pw]), lambda: None)
    assert rec["consistency"] == "application"
    assert pw not in json.dumps(rec) and quote(pw, safe="") not in json.dumps(rec)
    assert rec["hooks"][0]["target"] == url
    # from MYSQL_PWD
    monkeypatch.setenv("MYSQL_PWD", pw)
    assert run_frozen(FreezePlan(mysql=[url]), lambda: None)["consistency"] == "application"
    monkeypatch.delenv("MYSQL_PWD")
    # from ~/.my.cnf [client]
    (tmp_path / ".my.cnf").write_text(f"[client]\npassword=\"{pw}\"\n")
    assert run_frozen(FreezePlan(mysql=[url]), lambda: None)["consistency"] == "application"
    (tmp_path / ".my.cnf").unlink()
    # a wrong password: clean error, no password in it
    bad = url.replace("mysql://bk@", "mysql://bk:Wrong-Pw-123@")
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(mysql=[bad]), lambda: None)
    assert "Access denied" in str(ei.value) and "Wrong-Pw-123" not in str(ei.value)
    assert "Wrong-Pw-123" not in json.dumps(ei.value.record)
    # the CLI: error line without the password
    res = run_freeze("--mysql", bad, "--", "true", env={"HOME": str(tmp_path)})
    line = assert_one_error_line(res, "access denied")
    assert "Wrong-Pw-123" not in line


def test_cli_mysql_and_fs_together(mariadb_server, fs, tmp_path):
    res = run_freeze("--fs", str(fs), "--mysql", mariadb_server["root_url"], "--json", "--",
                     "sh", "-c", f"echo snap > {tmp_path / 'out'}")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["consistency"] == "application"
    assert [h["kind"] for h in rec["hooks"]] == ["mysql", "fs"]
    assert rec["hooks"][0]["binlog_file"]


def test_fs_freeze_failure_releases_backup_stage(mariadb_server, my_conn, tmp_path):
    """Failure after the DB quiesce (fs not a mountpoint is caught early, so use a
    failing pre-freeze step: the runtime dir check) undoes BACKUP STAGE."""
    import os

    if not os.path.ismount("/dev/shm"):
        pytest.skip("no /dev/shm")
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(mysql=[mariadb_server["root_url"]], fs=["/dev/shm"]), lambda: None)
    assert "does not support freezing" in str(ei.value)
    assert ei.value.record["hooks"][0]["status"] == "aborted"
    assert writable(my_conn)
    # and no backup stage left: a new one can start right away
    c = my_conn()
    with c.cursor() as cur:
        cur.execute("SET SESSION lock_wait_timeout = 2")
        cur.execute("BACKUP STAGE START")
        cur.execute("BACKUP STAGE BLOCK_COMMIT")
        cur.execute("BACKUP STAGE END")


def test_writer_on_fs_and_commit_both_blocked(mariadb_server, my_conn, fs):
    seen = {}

    def action():
        ins = Insert(my_conn())
        ins.start()
        w = start_writer(fs / "both")
        seen["fs_blocked"] = blocked(w, 0.4)
        seen["commit_blocked"] = ins.done_at is None
        seen["w"], seen["ins"] = w, ins

    rec = run_frozen(FreezePlan(fs=[str(fs)], mysql=[mariadb_server["root_url"]]), action)
    wait_done(seen["w"], 5)
    seen["ins"].join(5)
    assert seen["fs_blocked"] and seen["commit_blocked"]
    assert seen["ins"].error is None
    assert rec["consistency"] == "application"
    assert_thawed(fs)
