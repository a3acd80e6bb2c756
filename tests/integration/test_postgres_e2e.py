"""PostgreSQL 15 on a blocksnap volume (ROW, attached through FUSE + loop, ext4), under
pgbench load: application-consistent snapshots with `snapshot create --freeze --pg`
(default and backup mode), then a clone of the snapshot started as a second server,
which must come up by plain crash recovery and be consistent (pg_amcheck, pgbench's
balance invariant)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from .conftest import PgServer, assert_fs_writable, sh, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PORT1, PORT2 = 54391, 54392  # sockets are in private directories: only names, never bound


def _balances(pg: PgServer) -> tuple:
    return pg.query("SELECT (SELECT sum(abalance) FROM pgbench_accounts),"
                    " (SELECT sum(bbalance) FROM pgbench_branches),"
                    " (SELECT sum(tbalance) FROM pgbench_tellers),"
                    " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
                    " (SELECT count(*) FROM pgbench_history)")[0]


def _pg_hook(rec: dict) -> dict:
    (h,) = [h for h in rec["hooks"] if h["kind"] == "pg"]
    return h


def test_pgbench_snapshot_clone_recovers(stack):
    mnt = stack.volume_fs("vol", "1G", "ext4", mnt="pgvol")
    pg = PgServer(stack, mnt / "pg" / "data", "pg1", PORT1)
    pg.initdb()
    pg.start()
    sh(*pg.client("pgbench", "-i", "-s", "5", "-q", "postgres"), timeout=180)

    bench = subprocess.Popen(pg.client("pgbench", "-c", "4", "-j", "2", "-T", "18", "postgres"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack.on_cleanup("pgbench", lambda: bench.poll() is None and bench.kill())
    wait_for(lambda: pg.query("SELECT count(*) FROM pgbench_history")[0][0] >= 50, 30,
             "pgbench to commit transactions")

    # -- snapshots under load ------------------------------------------------------
    t0 = time.monotonic()
    stack.cli("snapshot", "create", "vol@s1", "--freeze", str(mnt), "--pg", pg.dsn,
              "--freeze-timeout", "30", "--label", "kind=default")
    stack.cli("snapshot", "create", "vol@s2", "--freeze", str(mnt), "--pg", pg.dsn,
              "--pg-mode", "backup", "--freeze-timeout", "30")
    both_ms = (time.monotonic() - t0) * 1000
    assert bench.poll() is None, "pgbench ended before the snapshots were taken: make it run longer"
    assert_fs_writable(mnt)  # thawed

    s1 = stack.show("vol@s1")
    assert s1["consistency"] == "application", s1
    assert s1["labels"] == {"kind": "default"}
    rec1 = s1["hooks"]
    assert rec1["consistency"] == "application" and rec1["errors"] == [] and not rec1["aborted"]
    assert 0 < rec1["freeze_ms"] <= both_ms, rec1["freeze_ms"]
    h1 = _pg_hook(rec1)
    assert h1["status"] == "ok" and h1["mode"] == "default"
    assert h1["wal_lsn"] and h1["checkpoint_lsn"]
    assert "backup_label" not in h1
    (fs1,) = [h for h in rec1["hooks"] if h["kind"] == "fs"]
    assert fs1["status"] == "ok" and fs1["target"] == str(mnt) and fs1["fstype"] == "ext4"

    s2 = stack.show("vol@s2")
    assert s2["consistency"] == "application", s2
    rec2 = s2["hooks"]
    assert rec2["freeze_ms"] > 0 and rec2["errors"] == []
    h2 = _pg_hook(rec2)
    assert h2["status"] == "ok" and h2["mode"] == "backup"
    assert h2["wal_lsn"]
    assert h2["backup_label"].startswith("START WAL LOCATION: "), h2["backup_label"]
    assert "LABEL: blocksnap vol@s2" in h2["backup_label"]
    assert h2["backup_start_lsn"] and h2["backup_stop_lsn"] and h2["tablespace_map"] == ""
    assert not (mnt / "pg" / "data" / "backup_label").exists()  # non-exclusive: nothing written

    # -- the clone of s1 is a second server, started while the first is under load -----
    stack.cli("snapshot", "clone", "vol@s1", "c1")
    dev = stack.attach("c1")
    clone_mnt = stack.mount(dev, "pgclone")  # frozen when snapshotted: clean journal, mount rw
    assert not (clone_mnt / "pg" / "data" / "backup_label").exists()  # default mode: none inside
    # a restore sees the original's lock file; its pid is alive here (same host): remove it
    (clone_mnt / "pg" / "data" / "postmaster.pid").unlink()
    pg2 = PgServer(stack, clone_mnt / "pg" / "data", "pg2", PORT2)
    pg2.start()
    log = pg2.log.read_text()
    assert "automatic recovery in progress" in log, log  # plain crash recovery
    assert "database system is ready to accept connections" in log, log

    # everything committed before the CHECKPOINT is there
    assert pg2.query("SELECT pg_current_wal_lsn() >= %s::pg_lsn", (h1["wal_lsn"],))[0][0]

    aa, bb, tt, hh, n_hist = _balances(pg2)
    assert n_hist >= 50
    assert aa == bb == tt == hh, ("pgbench balance invariant broken on the clone", aa, bb, tt, hh)
    res = sh(*pg2.client("pg_amcheck", "--all", "--install-missing", "--heapallindexed"), check=False,
             timeout=180)
    assert res.returncode == 0 and not res.stdout.strip(), f"pg_amcheck:\n{res.stdout}\n{res.stderr}"
    # the clone is a writable, independent database
    with pg2.connect() as c:
        c.execute("CREATE TABLE after_restore (x int)")
        c.execute("INSERT INTO after_restore VALUES (1)")

    # -- the original carried on, and is consistent too --------------------------------
    out, _ = bench.communicate(timeout=60)
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    aa0, bb0, tt0, hh0, n_hist0 = _balances(pg)
    assert aa0 == bb0 == tt0 == hh0
    assert n_hist0 > n_hist, "the snapshot is not point-in-time: it has all of pgbench's work"
    assert pg.query("SELECT to_regclass('after_restore') IS NULL")[0][0]

    pg2.stop("fast")
    pg.stop("fast")
    assert os.path.exists(clone_mnt / "pg" / "data" / "PG_VERSION")
