"""PostgreSQL quiesce/release with psycopg 3, on one held session.

default mode: CHECKPOINT (so crash recovery of the snapshot is short), record the WAL
position. backup mode: pg_backup_start(label, fast) ... pg_backup_stop(false) on the
same session (pg_start_backup/pg_stop_backup, non-exclusive, before PostgreSQL 15); the
backup label and tablespace map returned by the stop go into the record. A session that
is gone before the stop means the backup was aborted: the hook fails and the snapshot is
only crash-consistent. Statements that do not finish by the deadline are cancelled from
a second connection (pg_cancel_backend), as well as by statement_timeout.

The lifecycle (sessions, timing, the record entry's status) is `Quiescer`'s.
"""
from __future__ import annotations

import math
from typing import Any

from .dsn import parse_pg
from .guard import DeadlineTimer
from .plan import HookError
from .quiescer import Quiescer

APPLICATION_NAME = "blocksnap-freeze"


class PgQuiescer(Quiescer):
    kind = "pg"
    blocks_writes = False  # neither CHECKPOINT nor backup mode blocks writers

    def __init__(self, dsn: str, mode: str, label: str, timeout: float):
        super().__init__(parse_pg(dsn), timeout, mode=mode)
        self.mode = mode
        self.label = label
        self.in_backup = False

    # ------------------------------------------------------------------ driver
    def _db_error(self) -> type[Exception]:
        import psycopg

        return psycopg.Error

    def _error_message(self, e: BaseException) -> str:
        diag = getattr(e, "diag", None)
        return (getattr(diag, "message_primary", None) if diag is not None else None) or str(e)

    def _connect(self, remaining: float) -> Any:
        import psycopg

        return psycopg.connect(self.target.conninfo, autocommit=True,
                               application_name=APPLICATION_NAME,
                               connect_timeout=max(2, math.ceil(remaining)))

    def _one(self, sql: str, params: tuple = ()) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def _cancel_on(self, ctl: Any) -> None:
        if not ctl.closed:
            ctl.execute("SELECT pg_cancel_backend(%s)", (self.entry["backend_pid"],))

    def _stop_fn(self) -> str:
        return "pg_backup_stop(false)" if self.entry.get("server_version", 0) >= 150000 \
            else "pg_stop_backup(false, false)"

    # ------------------------------------------------------------------ quiesce
    def _hold(self, timer: DeadlineTimer) -> None:
        import psycopg

        version = self.conn.info.server_version
        self.entry["server_version"] = version
        if version < 100000:
            raise HookError(f"{self.name()}: PostgreSQL {version} is too old (10 or newer needed)")
        self.entry["backend_pid"] = self.conn.info.backend_pid
        in_recovery = bool(self._one("SELECT pg_is_in_recovery()")[0])
        self.entry["in_recovery"] = in_recovery
        ms = max(1, int(timer.remaining() * 1000))
        self.conn.execute(f"SET statement_timeout = {ms}")
        if self.mode == "backup":
            if version >= 150000:
                sql, what = "SELECT pg_backup_start(%s, true)::text", "pg_backup_start"
            else:
                sql, what = "SELECT pg_start_backup(%s, true, false)::text", "pg_start_backup"
            params: tuple = (self.label,)
        else:
            sql, what, params = "CHECKPOINT", "CHECKPOINT", ()

        def run() -> Any:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone() if cur.description else None

        row = self._guarded(what, timer, run, lambda e: isinstance(e, psycopg.errors.QueryCanceled))
        if self.mode == "backup":
            self.in_backup = True
            self.entry["backup_start_lsn"] = row[0] if row else None
            self.entry["backup_label_name"] = self.label
        self._record_position(in_recovery)
        # release must not inherit the short quiesce budget
        self.conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
        if timer.expired():
            raise HookError(f"{self.name()}: {what} did not complete within the "
                            f"{self.timeout:g} s freeze timeout")

    def _record_position(self, in_recovery: bool) -> None:
        import psycopg

        try:
            fn = "pg_last_wal_replay_lsn()" if in_recovery else "pg_current_wal_lsn()"
            self.entry["wal_lsn"] = self._one(f"SELECT {fn}::text")[0]
            self.entry["timeline"] = self._one("SELECT timeline_id FROM pg_control_checkpoint()")[0]
            row = self._one("SELECT checkpoint_lsn::text, redo_lsn::text FROM pg_control_checkpoint()")
            self.entry["checkpoint_lsn"], self.entry["checkpoint_redo_lsn"] = row
        except psycopg.Error as e:  # pg_control_* may be restricted: not fatal
            self.entry.setdefault("warnings", []).append(self._clean(e))

    # ------------------------------------------------------------------ release
    def drop_session(self) -> None:
        """Deadline passed: PostgreSQL holds no write lock, nothing to drop."""

    def _release_held(self) -> None:
        """backup mode: pg_backup_stop, whose label and map go into the entry."""
        import psycopg

        if self.mode == "backup" and self.in_backup:
            if self.conn is None or self.conn.closed or self.conn.broken:
                raise HookError("session lost before pg_backup_stop: backup aborted")
            sql = f"SELECT lsn::text, labelfile, spcmapfile FROM {self._stop_fn()}"
            try:
                row = self._one(sql)
            except psycopg.Error as e:
                raise HookError(f"pg_backup_stop failed (session lost?): {self._clean(e)}") from None
            self.in_backup = False
            self.entry["backup_stop_lsn"] = row[0]
            self.entry["backup_label"] = row[1]
            self.entry["tablespace_map"] = row[2] or ""
        elif self.conn is None or self.conn.closed:
            raise HookError("session lost")

    def _undo(self) -> None:
        """Cancel a statement still running, else end backup mode (closing the session
        would abort it too, but later)."""
        if self.conn is not None and not self.conn.closed:
            pid = self.entry.get("backend_pid")
            if pid and self.conn.info.transaction_status == 1:  # ACTIVE: a query in flight
                try:
                    self._cancel()
                except Exception:  # noqa: BLE001
                    pass
            elif self.in_backup and not self.conn.broken:
                try:
                    self.conn.execute("SET statement_timeout = 5000")
                    self.conn.execute(f"SELECT * FROM {self._stop_fn()}")
                except Exception:  # noqa: BLE001 - closing the session aborts it anyway
                    pass
            self.in_backup = False
