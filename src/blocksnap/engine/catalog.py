"""The catalog: pool settings, volumes, snapshots and map pages in one SQLite file.

SQLite (WAL, synchronous=FULL) gives the atomic, durable transaction that makes
metadata crash-safe: a commit either happened whole or not at all. The engine adds
the ordering around it (data fsync before commit, no reuse of blocks freed by an
uncommitted transaction).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

CONSISTENCY = ("crash", "filesystem", "application")   # a snapshot row's consistency values

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY, mode TEXT NOT NULL, size INTEGER NOT NULL,
    block_size INTEGER NOT NULL, origin TEXT, root INTEGER NOT NULL,
    levels INTEGER NOT NULL, created REAL NOT NULL, info TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS snapshots (
    volume TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL,
    created REAL NOT NULL, size INTEGER NOT NULL, root INTEGER NOT NULL,
    levels INTEGER NOT NULL, consistency TEXT NOT NULL, labels TEXT NOT NULL,
    hooks TEXT NOT NULL, PRIMARY KEY (volume, name));
CREATE TABLE IF NOT EXISTS pages (
    id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, units INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, volume TEXT NOT NULL, kind TEXT NOT NULL,
    target TEXT NOT NULL, started REAL NOT NULL, ended REAL, result TEXT NOT NULL,
    bytes_read INTEGER NOT NULL DEFAULT 0, bytes_stored INTEGER NOT NULL DEFAULT 0,
    error TEXT, runner TEXT NOT NULL DEFAULT '', info TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_by_volume ON jobs (volume, kind, target, id);
"""


@dataclass
class VolumeRow:
    name: str
    mode: str
    size: int
    block_size: int
    origin: str | None
    root: int
    levels: int
    created: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SnapshotRow:
    volume: str
    name: str
    seq: int
    created: float
    size: int
    root: int
    levels: int
    consistency: str = "crash"
    labels: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)


class Catalog:
    def __init__(self, path: str):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- reads ------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def volume_rows(self) -> list[VolumeRow]:
        rows = self.db.execute(
            "SELECT name, mode, size, block_size, origin, root, levels, created, info FROM volumes")
        return [VolumeRow(*r[:8], info=json.loads(r[8])) for r in rows]

    def snapshot_rows(self) -> list[SnapshotRow]:
        rows = self.db.execute(
            "SELECT volume, name, seq, created, size, root, levels, consistency, labels, hooks"
            " FROM snapshots ORDER BY volume, seq")
        return [SnapshotRow(*r[:8], labels=json.loads(r[8]), hooks=json.loads(r[9])) for r in rows]

    def pages(self) -> Iterator[tuple[int, int, int, bytes]]:
        yield from self.db.execute("SELECT id, kind, units, data FROM pages")

    def page_ids(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM pages")]

    # -- one transaction ----------------------------------------------------
    def commit(self, *, meta: dict[str, str] | None = None,
               pages: Iterable[tuple[int, int, int, bytes]] = (),
               freed_pages: Iterable[int] = (),
               volumes: Iterable[VolumeRow] = (), deleted_volumes: Iterable[str] = (),
               snapshots: Iterable[SnapshotRow] = (),
               deleted_snapshots: Iterable[tuple[str, str]] = ()) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if meta:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            db.executemany("DELETE FROM pages WHERE id = ?", ((i,) for i in freed_pages))
            db.executemany("INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?)", pages)
            db.executemany("DELETE FROM volumes WHERE name = ?", ((n,) for n in deleted_volumes))
            db.executemany(
                "INSERT OR REPLACE INTO volumes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((v.name, v.mode, v.size, v.block_size, v.origin, v.root, v.levels, v.created,
                  json.dumps(v.info)) for v in volumes))
            db.executemany("DELETE FROM snapshots WHERE volume = ? AND name = ?", deleted_snapshots)
            db.executemany(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((s.volume, s.name, s.seq, s.created, s.size, s.root, s.levels, s.consistency,
                  json.dumps(s.labels), json.dumps(s.hooks)) for s in snapshots))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
