"""MariaDB on a blocksnap volume (ROW, attached through FUSE + loop, xfs) under a
concurrent transactional insert loop: an application-consistent snapshot with
`snapshot create --freeze --mysql` (BACKUP STAGE), then a clone of it started as a
second mariadbd, which must recover with exactly the transactions committed at the
snapshot: row count between what had committed before and what had been issued after,
no partial transaction, the binlog position and GTID of the record, mariadb-check clean."""
from __future__ import annotations

import shutil
import threading

import pytest

from .conftest import (
    MARIADB_CHECK,
    MariaDB,
    assert_fs_writable,
    needs_mariadb,
    sh,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROWS_PER_TX = 5


class InsertLoop(threading.Thread):
    """Transactions of ROWS_PER_TX rows (tx = 1, 2, 3, ...) on one connection.

    `committed` counts rows whose COMMIT returned; `issued` also counts the rows of a
    COMMIT that was sent but has not returned yet."""

    def __init__(self, db: MariaDB):
        super().__init__(daemon=True)
        self.conn = db.connect(autocommit=False)
        self.lock = threading.Lock()
        self.committed = 0
        self.issued = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.committed, self.issued

    def run(self) -> None:
        tx = 0
        try:
            while not self.stop.is_set():
                tx += 1
                with self.conn.cursor() as cur:
                    cur.executemany("INSERT INTO app.t (tx, v) VALUES (%s, %s)",
                                    [(tx, i) for i in range(ROWS_PER_TX)])
                with self.lock:
                    self.issued += ROWS_PER_TX
                self.conn.commit()
                with self.lock:
                    self.committed += ROWS_PER_TX
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.conn.close()


def test_insert_loop_snapshot_clone_recovers(stack):
    needs_mariadb()
    kind = "xfs" if shutil.which("mkfs.xfs") else "ext4"
    mnt = stack.volume_fs("db", "1G", kind, mnt="myvol")
    db = MariaDB(stack, mnt / "mysql", "my1", server_id=1)
    db.install()
    db.start()
    c = db.connect()
    with c.cursor() as cur:
        cur.execute("CREATE DATABASE app")
        cur.execute("CREATE TABLE app.t (id BIGINT AUTO_INCREMENT PRIMARY KEY, tx INT NOT NULL,"
                    " v INT NOT NULL, pad CHAR(100) NOT NULL DEFAULT 'x', KEY (tx)) ENGINE=InnoDB")
    c.close()

    loop = InsertLoop(db)
    loop.start()
    stack.on_cleanup("insert loop", lambda: (loop.stop.set(), loop.join(30)))
    wait_for(lambda: loop.counts()[0] >= 200 or loop.error is not None, 30, "the insert loop to commit")
    assert loop.error is None, loop.error

    before, _ = loop.counts()
    stack.cli("snapshot", "create", "db@m1", "--freeze", str(mnt), "--mysql", db.url,
              "--freeze-timeout", "20")
    _, after = loop.counts()
    # the loop goes on after the release
    wait_for(lambda: loop.counts()[0] >= after + 50 or loop.error is not None, 30, "commits after the snapshot")
    assert_fs_writable(mnt)

    snap = stack.show("db@m1")
    rec = snap["hooks"]
    assert snap["consistency"] == "application" and rec["consistency"] == "application", rec
    assert rec["errors"] == [] and rec["freeze_ms"] > 0
    (h,) = [x for x in rec["hooks"] if x["kind"] == "mysql"]
    assert h["status"] == "ok" and h["flavor"] == "mariadb", h
    assert h["locks"] == ["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
    assert h["binlog_file"].startswith("binlog.") and h["binlog_position"] > 0, h
    assert h["gtid_binlog_pos"].startswith("0-1-"), h
    (fsh,) = [x for x in rec["hooks"] if x["kind"] == "fs"]
    assert fsh["status"] == "ok" and fsh["fstype"] == kind

    # -- a second server on the clone ------------------------------------------------
    stack.cli("snapshot", "clone", "db@m1", "cm1")
    dev = stack.attach("cm1")
    opts = ("nouuid",) if kind == "xfs" else ()  # the original, same UUID, is mounted
    clone_mnt = stack.mount(dev, "myclone", *opts)
    db2 = MariaDB(stack, clone_mnt / "mysql", "my2", server_id=1)
    db2.start()

    n, ntx, maxtx = db2.query("SELECT COUNT(*), COUNT(DISTINCT tx), COALESCE(MAX(tx), 0) FROM app.t")[0]
    assert before <= n <= after, (before, n, after)
    assert n == ntx * ROWS_PER_TX and ntx == maxtx, "a transaction is partly there, or one is missing"
    assert db2.query(f"SELECT tx FROM app.t GROUP BY tx HAVING COUNT(*) <> {ROWS_PER_TX}") == ()
    # the coordinates in the record are exactly where the clone's binlog ends
    assert db2.query("SELECT @@gtid_binlog_pos")[0][0] == h["gtid_binlog_pos"]
    logs = {row[0]: row[1] for row in db2.query("SHOW BINARY LOGS")}
    assert logs.get(h["binlog_file"]) == h["binlog_position"], (logs, h)

    res = sh(MARIADB_CHECK, "--all-databases", "--extended", f"--socket={db2.socket}", "--user=root",
             check=False, timeout=180)
    bad = [ln for ln in res.stdout.splitlines() if "error" in ln.lower() or "corrupt" in ln.lower()]
    assert res.returncode == 0 and not bad, f"mariadb-check:\n{res.stdout}\n{res.stderr}"
    assert "app.t" in res.stdout and "OK" in res.stdout
    # the clone takes writes of its own
    with db2.connect().cursor() as cur:
        cur.execute("INSERT INTO app.t (tx, v) VALUES (-1, 0)")

    loop.stop.set()
    loop.join(30)
    assert loop.error is None, loop.error
    final = db.query("SELECT COUNT(*) FROM app.t")[0][0]
    assert final == loop.counts()[0] > after
    db2.stop()
    db.stop()
