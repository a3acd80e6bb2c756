"""A FileStore that simulates a power cut: it remembers every write, hole punch and
the bytes they replaced until the file is fsynced, and counts I/O calls so a test can
cut the power at the N-th one.

At the cut, `PowerCut` (a BaseException, like a real loss of power it is not an error
the engine may handle) is raised from inside the I/O call and from every later one;
the test then drops the pool with `Pool.abandon()` and calls `Disk.revert(rng, mode)`
to decide what the disk kept of the unsynced writes:

- "all": nothing unsynced survives (a drive that honours only FLUSH);
- "random": each unsynced write independently survives whole, is lost, or is torn
  (a random subset of its 512-byte sectors survives) — writes reach the platter out
  of order and partially, which is what a volatile disk cache does.

The SQLite catalog is not routed through this store: SQLite's own atomicity and
durability (WAL, synchronous=FULL) are trusted, so a cut around `Catalog.commit`
happens either before the transaction (it never happened) or after it returned (it
is durable); see `install`.
"""
from __future__ import annotations

import os
import random

from blocksnap.store import FileStore

SECTOR = 512


class PowerCut(BaseException):
    """The power went out during this I/O call."""


class Disk:
    """The simulated machine: one I/O counter and the unsynced writes of every file."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.armed = False
        self.cut_at: int | None = None
        self.calls = 0
        self.is_cut = False
        self.where = ""
        # realpath -> [(offset, previous bytes)] in write order, since the last fsync
        self.pending: dict[str, list[tuple[int, bytes]]] = {}

    def arm(self, cut_at: int | None) -> None:
        """Count I/O calls from now on; cut at call number `cut_at` (1-based; None: never)."""
        self.armed = True
        self.cut_at = cut_at
        self.calls = 0
        self.is_cut = False

    def tick(self, what: str) -> None:
        if self.is_cut:
            raise PowerCut(f"after the cut: {what}")
        if not self.armed:
            return
        self.calls += 1
        if self.cut_at is not None and self.calls >= self.cut_at:
            self.is_cut = True
            self.where = what
            raise PowerCut(what)

    def record(self, path: str, offset: int, old: bytes) -> None:
        self.pending.setdefault(path, []).append((offset, old))

    def synced(self, path: str) -> None:
        self.pending.pop(path, None)

    def revert(self, rng: random.Random, mode: str = "all") -> dict[str, int]:
        """Apply the power cut to the files: undo unsynced writes as `mode` says."""
        stats = {"kept": 0, "lost": 0, "torn": 0}
        for path, entries in self.pending.items():
            fd = os.open(path, os.O_RDWR)
            try:
                # newest first, so undoing everything restores the last synced state
                for offset, old in reversed(entries):
                    choice = "lost" if mode == "all" else rng.choice(["kept", "lost", "torn"])
                    stats[choice] += 1
                    if choice == "kept":
                        continue
                    if choice == "lost":
                        os.pwrite(fd, old, offset)
                        continue
                    # torn: every absolute 512-byte sector of the range survives or not
                    end = offset + len(old)
                    s = offset
                    while s < end:
                        e = min(end, (s // SECTOR + 1) * SECTOR)
                        if rng.random() < 0.5:
                            os.pwrite(fd, old[s - offset:e - offset], s)
                        s = e
            finally:
                os.close(fd)
        self.pending.clear()
        return stats


DISK = Disk()


class FaultyFileStore(FileStore):
    def __init__(self, path: str, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        self.key = os.path.realpath(path)

    def _old(self, length: int, offset: int) -> bytes:
        old = os.pread(self.fd, length, offset)
        return old + bytes(length - len(old))

    def pwritev(self, pieces, offset: int) -> None:
        # (FileStore.pwrite goes through here too: one tick per system call)
        DISK.tick(f"pwrite {os.path.basename(self.path)} @{offset}")
        n = sum(memoryview(p).nbytes for p in pieces)
        DISK.record(self.key, offset, self._old(n, offset))
        super().pwritev(pieces, offset)

    def sync(self) -> None:
        DISK.tick(f"fsync {os.path.basename(self.path)}")
        super().sync()
        DISK.synced(self.key)

    def punch_hole(self, offset: int, length: int) -> None:
        DISK.tick(f"punch {os.path.basename(self.path)} @{offset}")
        if length > 0:
            DISK.record(self.key, offset, self._old(length, offset))
        super().punch_hole(offset, length)


def install(monkeypatch) -> Disk:
    """Route the pool's data store and COW origins through FaultyFileStore, and put cut
    points before and after every catalog transaction."""
    from blocksnap.engine import cow, pool
    from blocksnap.engine.catalog import Catalog

    DISK.reset()
    monkeypatch.setattr(pool, "FileStore", FaultyFileStore)
    monkeypatch.setattr(cow, "FileStore", FaultyFileStore)
    real_commit = Catalog.commit

    def commit(self, **kwargs):
        DISK.tick("catalog commit (before: the transaction never happened)")
        real_commit(self, **kwargs)
        DISK.tick("catalog commit (after: the transaction is durable)")

    monkeypatch.setattr(Catalog, "commit", commit)
    return DISK
