"""The job history: one row per run of the agent's jobs, in the pool's catalog.

Kept beside the volumes because it describes them (which snapshot was backed up
where, what failed) and so it goes where the pool goes. A row is written when a
job starts (result 'running') and finished when it ends; each write is its own
SQLite transaction (WAL, synchronous=FULL), so after kill -9 the history holds
every job that started, and `interrupt_running` turns the ones no process will
finish into 'interrupted' - never into a success.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from .catalog import Catalog

RESULTS = ("running", "ok", "failed", "interrupted", "stopped")
_COLUMNS = "id, volume, kind, target, started, ended, result, bytes_read, bytes_stored, error, runner, info"


@dataclass
class JobRow:
    id: int
    volume: str
    kind: str
    target: str
    started: float
    ended: float | None
    result: str
    bytes_read: int = 0
    bytes_stored: int = 0
    error: str | None = None
    runner: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class JobLog:
    """Owned by the Pool; every call takes the pool's lock (one SQLite connection)."""

    def __init__(self, catalog: Catalog, lock: threading.RLock):
        self._db, self._lock = catalog.db, lock

    def begin(self, volume: str, kind: str, target: str, started: float, runner: str,
              info: dict[str, Any] | None = None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (volume, kind, target, started, result, runner, info)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)", (volume, kind, target, started, runner,
                                                         json.dumps(info or {})))
            return int(cur.lastrowid)

    def end(self, job_id: int, result: str, ended: float, bytes_read: int = 0, bytes_stored: int = 0,
            error: str | None = None, info: dict[str, Any] | None = None) -> None:
        if result not in RESULTS or result == "running":
            raise ValueError(f"not a final job result: {result!r}")
        with self._lock:
            old = self._db.execute("SELECT info FROM jobs WHERE id = ?", (job_id,)).fetchone()
            merged = dict(json.loads(old[0]) if old else {}, **(info or {}))
            self._db.execute(
                "UPDATE jobs SET result = ?, ended = ?, bytes_read = ?, bytes_stored = ?, error = ?, info = ?"
                " WHERE id = ? AND result = 'running'",
                (result, ended, bytes_read, bytes_stored, error, json.dumps(merged), job_id))

    def interrupt_running(self, ended: float, note: str) -> list[JobRow]:
        """Mark every 'running' row interrupted (the caller knows no process runs them)."""
        with self._lock:
            rows = self._rows("WHERE result = 'running'", ())
            self._db.execute("UPDATE jobs SET result = 'interrupted', ended = ?, error = ?"
                             " WHERE result = 'running'", (ended, note))
            for r in rows:
                r.result, r.ended, r.error = "interrupted", ended, note
            return rows

    def rows(self, volume: str | None = None, limit: int | None = None, since: float | None = None) -> list[JobRow]:
        """Newest first."""
        where, args = [], []
        if volume is not None:
            where.append("volume = ?")
            args.append(volume)
        if since is not None:
            where.append("started >= ?")
            args.append(since)
        sql = ("WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return self._rows(sql, tuple(args))

    def summary(self) -> list[dict[str, Any]]:
        """Per (volume, kind, target): runs, failures, the last run and the last success."""
        with self._lock:
            agg = self._db.execute(
                "SELECT volume, kind, target, COUNT(*), SUM(result IN ('failed', 'interrupted')),"
                " MAX(id), MAX(CASE WHEN result = 'ok' THEN id END),"
                " MAX(CASE WHEN result = 'ok' AND json_extract(info, '$.mode') = 'full' THEN id END),"
                " MAX(CASE WHEN result = 'ok' AND json_extract(info, '$.mode') = 'differential' THEN id END),"
                " MAX(CASE WHEN result IN ('failed', 'interrupted') THEN id END)"
                " FROM jobs GROUP BY volume, kind, target").fetchall()
            out = []
            for volume, kind, target, runs, failures, last_id, ok_id, full_id, diff_id, bad_id in agg:
                since_ok = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE volume = ? AND kind = ? AND target = ? AND id > ?"
                    " AND result IN ('failed', 'interrupted')", (volume, kind, target, ok_id or 0)).fetchone()[0]
                out.append({"volume": volume, "kind": kind, "target": target, "runs": runs,
                            "failures": int(failures or 0), "failures_since_success": int(since_ok),
                            "last": self._one(last_id), "last_success": self._one(ok_id),
                            "last_full": self._one(full_id), "last_differential": self._one(diff_id),
                            "last_failure": self._one(bad_id)})
            return out

    def _one(self, job_id: int | None) -> dict[str, Any] | None:
        rows = self._rows("WHERE id = ?", (job_id,)) if job_id else []
        return rows[0].to_json() if rows else None

    def _rows(self, tail: str, args: tuple) -> list[JobRow]:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {tail}", args)
        return [JobRow(*r[:11], info=json.loads(r[11])) for r in cur]
