"""MySQL 8 / MariaDB quiesce/release with PyMySQL, on one held session.

MySQL 8:   LOCK INSTANCE FOR BACKUP, plus FLUSH TABLES WITH READ LOCK on the same
           session when non-InnoDB tables exist; coordinates (binlog file/position,
           gtid_executed, InnoDB LSN) from performance_schema.log_status.
           Released with UNLOCK TABLES / UNLOCK INSTANCE.
MariaDB:   BACKUP STAGE START, BACKUP STAGE BLOCK_COMMIT; coordinates from SHOW MASTER
           STATUS and @@gtid_binlog_pos. Released with BACKUP STAGE END.
Older:     FLUSH TABLES WITH READ LOCK + SHOW MASTER STATUS (MySQL 5.7, MariaDB < 10.4).

A lock not granted by the deadline is killed from a second connection (KILL QUERY),
as a second bound besides the session's lock_wait_timeout, so the server is never left
waiting on (and blocking writers behind) our lock request. If the deadline passes while
the locks are held, the holding session is dropped, which releases them.

The lifecycle (sessions, timing, the record entry's status) is `Quiescer`'s.
"""
from __future__ import annotations

import json
import math
import re
import socket
import time
from typing import Any

from .dsn import parse_mysql
from .guard import DeadlineTimer
from .plan import HookError
from .quiescer import Quiescer

SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


def _version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", v)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


class MysqlQuiescer(Quiescer):
    kind = "mysql"
    blocks_writes = True
    interrupted_text = ("not granted within the {timeout:g} s freeze timeout "
                        "(a long query or lock is in the way; killed)")

    def __init__(self, url: str, timeout: float):
        super().__init__(parse_mysql(url), timeout)
        self.release_sql: list[str] = []
        self.dropped = False

    # ------------------------------------------------------------------ driver
    def _db_error(self) -> type[Exception]:
        import pymysql

        return pymysql.Error

    def _error_message(self, e: BaseException) -> str:
        args = getattr(e, "args", ())
        if len(args) >= 2 and isinstance(args[0], int):
            return f"{args[1]} ({args[0]})"
        return str(e) or type(e).__name__

    def _connect(self, remaining: float) -> Any:
        import pymysql

        # read_timeout: a last bound on a hung server (lock requests are killed long before)
        return pymysql.connect(**self.target.connect_kwargs(), autocommit=True,
                               connect_timeout=max(1.0, remaining), read_timeout=self.timeout + 10,
                               program_name="blocksnap-freeze")

    def _query(self, sql: str) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall() or [])

    def _dict_rows(self, sql: str) -> list[dict]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            cols = [d[0] for d in (cur.description or [])]
            return [dict(zip(cols, r, strict=False)) for r in cur.fetchall() or []]

    def _kill(self, ctl: Any, what: str) -> None:
        with ctl.cursor() as cur:
            cur.execute(f"KILL {what} {int(self.entry.get('connection_id', 0))}")

    def _cancel_on(self, ctl: Any) -> None:
        self._kill(ctl, "QUERY")

    def _kill_session(self) -> None:
        """KILL CONNECTION from the control connection: the server drops every lock."""
        self._with_ctl(lambda ctl: self._kill(ctl, "CONNECTION"))

    def _locked_stmt(self, sql: str, timer: DeadlineTimer) -> None:
        """Run a lock statement; KILL QUERY from the control session at the deadline."""
        def run() -> None:
            with self.conn.cursor() as cur:
                cur.execute(sql)

        def interrupted(e: BaseException) -> bool:  # interrupted / lock wait timeout
            return (e.args[0] if e.args else None) in (1317, 1205) or timer.expired()

        self._guarded(sql, timer, run, interrupted)

    # ------------------------------------------------------------------ quiesce
    def _hold(self, timer: DeadlineTimer) -> None:
        version = str(self._query("SELECT VERSION()")[0][0])
        mariadb = "mariadb" in version.lower()
        vt = _version_tuple(version)
        self.entry.update(server_version=version, flavor="mariadb" if mariadb else "mysql",
                          connection_id=self.conn.thread_id())
        wait = max(1, math.ceil(timer.remaining()) + 1)  # the KILL comes first
        self._query(f"SET SESSION lock_wait_timeout = {wait}")
        if mariadb and vt >= (10, 4, 1):
            steps = ["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
            self.release_sql = ["BACKUP STAGE END"]
        elif not mariadb and vt >= (8, 0, 0):
            steps = ["LOCK INSTANCE FOR BACKUP"]
            self.release_sql = ["UNLOCK INSTANCE"]
            others = self._query(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' "
                "AND ENGINE IS NOT NULL AND ENGINE <> 'InnoDB' AND TABLE_SCHEMA NOT IN "
                f"({', '.join(repr(s) for s in SYSTEM_SCHEMAS)})")[0][0]
            self.entry["non_innodb_tables"] = int(others)
            if others:
                steps.append("FLUSH TABLES WITH READ LOCK")
                self.release_sql.insert(0, "UNLOCK TABLES")
        else:
            steps = ["FLUSH TABLES WITH READ LOCK"]
            self.release_sql = ["UNLOCK TABLES"]
        self.block_start = time.monotonic()  # writers wait from the first lock request
        for i, sql in enumerate(steps):
            self._locked_stmt(sql, timer)
            self.entry["locks"] = steps[: i + 1]
        lock_ms = (time.monotonic() - self.block_start) * 1000
        self.entry["lock_wait_ms"] = round(lock_ms, 3)
        self._record_coordinates(mariadb, vt)
        if timer.expired():
            raise HookError(f"{self.name()}: locks not taken within the {self.timeout:g} s freeze timeout")

    def _record_coordinates(self, mariadb: bool, vt: tuple[int, ...]) -> None:
        import pymysql

        try:
            if not mariadb and vt >= (8, 0, 0):
                rows = self._dict_rows("SELECT * FROM performance_schema.log_status")
                if rows:
                    row = rows[0]
                    self.entry["server_uuid"] = row.get("SERVER_UUID")
                    local = json.loads(row.get("LOCAL") or "{}")
                    engines = json.loads(row.get("STORAGE_ENGINES") or "{}")
                    self.entry["binlog_file"] = local.get("binary_log_file") or None
                    self.entry["binlog_position"] = local.get("binary_log_position")
                    self.entry["gtid_executed"] = local.get("gtid_executed", "")
                    innodb = engines.get("InnoDB") or {}
                    if "LSN" in innodb:
                        self.entry["innodb_lsn"] = innodb.get("LSN")
                        self.entry["innodb_checkpoint_lsn"] = innodb.get("LSN_checkpoint")
                return
            rows = self._dict_rows("SHOW MASTER STATUS")
            if rows:
                self.entry["binlog_file"] = rows[0].get("File")
                self.entry["binlog_position"] = int(rows[0].get("Position") or 0)
            else:
                self.entry["binlog_file"] = None  # binary log disabled
                self.entry["binlog_position"] = None
            if mariadb:
                pos = self._query("SELECT @@GLOBAL.gtid_binlog_pos, @@GLOBAL.gtid_current_pos")[0]
                self.entry["gtid_binlog_pos"], self.entry["gtid_current_pos"] = pos
            else:
                try:
                    self.entry["gtid_executed"] = self._query("SELECT @@GLOBAL.gtid_executed")[0][0]
                except pymysql.Error:
                    pass
        except (pymysql.Error, ValueError) as e:  # privileges: the locks are what matters
            self.entry.setdefault("warnings", []).append(f"coordinates not recorded: {self._clean(e)}")

    # ------------------------------------------------------------------ release
    def drop_session(self) -> None:
        """Deadline passed while holding the locks: end the session (the server then
        releases every lock at once). Runs in the deadline thread."""
        self.dropped = True
        sock = getattr(self.conn, "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._kill_session()
        except Exception:  # noqa: BLE001
            pass

    def _release_held(self) -> None:
        import pymysql

        if self.dropped:
            raise HookError("locks released early: the session was dropped at the deadline")
        for sql in self.release_sql:
            try:
                self._query(sql)
            except pymysql.Error as e:
                raise HookError(f"{sql} failed (session lost?): {self._clean(e)}") from None

    def _undo(self) -> None:
        if self._in_flight and self.conn is not None:
            # interrupted in the middle of a lock request: kill the whole session
            try:
                self._kill_session()
            except Exception:  # noqa: BLE001
                pass
        elif self.conn is not None and self.conn.open:
            for sql in self.release_sql:
                try:
                    self._query(sql)
                except Exception:  # noqa: BLE001 - e.g. BACKUP STAGE END without START
                    pass
