"""PostgreSQL hooks against a real PostgreSQL 15 started by the fixture."""
from __future__ import annotations

import json
import time

import pytest

from blocksnap.hooks import FreezePlan, HookError, run_frozen

from .conftest import assert_one_error_line, assert_thawed, blocked, needs_root, run_freeze, start_writer, wait_done

pytestmark = [needs_root, pytest.mark.slow]


def connect(pg_server):
    import psycopg

    return psycopg.connect(pg_server["dsn"], autocommit=True)


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def test_default_mode_checkpoints(pg_server):
    with connect(pg_server) as c:
        c.execute("CREATE TABLE IF NOT EXISTS ck (x int)")
        c.execute("INSERT INTO ck SELECT generate_series(1, 1000)")
        before = c.execute("SELECT redo_lsn::text FROM pg_control_checkpoint()").fetchone()[0]
        c.execute("INSERT INTO ck SELECT generate_series(1, 1000)")
    rec = run_frozen(FreezePlan(pg=[pg_server["dsn"]], volume="db", snapshot="s1"), lambda: "snap")
    json.dumps(rec)
    assert rec["consistency"] == "application" and rec["errors"] == [] and rec["result"] == "snap"
    (h,) = rec["hooks"]
    assert h["kind"] == "pg" and h["status"] == "ok" and h["mode"] == "default"
    assert h["server_version"] >= 150000
    assert "password" not in h["target"] and "host=" in h["target"]
    # the CHECKPOINT happened: the redo point moved past the WAL written before it
    assert lsn_int(h["checkpoint_redo_lsn"]) > lsn_int(before)
    assert lsn_int(h["wal_lsn"]) >= lsn_int(h["checkpoint_lsn"])
    assert "backup_label" not in h


def test_backup_mode_records_label_and_map(pg_server):
    seen = {}

    def action():
        with connect(pg_server) as c:  # the backup session is held during the action
            seen["sessions"] = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'blocksnap-freeze'").fetchone()[0]
        return 1

    rec = run_frozen(FreezePlan(pg=[pg_server["dsn"]], pg_mode="backup", volume="db", snapshot="s2"), action)
    assert rec["consistency"] == "application", rec["errors"]
    h = rec["hooks"][0]
    assert h["mode"] == "backup" and h["status"] == "ok"
    assert "START WAL LOCATION" in h["backup_label"] and "LABEL: blocksnap db@s2" in h["backup_label"]
    assert h["tablespace_map"] == ""
    assert lsn_int(h["backup_stop_lsn"]) >= lsn_int(h["backup_start_lsn"])
    assert seen["sessions"] == 2  # the held session + the control session for cancelling
    # backup mode was ended: a new one can start and stop on another session
    with connect(pg_server) as c:
        c.execute("SELECT pg_backup_start('check', true)")
        c.execute("SELECT * FROM pg_backup_stop(false)")


def test_backup_session_lost_is_crash_consistent(pg_server):
    def action():
        with connect(pg_server) as c:
            n = c.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE application_name = 'blocksnap-freeze' AND pid <> pg_backend_pid()").fetchone()[0]
        time.sleep(0.2)
        return n

    rec = run_frozen(FreezePlan(pg=[pg_server["dsn"]], pg_mode="backup"), action)
    assert rec["result"] >= 1
    assert rec["consistency"] == "crash"
    assert rec["hooks"][0]["status"] == "failed"
    assert any("pg_backup_stop" in e for e in rec["errors"]), rec["errors"]


def test_pg_with_fs_is_application_consistent(pg_server, fs):
    seen = {}

    def action():
        w = start_writer(fs / "pgfs")
        seen["blocked"] = blocked(w, 0.3)
        seen["w"] = w
        return "ok"

    rec = run_frozen(FreezePlan(fs=[str(fs)], pg=[pg_server["dsn"]], pg_mode="backup"), action)
    assert seen["blocked"]
    wait_done(seen["w"], 5)
    assert rec["consistency"] == "application"
    assert [h["kind"] for h in rec["hooks"]] == ["pg", "fs"]


def test_bad_dsn_error_and_nothing_frozen(pg_server, fs, tmp_path):
    ran = []
    for dsn in (f"host={pg_server['socket_dir']} user=postgres dbname=nosuchdb password=S3kr1tPw",
                "host=/tmp/no-such-socket-dir user=postgres password=S3kr1tPw"):
        with pytest.raises(HookError) as ei:
            run_frozen(FreezePlan(fs=[str(fs)], pg=[dsn], timeout=5), lambda: ran.append(1))
        msg = str(ei.value)
        assert "cannot connect" in msg and "\n" not in msg
        assert "S3kr1tPw" not in msg and "S3kr1tPw" not in json.dumps(ei.value.record)
        assert ran == []
        assert_thawed(fs)


def test_password_never_in_record(pg_server):
    dsn = pg_server["dsn"] + " password=Very-Secret-1"  # trust auth ignores it
    rec = run_frozen(FreezePlan(pg=[dsn]), lambda: None)
    assert rec["consistency"] == "application"
    assert "Very-Secret-1" not in json.dumps(rec)


def test_cli_pg_backup_json(pg_server):
    res = run_freeze("--pg", pg_server["dsn"], "--pg-mode", "backup", "--json", "--", "true")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["consistency"] == "application"
    assert "START WAL LOCATION" in rec["hooks"][0]["backup_label"]


def test_cli_pg_server_down_is_one_error_line():
    res = run_freeze("--pg", "host=/tmp/definitely-not-here dbname=x", "--", "true")
    assert_one_error_line(res, "cannot connect")


def test_checkpoint_not_allowed_is_a_clean_error(pg_server):
    with connect(pg_server) as c:
        c.execute("DROP ROLE IF EXISTS weak")
        c.execute("CREATE ROLE weak LOGIN")
    dsn = f"host={pg_server['socket_dir']} user=weak dbname=postgres"
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(pg=[dsn]), lambda: None)
    assert "CHECKPOINT failed" in str(ei.value)
