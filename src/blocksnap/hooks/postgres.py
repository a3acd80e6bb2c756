"""PostgreSQL quiesce/release with psycopg 3, on one held session.

default mode: CHECKPOINT (so crash recovery of the snapshot is short), record the WAL
position. backup mode: pg_backup_start(label, fast) ... pg_backup_stop(false) on the
same session (pg_start_backup/pg_stop_backup, non-exclusive, before PostgreSQL 15); the
backup label and tablespace map returned by the stop go into the record. A session that
is gone before the stop means the backup was aborted: the hook fails and the snapshot is
only crash-consistent. Statements that do not finish by the deadline are cancelled from
a second connection (pg_cancel_backend), as well as by statement_timeout.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any

from .dsn import parse_pg, scrub
from .guard import DeadlineTimer
from .plan import HookError

APPLICATION_NAME = "blocksnap-freeze"


class PgQuiescer:
    kind = "pg"
    blocks_writes = False  # neither CHECKPOINT nor backup mode blocks writers

    def __init__(self, dsn: str, mode: str, label: str, timeout: float):
        self.target = parse_pg(dsn)
        self.mode = mode
        self.label = label
        self.timeout = timeout
        self.conn: Any = None
        self.ctl: Any = None
        self._ctl_lock = threading.Lock()
        self.in_backup = False
        self.started = False
        self.ms = 0.0
        self.held_from: float | None = None
        self.block_start: float | None = None
        self.block_end: float | None = None
        self.entry: dict[str, Any] = {"kind": "pg", "target": self.target.redacted, "mode": mode,
                                      "status": "skipped"}

    # ------------------------------------------------------------------ helpers
    def name(self) -> str:
        return f"pg {self.target.redacted}"

    def _clean(self, e: BaseException | str) -> str:
        if isinstance(e, BaseException):
            diag = getattr(e, "diag", None)
            msg = (getattr(diag, "message_primary", None) if diag is not None else None) or str(e)
        else:
            msg = e
        return scrub(msg, self.target.secrets)

    def _connect(self, remaining: float):
        import psycopg

        return psycopg.connect(self.target.conninfo, autocommit=True,
                               application_name=APPLICATION_NAME,
                               connect_timeout=max(2, math.ceil(remaining)))

    def _one(self, sql: str, params: tuple = ()) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def _cancel(self, pid: int) -> None:
        with self._ctl_lock:
            if self.ctl is not None and not self.ctl.closed:
                self.ctl.execute("SELECT pg_cancel_backend(%s)", (pid,))

    # ------------------------------------------------------------------ quiesce
    def quiesce(self, timer: DeadlineTimer) -> None:
        import psycopg

        t0 = time.monotonic()
        self.started = True
        self.entry["status"] = "failed"
        try:
            try:
                self.conn = self._connect(timer.remaining())
                self.ctl = self._connect(timer.remaining())
            except psycopg.Error as e:
                raise HookError(f"{self.name()}: cannot connect: {self._clean(e)}") from None
            version = self.conn.info.server_version
            self.entry["server_version"] = version
            if version < 100000:
                raise HookError(f"{self.name()}: PostgreSQL {version} is too old (10 or newer needed)")
            pid = self.conn.info.backend_pid
            self.entry["backend_pid"] = pid
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
            handle = timer.add(lambda: self._cancel(pid))
            try:
                with self.conn.cursor() as cur:
                    cur.execute(sql, params)
                    row = cur.fetchone() if cur.description else None
            except psycopg.errors.QueryCanceled:
                raise HookError(f"{self.name()}: {what} did not complete within the "
                                f"{self.timeout:g} s freeze timeout (cancelled)") from None
            except psycopg.Error as e:
                raise HookError(f"{self.name()}: {what} failed: {self._clean(e)}") from None
            finally:
                timer.remove(handle)
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
            self.held_from = self.block_start = time.monotonic()
            self.entry["status"] = "held"
        except psycopg.Error as e:
            raise HookError(f"{self.name()}: {self._clean(e)}") from None
        finally:
            self.ms += (time.monotonic() - t0) * 1000

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

    def release(self) -> str | None:
        """Normal end. Returns an error string (the hook then failed) or None."""
        import psycopg

        t0 = time.monotonic()
        err = None
        try:
            if self.mode == "backup" and self.in_backup:
                if self.conn is None or self.conn.closed or self.conn.broken:
                    raise HookError("session lost before pg_backup_stop: backup aborted")
                version = self.entry.get("server_version", 150000)
                if version >= 150000:
                    sql = "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
                else:
                    sql = "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
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
            self.entry["status"] = "ok"
        except HookError as e:
            err = str(e)
            self.entry["status"] = "failed"
            self.entry["error"] = err
        finally:
            self._close()
            self.ms += (time.monotonic() - t0) * 1000
            self._finish()
        return f"{self.name()}: {err}" if err else None

    def abort(self) -> None:
        """Undo after a failure elsewhere: end backup mode, close both sessions."""
        t0 = time.monotonic()
        try:
            if self.conn is not None and not self.conn.closed:
                pid = self.entry.get("backend_pid")
                if pid and self.conn.info.transaction_status == 1:  # ACTIVE: a query in flight
                    try:
                        self._cancel(pid)
                    except Exception:  # noqa: BLE001
                        pass
                elif self.in_backup and not self.conn.broken:
                    try:
                        self.conn.execute("SET statement_timeout = 5000")
                        fn = "pg_backup_stop(false)" if self.entry.get("server_version", 0) >= 150000 \
                            else "pg_stop_backup(false, false)"
                        self.conn.execute(f"SELECT * FROM {fn}")
                    except Exception:  # noqa: BLE001 - closing the session aborts it anyway
                        pass
                self.in_backup = False
        finally:
            self._close()
            if self.entry["status"] in ("held", "skipped"):
                self.entry["status"] = "aborted"
            self.ms += (time.monotonic() - t0) * 1000
            self._finish()

    def _finish(self) -> None:
        if self.block_start is not None:
            self.block_end = time.monotonic()
        self.entry["ms"] = round(self.ms, 3)
        if self.held_from is not None:
            self.entry["held_ms"] = round((time.monotonic() - self.held_from) * 1000, 3)

    def _close(self) -> None:
        for c in (self.conn, self.ctl):
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
        with self._ctl_lock:
            self.ctl = None
