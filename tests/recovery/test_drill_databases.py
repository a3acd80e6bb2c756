"""Drills of real databases: PostgreSQL 15 and MariaDB whose data directories were
on a blocksnap volume (ROW, through FUSE + loop) when the snapshot was taken with
their freeze hooks, under load, and backed up through the daemon. The drill starts
each on its throwaway copy, and its probe (pg_amcheck / mariadb-check, then SQL
with an expected result) passes; nothing is left running or mounted afterwards."""
from __future__ import annotations

import json
import subprocess
import threading

import pytest

from tests.backup.conftest import Repo
from tests.integration.conftest import MariaDB, PgServer, Stack, needs_mariadb, sh, wait_for

from .conftest import assert_nothing_left

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        s.init_pool("2G")
        yield s
    finally:
        s.teardown()


def _drill(repo: Repo, *args: str) -> dict:
    res = repo.cli("drill", *args, "--json", check=False, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr)
    return json.loads(res.stdout)


def _no_server_on_copy(res: dict) -> None:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert res["work_dir"] not in ps, ps


def test_postgres_drill(stack, runtime_dir, tmp_path):
    mnt = stack.volume_fs("db", "512M", "ext4", mnt="pgvol")
    pg = PgServer(stack, mnt / "pg" / "data", "pg1", 54395)
    pg.initdb()
    pg.start()
    sh(*pg.client("pgbench", "-i", "-s", "2", "-q", "postgres"), timeout=180)
    bench = subprocess.Popen(pg.client("pgbench", "-c", "2", "-j", "2", "-T", "12", "postgres"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack.on_cleanup("pgbench", lambda: bench.poll() is None and bench.kill())
    wait_for(lambda: pg.query("SELECT count(*) FROM pgbench_history")[0][0] >= 50, 30, "pgbench")
    stack.cli("snapshot", "create", "db@s1", "--freeze", str(mnt), "--pg", pg.dsn, "--freeze-timeout", "30")
    assert bench.poll() is None, "pgbench ended before the snapshot"
    repo = Repo(stack.pool, f"file://{tmp_path / 'repo'}", {})
    bid = repo.backup("db@s1")["id"]          # while pgbench still writes to the live volume
    bench.communicate(timeout=60)

    res = _drill(repo, bid, "--check", "postgres", "--check", "fsck")
    assert res["ok"] and [c["name"] for c in res["checks"]] == ["postgres", "fsck"], res
    assert res["checks"][0]["summary"] == "pg_amcheck found nothing"
    _no_server_on_copy(res)
    invariant = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts) = "
                 "(SELECT coalesce(sum(delta), 0) FROM pgbench_history) AND count(*) >= 50 FROM pgbench_history")
    res = _drill(repo, "--volume", "db", "--check", "postgres", "--sql", invariant, "--expect", "t")
    assert res["ok"] and res["checks"][0]["summary"] == "the query gave 't'", res
    _no_server_on_copy(res)
    bad = repo.cli("drill", bid, "--check", "pg", "--sql", "SELECT count(*) FROM pgbench_branches", "--expect", "3",
                   check=False, timeout=300)
    assert bad.returncode == 1 and "expected '3'" in bad.stderr and "gave '2'" in bad.stderr, bad.stderr
    assert pg.query("SELECT count(*) FROM pgbench_branches")[0][0] == 2      # the live server went on
    assert_nothing_left(runtime_dir, res["work_dir"])


def test_mariadb_drill(stack, runtime_dir, tmp_path):
    needs_mariadb()
    mnt = stack.volume_fs("mdb", "512M", "ext4", mnt="mdbvol")
    db = MariaDB(stack, mnt / "data", "mdb1")
    db.install()
    db.start()
    db.query("CREATE DATABASE app")
    db.query("CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB")
    stop = threading.Event()

    def load() -> None:
        conn = db.connect()
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("INSERT INTO app.t (v) VALUES (1)")
        conn.close()

    t = threading.Thread(target=load, daemon=True)
    t.start()
    stack.on_cleanup("insert loop", stop.set)
    wait_for(lambda: db.query("SELECT count(*) FROM app.t")[0][0] >= 100, 30, "inserts")
    stack.cli("snapshot", "create", "mdb@s1", "--freeze", str(mnt), "--mysql", db.url, "--freeze-timeout", "30")
    at_snapshot_max = db.query("SELECT count(*) FROM app.t")[0][0]
    repo = Repo(stack.pool, f"file://{tmp_path / 'repo'}", {})
    bid = repo.backup("mdb@s1")["id"]
    stop.set()
    t.join(30)

    res = _drill(repo, bid, "--check", "mariadb")
    assert res["ok"] and res["checks"][0]["summary"] == "mariadb-check: every table OK", res
    _no_server_on_copy(res)
    res = _drill(repo, bid, "--check", "mysql", "--sql", "SELECT count(*) >= 100 FROM app.t", "--expect", "1")
    assert res["ok"], res
    n = int(_drill(repo, bid, "--check", "mariadb", "--sql", "SELECT count(*) FROM app.t")["checks"][0]
            ["summary"].split("'")[1])
    assert 100 <= n <= at_snapshot_max
    assert_nothing_left(runtime_dir, res["work_dir"])
