"""The FUSE tree of a served pool.

    /<volume>/volume.img               live volume (read-write unless served read-only)
    /<volume>/snapshots/<name>.img     every snapshot, read-only

Every lookup asks the pool, so snapshots appear and disappear as they are created
and deleted (the kernel is told not to cache entries). Data goes straight to the
engine: the images are opened with direct I/O, so there is no second page cache,
and fsync/flush reach `vol.flush()` (a FUSE fsync answered with ENOSYS would be
dropped by the kernel forever after, which would break every barrier above us).
"""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import mfusepy
from mfusepy import FuseOSError

from ..errors import BlocksnapError, CorruptionError, OutOfSpace
from .fast import FastPath, available
from .write_behind import SpaceGuard, VolumeQueue, Writeback

log = logging.getLogger("blocksnap.fuse")

VOLUME_FILE = "volume.img"
SNAP_DIR = "snapshots"
SNAP_SUFFIX = ".img"
MAX_WRITE = 1 << 20
LEASE_MAX = 128 << 10   # requests after which blocks are leased to the compiled path (random I/O)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fuse_errors(fn: Callable) -> Callable:
    """Engine errors become errnos (OutOfSpace -> ENOSPC, CorruptionError -> EIO...)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BlocksnapError as e:
            if isinstance(e, CorruptionError):
                log.error("%s: %s", fn.__name__, e)
            elif isinstance(e, OutOfSpace):
                log.warning("%s: %s", fn.__name__, e)
            else:
                log.debug("%s: %s", fn.__name__, e)
            raise FuseOSError(e.errno) from None

    return wrapper


@dataclass
class Handle:
    """One open image: the engine object and what the opener may do with it."""

    volume: str
    snapshot: str | None
    obj: Any  # a volume, or a Snapshot
    writable: bool
    image: int | None = None   # the engine's direct image (engine/direct.py), if it serves one
    key: tuple[str, str | None] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.volume, self.snapshot)


class BlocksnapFS(mfusepy.Operations):
    """mfusepy operations over an open Pool; thread-safe through the pool's lock.

    `write_behind` False sends every write to the engine before it is acknowledged,
    without the queue (BLOCKSNAP_WRITE_BEHIND=off, which the daemon passes on).
    `fast_io` False keeps every request on the Python path (BLOCKSNAP_FAST_IO=off);
    else small reads and in-place writes of leased blocks are served by compiled
    callbacks (fuse/fast.py, engine/direct.py).
    """

    use_ns = True

    def __init__(self, pool: Any, *, read_only: bool = False, allow_other: bool = False,
                 on_init: Callable[[], None] | None = None, max_write: int = MAX_WRITE,
                 write_behind: bool = True, fast_io: bool = True):
        self.pool = pool
        self.read_only = read_only
        self.on_init = on_init
        self.max_write = max_write
        self.uid, self.gid = os.getuid(), os.getgid()
        share = 0o055 if allow_other else 0  # others get r-x / r-- only when asked
        self.dir_mode = stat.S_IFDIR | 0o700 | share
        self.ro_mode = stat.S_IFREG | 0o400 | (0o044 if allow_other else 0)
        self.rw_mode = stat.S_IFREG | 0o600 | (0o044 if allow_other else 0)
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, str] = {}
        self._ids = itertools.count(1)
        self.open_count: Counter[tuple[str, str | None]] = Counter()
        self.write_blocked: set[str] = set()   # live images nobody may open to write
        self.mtime: dict[str, int] = {}
        self.started = time.time_ns()
        self.initialized = threading.Event()
        self._commit_soon = threading.Event()
        self._closing = False
        self.queues: dict[str, VolumeQueue] = {}   # write-behind, per live image open to write
        self._queues_lock = threading.Lock()
        self.write_behind = write_behind
        self.space_guard = SpaceGuard(pool.free_bytes)
        self.writeback: Writeback | None = None   # started with the first queue
        self._queues_closed = False
        self.hydration: Any = None   # recovery.hydrate_state.Hydrations (the daemon's): instant recovery
        self.fast = FastPath(pool.direct) if fast_io and available(pool.direct) else None

    # -- what other parts of the daemon ask --------------------------------------
    def in_use(self, volume: str, snapshot: str | None = None) -> int:
        """Open handles on the live image (snapshot None) or on one snapshot image."""
        with self.pool.lock:
            return self.open_count.get((volume, snapshot), 0)

    def volume_in_use(self, volume: str) -> int:
        """Open handles on the volume or any of its snapshots (for volume delete)."""
        with self.pool.lock:
            return sum(n for (v, _), n in self.open_count.items() if v == volume)

    def drain(self, volume: str | None = None) -> None:
        """Every write acknowledged so far (to `volume`, or to any) reaches the engine.

        Called before any daemon operation, without the pool lock (the queue's worker
        needs it).
        """
        for name, q in list(self.queues.items()):
            if volume is None or name == volume:
                q.drain()

    def _queue(self, h: Handle) -> VolumeQueue | None:
        """The volume's queue, None once the daemon is shutting down (writes then
        go to the engine directly). It lives as long as the daemon, so no write can
        slip between a queue that is closing and a new one; a queue of a volume
        deleted since (empty: the delete drained it) gives way to a new one."""
        q = self.queues.get(h.volume)
        if q is None or q.vol is not h.obj:
            with self._queues_lock:
                if self._queues_closed:
                    return None
                q = self.queues.get(h.volume)
                if q is not None and q.vol is not h.obj:
                    q.close()
                    q = None
                if q is None:
                    if self.writeback is None:
                        self.writeback = Writeback(self.pool.start_writeback)
                    q = self.queues[h.volume] = VolumeQueue(h.obj, self.space_guard, self.writeback)
                    q.on_pending = functools.partial(self._pending, h.volume)
                    with q.cond:
                        q.announce()
        return q

    def _pending(self, volume: str, ranges: list[tuple[int, int]], error: bool) -> None:
        """The volume's queue holds data for these ranges (or an error waits): direct
        requests there (everywhere, on an error) take the Python path."""
        for image in {h.image for h in list(self.handles.values())
                      if h.image is not None and h.snapshot is None and h.volume == volume}:
            self.pool.direct.set_queued(image, ranges, error)

    def _lease(self, h: Handle, offset: int, end: int) -> None:
        """After the Python path served a small request: its leaf goes to the
        compiled path (not while the queue has an error to report, nor while
        hydrating; queued ranges stay Python's: set_queued)."""
        if h.image is None or end - offset > LEASE_MAX:
            return
        if h.snapshot is None:
            q = self.queues.get(h.volume)
            if (q is not None and q.error is not None) or (self.hydration is not None
                                                           and self.hydration.active(h.obj)):
                return
        with self.pool.lock:
            self.pool.direct.grant(h.image, offset, end)

    def close_queues(self) -> None:
        """Drain and stop every queue; later writes go to the engine directly."""
        with self._queues_lock:
            self._queues_closed = True
            queues, self.queues = list(self.queues.values()), {}
            writeback, self.writeback = self.writeback, None
        for q in queues:
            q.close()
        if writeback is not None:
            writeback.close()

    def _settle(self, h: Handle) -> None:
        """Before a flush: the queue drained, and an error it met reported (once)."""
        q = self.queues.get(h.volume)
        if q is not None:
            q.drain()
            if h.writable:
                q.take_error()

    # -- paths -----------------------------------------------------------------
    @staticmethod
    def _split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _lookup(self, path: str) -> tuple[str, Any, Any]:
        """(kind, volume, snapshot-or-None) for a path; ENOENT for anything else."""
        parts = self._split(path)
        try:
            if not parts:
                return "root", None, None
            vol = self.pool.volume(parts[0])
            if len(parts) == 1:
                return "voldir", vol, None
            if len(parts) == 2 and parts[1] == VOLUME_FILE:
                return "volimg", vol, None
            if len(parts) == 2 and parts[1] == SNAP_DIR:
                return "snapdir", vol, None
            if len(parts) == 3 and parts[1] == SNAP_DIR and parts[2].endswith(SNAP_SUFFIX):
                return "snapimg", vol, vol.get_snapshot(parts[2][:-len(SNAP_SUFFIX)])
        except BlocksnapError:
            pass
        raise FuseOSError(errno.ENOENT)

    def _dir(self, nlink: int, mtime: int) -> dict[str, int]:
        return {"st_mode": self.dir_mode, "st_nlink": nlink, "st_uid": self.uid, "st_gid": self.gid,
                "st_size": 0, "st_mtime": mtime, "st_ctime": mtime, "st_atime": mtime}

    def _file(self, mode: int, size: int, blksize: int, mtime: int) -> dict[str, int]:
        return {"st_mode": mode, "st_nlink": 1, "st_uid": self.uid, "st_gid": self.gid,
                "st_size": size, "st_blocks": -(-size // 512), "st_blksize": blksize,
                "st_mtime": mtime, "st_ctime": mtime, "st_atime": mtime}

    # -- metadata --------------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path is None:  # fstat of an open file (nullpath_ok): the handle knows
            h = self._handle(fh or 0)
            vol = self.pool.volume(h.volume)
            kind, snap = ("volimg", None) if h.snapshot is None else ("snapimg", h.obj)
        else:
            kind, vol, snap = self._lookup(path)
        if kind == "root":
            return self._dir(2 + len(self.pool.volumes()), self.started)
        created = int(vol.created * 1e9)
        if kind == "voldir":
            return self._dir(3, created)
        if kind == "snapdir":
            return self._dir(2, created)
        if kind == "volimg":
            mode = self.ro_mode if self.read_only else self.rw_mode
            mtime = self.mtime.get(vol.name, created)
            if self.fast is not None:
                mtime = max(mtime, self.pool.direct.last_write_ns(vol.name))
            return self._file(mode, vol.size, vol.block_size, mtime)
        return self._file(self.ro_mode, snap.size, vol.block_size, int(snap.created * 1e9))

    def opendir(self, path: str) -> int:
        """Remember the path: with nullpath_ok, readdir gets none."""
        kind, _, _ = self._lookup(path)
        if kind not in ("root", "voldir", "snapdir"):
            raise FuseOSError(errno.ENOTDIR)
        fh = next(self._ids)
        self.dirs[fh] = path
        return fh

    def releasedir(self, path: str | None, fh: int) -> int:
        self.dirs.pop(fh, None)
        return 0

    def readdir(self, path: str | None, fh: int) -> list[str]:
        kind, vol, _ = self._lookup(path if path is not None else self.dirs.get(fh, "/"))
        if kind == "root":
            return [".", ".."] + [v.name for v in self.pool.volumes()]
        if kind == "voldir":
            return [".", "..", VOLUME_FILE, SNAP_DIR]
        if kind == "snapdir":
            try:
                return [".", ".."] + [s.name + SNAP_SUFFIX for s in vol.snapshots()]
            except BlocksnapError:
                raise FuseOSError(errno.ENOENT) from None
        raise FuseOSError(errno.ENOTDIR)

    @fuse_errors
    def statfs(self, path: str) -> dict[str, int]:
        st = self.pool.status()
        bs = 4096  # also the loop device's discard granularity
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": st["size"] // bs,
                "f_bfree": st["free"] // bs, "f_bavail": st["free"] // bs,
                "f_files": 0, "f_ffree": 0, "f_namemax": 255}

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if path is None:  # ftruncate (nullpath_ok)
            h = self._handle(fh or 0)
            kind, vol = ("volimg" if h.snapshot is None else "snapimg"), self.pool.volume(h.volume)
        else:
            kind, vol, _ = self._lookup(path)
        if kind == "snapimg" or (kind == "volimg" and self.read_only):
            raise FuseOSError(errno.EROFS)
        if kind != "volimg":
            raise FuseOSError(errno.EISDIR)
        if length != vol.size:  # a disk does not change size: use `volume resize`
            raise FuseOSError(errno.EPERM)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._lookup(path)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EPERM)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise FuseOSError(errno.EPERM)

    def _fixed_tree(self, *args: Any) -> int:
        """The tree mirrors the pool: files come and go with volumes and snapshots only
        (EPERM, not the ENOSYS a missing handler would give)."""
        raise FuseOSError(errno.EPERM)

    create = mkdir = rmdir = unlink = rename = symlink = link = mknod = _fixed_tree

    # -- open files ------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        with self.pool.lock:
            kind, vol, snap = self._lookup(path)
            if kind not in ("volimg", "snapimg"):
                raise FuseOSError(errno.EISDIR)
            if writing and (kind == "snapimg" or self.read_only):
                raise FuseOSError(errno.EROFS)
            if writing and vol.name in self.write_blocked:
                raise FuseOSError(errno.EBUSY)   # a receive is writing it
            h = Handle(vol.name, snap.name if snap is not None else None,
                       vol if snap is None else snap, writing)
            fh = next(self._ids)
            self.handles[fh] = h
            self.open_count[h.key] += 1
            if self.fast is not None:
                h.image = self.pool.direct.open_image(h.obj, snap is not None)
                if h.image is not None:
                    q = self.queues.get(h.volume) if snap is None else None
                    if q is not None:
                        with q.cond:
                            q.announce()
                    self.fast.register(fh, h.image, writing)
        log.debug("open %s fh=%d %s", path, fh, "rw" if writing else "ro")
        return fh

    def release(self, path: str | None, fh: int) -> int:
        last_writer = False
        with self.pool.lock:
            h = self.handles.pop(fh, None)
            if h is not None and h.image is not None:
                self.fast.unregister(fh)
                self.pool.direct.close_image(h.image)
            if h is not None:
                self.open_count[h.key] -= 1
                if self.open_count[h.key] <= 0:
                    del self.open_count[h.key]
                last_writer = h.writable and not any(
                    o.writable and o.key == h.key for o in self.handles.values())
        q = self.queues.get(h.volume) if last_writer else None
        if q is not None:
            q.trim()
        return 0

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FuseOSError(errno.EBADF) from None

    @fuse_errors
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """mfusepy's plain read (our FUSE class calls read_into instead)."""
        buf = bytearray(size)
        return bytes(buf[:self.read_into(path, memoryview(buf), offset, fh)])

    @fuse_errors
    def read_into(self, path: str | None, out: memoryview, offset: int, fh: int) -> int:
        """What the kernel reads, straight into libfuse's buffer: bytes delivered."""
        h = self._handle(fh)
        obj = h.obj
        end = min(offset + len(out), obj.size)
        if offset >= end:
            return 0
        q = self.queues.get(h.volume) if h.snapshot is None else None
        if q is not None and q.overlaps(offset, end):
            q.drain()
        if self.hydration is not None and h.snapshot is None:
            self.hydration.before_read(obj, offset, end)   # blocks not local yet, from the backup
        obj.read_into(offset, out[:end - offset])
        if h.image is not None:
            self._lease(h, offset, end)
        return end - offset

    @fuse_errors
    def write(self, path: str | None, data: Any, offset: int, fh: int) -> int:
        h = self._handle(fh)
        if not h.writable:
            raise FuseOSError(errno.EBADF)
        vol = h.obj
        room = vol.size - offset
        if room <= 0:
            raise FuseOSError(errno.ENOSPC)  # past the end of a disk
        n = min(len(data), room)
        # queued where the engine's work per request is heavy: ROW, and COW with
        # snapshots to copy blocks out for (a plain COW write is one pwrite: direct)
        data = data[:n] if n < len(data) else data
        if self.hydration is not None and self.hydration.write(vol, offset, data):
            self.mtime[h.volume] = time.time_ns()   # hydrating from a backup: written by its hook, directly
            return n
        q = self._queue(h)
        if q is None:
            vol.write(offset, data)
        else:
            q.write(offset, data, queue=self.write_behind and (vol.mode == "row" or bool(vol.snapshot_rows)))
        self.mtime[h.volume] = time.time_ns()
        if h.image is not None:
            self._lease(h, offset, offset + n)
        return n

    @fuse_errors
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        h = self._handle(fh)
        if h.snapshot is None:
            self._settle(h)
            h.obj.flush()
        return 0

    @fuse_errors
    def flush(self, path: str | None, fh: int) -> int:
        h = self._handle(fh)
        if h.writable:
            self._settle(h)
            h.obj.flush()
        return 0

    @fuse_errors
    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fh: int) -> int:
        """PUNCH_HOLE (discard, fstrim) and ZERO_RANGE unmap blocks; reads give zeros."""
        h = self._handle(fh)
        if not h.writable:
            raise FuseOSError(errno.EBADF)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FuseOSError(errno.EOPNOTSUPP)
        vol = h.obj
        end = min(offset + length, vol.size)
        self.drain(h.volume)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            if offset < end:
                if self.hydration is None or not self.hydration.discard(vol, offset, end - offset):
                    vol.discard(offset, end - offset)
                self.mtime[h.volume] = time.time_ns()
                self._commit_soon.set()  # freed blocks return to the pool on commit
            return 0
        if offset + length > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise FuseOSError(errno.EOPNOTSUPP)  # the image cannot grow
        return 0  # thin volumes allocate on write: nothing to reserve

    # -- lifecycle -------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        """1 MiB requests, direct I/O, no entry caching (live listing), no path lookups."""
        if conn_info is not None:
            conn_info.max_write = self.max_write
            conn_info.max_background = 64
            conn_info.congestion_threshold = 48
        if config_3 is not None:
            config_3.direct_io = 1
            config_3.entry_timeout = 0.0
            config_3.negative_timeout = 0.0
            config_3.attr_timeout = 1.0
            config_3.nullpath_ok = 1
        threading.Thread(target=self._background, name="discard-commit", daemon=True).start()
        self.initialized.set()
        log.info("FUSE initialised (max_write %d)", self.max_write)
        if self.on_init is not None:
            self.on_init()

    def _background(self, delay: float = 0.5) -> None:
        """Commit shortly after discards (fstrim sends no flush), batching a burst.

        Writeback of the data store is started by write_behind.Writeback, every
        32 MiB written through any image.
        """
        while not self._closing:
            if not self._commit_soon.wait(1.0):
                continue
            time.sleep(delay)
            self._commit_soon.clear()
            try:
                with self.pool.lock:
                    if self.pool.closed:
                        return
                    self.pool.commit()
            except Exception:
                log.exception("background commit failed")

    def destroy(self, path: str) -> None:
        self._closing = True
        self.close_queues()
        if self.fast is not None:
            self.fast.close()
        log.info("FUSE session ends")
