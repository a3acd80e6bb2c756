"""Instant recovery, the pool's side: which blocks of a hydrating volume are pending,
filling them without ever overwriting a guest's write, and the FUSE hooks.

A volume restored with `volume create --from-backup` holds, in its info
(`extra["hydration"]`), which backup it comes from; `<pool>/hydrate/<name>.runs`
(npz: the manifest's `starts`, `counts`) says which blocks the backup stores.

    pending(b)  <=>  the backup stores b  AND  the live map has a hole at b  AND  b is not "zeroed"

"Zeroed" blocks are those a guest (or a fill) left as a hole although the backup
stores them: an all-zero write, a discard. They are appended to
`<pool>/hydrate/<name>.zeroed` (pairs of int64: first block, count) and fsynced
before the write that made the hole returns, under the volume's hydration lock, so
the backup's data never comes back over a guest's zeros. Fills (`fill`) check
"still pending" and write under the same lock: a guest write is never overwritten.
No password here: blocks a reader needs now come from the hydrator's socket
(`<pool>/hydrate/<name>.sock`, recovery/hydrate.py), which holds it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..engine import mask_runs
from ..errors import BlocksnapError, Busy, CorruptionError

log = logging.getLogger("blocksnap.hydrate")
DIR = "hydrate"
URGENT_TIMEOUT = 30.0       # seconds a reader waits for blocks from the hydrator
MAX_REQUEST = 256           # blocks in one request to the hydrator


class Unavailable(CorruptionError):
    """A pending block could not be had from the repository (EIO to the reader)."""


def hydrate_dir(pool_path: str) -> str:
    return os.path.join(pool_path, DIR)


def paths(pool_path: str, name: str) -> dict[str, str]:
    d = hydrate_dir(pool_path)
    return {k: os.path.join(d, f"{name}.{k}") for k in ("runs", "zeroed", "sock", "pid", "log")}


def save_runs(pool_path: str, name: str, starts: np.ndarray, counts: np.ndarray) -> None:
    """Written (and fsynced) before the volume says it hydrates."""
    os.makedirs(hydrate_dir(pool_path), mode=0o700, exist_ok=True)
    p = paths(pool_path, name)["runs"]
    with open(p + ".tmp", "wb") as f:
        np.savez(f, starts=np.asarray(starts, np.int64), counts=np.asarray(counts, np.int64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(p + ".tmp", p)


def remove_files(pool_path: str, name: str) -> None:
    for k, p in paths(pool_path, name).items():
        if k not in ("sock", "log", "pid"):
            for q in (p, p + ".tmp"):
                if os.path.exists(q):
                    os.unlink(q)


class Hydration:
    """One hydrating volume: its pending set and the lock every change of it takes."""

    def __init__(self, pool_path: str, vol: Any):
        self.pool_path, self.vol, self.name = pool_path, vol, vol.name
        self.info = dict(vol.extra["hydration"])
        self.paths = paths(pool_path, self.name)
        with np.load(self.paths["runs"]) as z:
            self.starts, counts = z["starts"].astype(np.int64), z["counts"].astype(np.int64)
        self.ends = self.starts + counts
        self.total = int(counts.sum())
        self.zeroed = np.zeros(vol.nblocks, bool)
        if os.path.exists(self.paths["zeroed"]):
            pairs = np.fromfile(self.paths["zeroed"], np.int64)
            for a, n in pairs[:len(pairs) // 2 * 2].reshape(-1, 2):
                self.zeroed[a:a + n] = True
        self.lock = threading.RLock()
        self.outage: str | None = None    # set while blocks cannot be had: logged once

    # -- the pending set ----------------------------------------------------------
    def stored(self, b0: int, b1: int) -> np.ndarray:
        """Which blocks of [b0, b1) the backup stores."""
        blocks = np.arange(b0, b1, dtype=np.int64)
        r = np.searchsorted(self.starts, blocks, side="right") - 1
        ok = r >= 0
        ok[ok] = blocks[ok] < self.ends[r[ok]]
        return ok

    def pending(self, b0: int, b1: int) -> np.ndarray:
        b1 = min(b1, self.vol.nblocks)
        if b0 >= b1:
            return np.zeros(0, bool)
        return self.stored(b0, b1) & ~self.vol.mapped(b0, b1 - b0) & ~self.zeroed[b0:b1]

    def pending_runs(self, limit: int, start: int = 0) -> tuple[list[list[int]], int]:
        """Up to `limit` pending blocks from block `start` on, as [first, count] runs,
        and how many are pending (all of them when limit is 0; else only those seen)."""
        out: list[list[int]] = []
        taken = left = 0
        first = max(0, int(np.searchsorted(self.ends, start, side="right")))
        for s, e in zip(self.starts[first:].tolist(), self.ends[first:].tolist()):
            if limit and taken >= limit:
                break
            for a in range(max(s, start), e, 1 << 16):   # a piece at a time: no array as long as the volume
                z = min(e, a + (1 << 16))
                m = self.pending(a, z)
                left += int(m.sum())
                if (limit and taken >= limit) or not m.any():
                    continue
                for lo, count in mask_runs(m):
                    n = min(count, limit - taken) if limit else 0
                    if n > 0:
                        out.append([a + lo, n])
                        taken += n
        return out, left

    def _mark_zeroed(self, b0: int, b1: int, only: np.ndarray | None = None) -> None:
        """Blocks of [b0, b1) (those `only` marks) the backup stores that are holes now
        (and not yet recorded) are recorded, durably, before the caller's write returns."""
        b1 = min(b1, self.vol.nblocks)
        if b0 >= b1:
            return
        m = self.stored(b0, b1) & ~self.vol.mapped(b0, b1 - b0) & ~self.zeroed[b0:b1]
        if only is not None:
            m &= only[:b1 - b0]
        if not m.any():
            return
        pairs = np.array([(b0 + lo, n) for lo, n in mask_runs(m)], np.int64)
        fd = os.open(self.paths["zeroed"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, pairs.tobytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.zeroed[b0:b1] |= m

    # -- filling ------------------------------------------------------------------
    def fill(self, blocks: list[int], data: bytes | memoryview) -> int:
        """Write the backup's blocks that are still pending (the others are skipped:
        a guest wrote them, or an earlier fill did): how many were written."""
        bs = self.vol.block_size
        mv = memoryview(data)
        written = 0
        with self.lock:
            if not blocks:
                return 0
            lo, hi = min(blocks), max(blocks) + 1
            pend = self.pending(lo, hi)
            i = 0
            while i < len(blocks):          # runs of consecutive pending blocks: one write each
                j = i
                while pend[blocks[j] - lo] and j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 \
                        and pend[blocks[j + 1] - lo]:
                    j += 1
                if pend[blocks[i] - lo]:
                    b = blocks[i]
                    end = min((j - i + 1) * bs, self.vol.size - b * bs)
                    self.vol.write(b * bs, mv[i * bs:i * bs + end])
                    written += j - i + 1
                i = j + 1
            # a stored block of zeros is a hole: done all the same (only this batch's blocks:
            # the others of [lo, hi) may come in a later batch)
            mine = np.zeros(hi - lo, bool)
            mine[np.asarray(blocks, np.int64) - lo] = True
            self._mark_zeroed(lo, hi, mine)
        return written

    def fetch(self, blocks: list[int]) -> None:
        """Have the pending ones of these blocks filled now, from the hydrator; an
        Unavailable error (EIO) if it cannot give them (logged once per outage)."""
        bs = self.vol.block_size
        for i in range(0, len(blocks), MAX_REQUEST):
            part = blocks[i:i + MAX_REQUEST]
            try:
                data = self._ask(part, bs)
            except (OSError, ValueError, BlocksnapError) as e:
                why = str(e) or type(e).__name__
                if self.outage is None:
                    log.error("volume %s: block %d is not local yet and cannot be read from backup %s in %s: %s "
                              "(reads of such blocks fail with EIO until it is reachable again; writes go on)",
                              self.name, part[0], self.info.get("backup"), self.info.get("repo"), why)
                self.outage = why
                raise Unavailable(f"volume {self.name}: block {part[0]} is not local yet and the backup "
                                  f"cannot be read: {why}") from None
            if self.outage is not None:
                log.info("volume %s: the backup can be read again", self.name)
                self.outage = None
            self.fill(part, data)

    def _ask(self, blocks: list[int], bs: int) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(URGENT_TIMEOUT)
            try:
                s.connect(self.paths["sock"])
            except (FileNotFoundError, ConnectionRefusedError):
                raise OSError(errno.ENOTCONN, "its hydrator is not running (start it with "
                              f"`blocksnap volume hydrate {self.name}`)") from None
            s.sendall(json.dumps({"blocks": blocks}).encode() + b"\n")
            f = s.makefile("rb")
            head = json.loads(f.readline() or b"{}")
            if "error" in head:
                raise BlocksnapError(head["error"])
            if head.get("ok") != len(blocks):
                raise OSError(errno.EPROTO, "the hydrator's answer was cut short")
            data = f.read(len(blocks) * bs)
            if len(data) != len(blocks) * bs:
                raise OSError(errno.EPROTO, "the hydrator's answer was cut short")
            return data

    # -- guest I/O (FUSE) ---------------------------------------------------------
    def before_read(self, offset: int, end: int) -> None:
        bs = self.vol.block_size
        b0, b1 = offset // bs, -(-end // bs)
        m = self.pending(b0, b1)
        if m.any():
            self.fetch((np.flatnonzero(m) + b0).tolist())

    def write(self, offset: int, data: Any) -> None:
        """A partial write to a pending block needs the block first (read-modify-
        write); a whole one does not. Holes it makes in stored blocks: zeroed."""
        self._change(offset, len(data), lambda: self.vol.write(offset, data))

    def discard(self, offset: int, length: int) -> None:
        """Whole blocks become holes (recorded zeroed); a partial edge is zeroed
        in a block fetched first, so the rest of it stays the backup's."""
        self._change(offset, length, lambda: self.vol.discard(offset, length))

    def _change(self, offset: int, length: int, apply: Any) -> None:
        bs = self.vol.block_size
        end = offset + length
        b0, b1 = offset // bs, -(-end // bs)
        with self.lock:
            edges = {b for b in (b0, b1 - 1) if (b * bs < offset or min((b + 1) * bs, self.vol.size) > end)}
            need = [b for b in sorted(edges) if self.pending(b, b + 1).any()]
            if need:
                self.fetch(need)
            apply()
            self._mark_zeroed(b0, b1)


class Hydrations:
    """The pool's hydrating volumes, found from their info (so a daemon restarted
    after kill -9 knows them): the FUSE hooks and the hydration ops use this."""

    def __init__(self, pool: Any):
        self.pool = pool
        self._by_name: dict[str, Hydration] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Hydration | None:
        try:
            vol = self.pool.volume(name)
        except BlocksnapError:
            return None
        h = self._by_name.get(name)
        if h is not None and h.vol is vol and vol.extra.get("hydration", {}).get("state") == "hydrating":
            return h
        if vol.extra.get("hydration", {}).get("state") != "hydrating":
            self._by_name.pop(name, None)
            return None
        with self._lock:
            h = self._by_name.get(name)
            if h is None or h.vol is not vol:
                h = self._by_name[name] = Hydration(self.pool.path, vol)
            return h

    def require(self, name: str) -> Hydration:
        h = self.get(name)
        if h is None:
            raise Busy(f"volume {name} is not hydrating from a backup")
        return h

    # -- the hooks BlocksnapFS calls (False/None: not hydrating, do as usual) ---------
    def active(self, vol: Any) -> bool:
        """Is `vol` hydrating (so no block of it may be served past these hooks)?"""
        return _hydrating(vol)

    def before_read(self, vol: Any, offset: int, end: int) -> None:
        h = self.get(vol.name) if _hydrating(vol) else None
        if h is not None:
            _eio(h.before_read, offset, end)

    def write(self, vol: Any, offset: int, data: Any) -> bool:
        h = self.get(vol.name) if _hydrating(vol) else None
        if h is None:
            return False
        _eio(h.write, offset, data)
        return True

    def discard(self, vol: Any, offset: int, length: int) -> bool:
        h = self.get(vol.name) if _hydrating(vol) else None
        if h is None:
            return False
        _eio(h.discard, offset, length)
        return True

    def done(self, name: str) -> dict:
        """Hydration over: flushed first, then the info says so (a crash between
        leaves it hydrating with nothing pending: the next hydrator finishes it)."""
        h = self.require(name)
        with h.lock:
            _, left = h.pending_runs(0)
            if left:
                raise Busy(f"volume {name}: {left} block(s) still pending")
            h.vol.flush()
            info = dict(h.info, state="done", finished=time.time())
            h.vol.update_extra({"hydration": info})
            self._by_name.pop(name, None)
        remove_files(self.pool.path, name)
        log.info("volume %s: hydrated from backup %s; it no longer needs the repository", name, info.get("backup"))
        return info


def _hydrating(vol: Any) -> bool:
    return vol.extra.get("hydration", {}).get("state") == "hydrating"


def _eio(fn: Any, *args: Any) -> None:
    """Unavailable blocks are EIO to the reader, already logged (once per outage)."""
    from mfusepy import FuseOSError
    try:
        fn(*args)
    except Unavailable:
        raise FuseOSError(errno.EIO) from None


_REGISTRY: "weakref.WeakKeyDictionary[Any, Hydrations]" = weakref.WeakKeyDictionary()
_REG_LOCK = threading.Lock()


def hydrations(pool: Any) -> Hydrations:
    with _REG_LOCK:
        h = _REGISTRY.get(pool)
        if h is None:
            h = _REGISTRY[pool] = Hydrations(pool)
        return h


def progress(pool: Any, name: str) -> dict | None:
    """The `hydration` entry of `volume show`: what, from where, how far."""
    vol = pool.volume(name)
    info = vol.extra.get("hydration")
    if not info:
        return None
    out = dict(info)
    h = hydrations(pool).get(name)
    if h is not None:
        _, left = h.pending_runs(0)
        out.update(blocks=h.total, pending=left, local_bytes=(h.total - left) * vol.block_size,
                   percent=round(100.0 * (h.total - left) / h.total, 1) if h.total else 100.0,
                   hydrator_running=os.path.exists(h.paths["sock"]) and _answers(h.paths["sock"]))
    return out


def _answers(sock_path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(sock_path)
            s.sendall(b'{"ping": true}\n')
            return bool(s.makefile("rb").readline())
        except OSError:
            return False
