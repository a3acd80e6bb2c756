"""A FileStore that simulates a power cut: it remembers every write, hole punch and
the bytes they replaced until the file is fsynced, and counts I/O calls so a test can
cut the power at the N-th one.

At the cut, `PowerCut` (a BaseException, like a real loss of power it is not an error
the engine may handle) is raised from inside the I/O call and from every later one;
the test then drops the pool with `Pool.abandon()` and calls `Disk.revert(rng, mode)`
to decide what the disk kept of the unsynced writes:

- "all": nothing unsynced survives (a drive that honours only FLUSH);
- "random": each 512-byte sector touched since the last fsync ends at any one of
  the versions it had since (the synced one, or the one after any of the writes
  that touched it) — writes reach the platter out of order and partially, which is
  what a volatile disk cache does, but a sector never holds bytes it never held.

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
        """Apply the power cut to the files: undo unsynced writes as `mode` says.

        Per 512-byte sector, not per write: the page cache sends the disk whole
        versions of a page, and a volatile disk cache keeps or loses each sector
        on its own, so every sector ends at one of the versions it had since the
        last fsync ("all": the synced one; "random": any). Undoing whole writes
        instead can make versions that never existed: an older write lost under a
        newer kept one that covers the same sector would put its old bytes back
        over the newer write's.
        """
        stats = {"kept": 0, "lost": 0, "torn": 0}
        for path, entries in self.pending.items():
            fd = os.open(path, os.O_RDWR)
            try:
                # sector -> the writes that touched it, oldest first
                touching: dict[int, list[int]] = {}
                for k, (offset, old) in enumerate(entries):
                    for sec in range(offset // SECTOR, -(-(offset + len(old)) // SECTOR)):
                        touching.setdefault(sec, []).append(k)
                size = os.fstat(fd).st_size
                for sec, writes in touching.items():
                    back = len(writes) if mode == "all" else rng.randrange(len(writes) + 1)
                    stats["kept" if back == 0 else "lost" if back == len(writes) else "torn"] += 1
                    if not back:
                        continue
                    lo = sec * SECTOR
                    version = bytearray(os.pread(fd, SECTOR, lo).ljust(SECTOR, b"\0"))
                    for k in reversed(writes[len(writes) - back:]):   # newest first
                        offset, old = entries[k]
                        a, b = max(offset, lo), min(offset + len(old), lo + SECTOR)
                        version[a - lo:b - lo] = old[a - offset:b - offset]
                    os.pwrite(fd, version[:max(0, min(SECTOR, size - lo))], lo)
            finally:
                os.close(fd)
        self.pending.clear()
        return stats


DISK = Disk()


class FaultyFileStore(FileStore):
    # the compiled in-place write writes without pwritev: the engine merges in
    # Python instead, so every write passes through here
    merge_write = None

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
