"""The pool: one directory with the catalog, a lock and the data store.

Only one process opens a pool (flock on `lock`); inside it, one re-entrant lock
serialises engine calls so the FUSE threads can share it. The pool owns the
registry of its volumes: creating, cloning, importing and deleting a volume happen
here and nowhere else, and everything outside reads it through volume(),
volumes() and has_volume().
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from typing import Callable

import numpy as np

from ..errors import AlreadyExists, Busy, InvalidArgument, NotAPool, NotFound
from ..store import FileStore, device_size, start_writeback
from ..units import DEFAULT_BLOCK_SIZE, validate_block_size, validate_name
from .catalog import Catalog, SnapshotRow, VolumeRow
from .check import check_pool
from .direct import DirectAccess, new_lock
from .inplace import InPlaceLog
from .job_log import JobLog
from .layout import DATA_MAGIC, FORMAT_VERSION, HEADER_UNITS, UNIT
from .pages import PagePool
from .partial import PartialBlocks
from .radix import Maps, levels_for
from .rebuild import rebuild_refcounts
from .snapshot import Snapshot
from .space import Space
from .transfer import import_image
from .volume_base import VolumeBase
from .volumes import build_volume

CATALOG = "catalog.db"
DATA = "data"
LOCK = "lock"
INPLACE = "inplace"     # engine/inplace.py: regions written in place since a commit
MIN_POOL_SIZE = 16 << 20


class Pool:
    """Open with `Pool.create(path)` or `Pool.open(path)`; use as a context manager."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.lock = new_lock()   # (shared with the direct path: engine/direct.py)
        self._volumes: dict[str, VolumeBase] = {}
        self.closed = False
        self.reclaimed_on_open: dict[str, int] = {}
        self.read_only = False
        self.commit_epoch = 0
        self.partial = PartialBlocks()   # fresh blocks written in part (ROW writes)
        self._readers: dict[int, int] = {}
        self._quarantine: list[tuple[int, list[tuple[np.ndarray, int]]]] = []

    # -- creation and opening ---------------------------------------------
    @classmethod
    def create(cls, path: str, data: str | None = None, size: int | None = None) -> "Pool":
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, CATALOG)):
            raise AlreadyExists(f"{path}: already a blocksnap pool")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise InvalidArgument(f"{path}: exists and is not an empty directory")
        if data is not None:
            data = os.path.abspath(data)
            if not os.path.exists(data) and size is None:
                raise NotFound(f"{data}: no such file or device; an image file is made only when "
                               "a size is given", param="size")
        if size is not None and size < MIN_POOL_SIZE:
            raise InvalidArgument(f"pool size {size} is too small: at least 16M")
        created_dir = not os.path.exists(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            data_path = data or os.path.join(path, DATA)
            if data is None and size is None:
                st = os.statvfs(path)
                size = st.f_blocks * st.f_frsize  # thin: a sparse file as large as the host fs
            store = FileStore(data_path, create_size=size)
            if store.size < MIN_POOL_SIZE:
                store.close()
                raise InvalidArgument(f"{data_path}: {store.size} bytes is too small for a pool (16M at least)")
            pool_id = str(uuid.uuid4())
            header = DATA_MAGIC + pool_id.encode()
            store.pwrite(header.ljust(UNIT, b"\0"), 0)
            store.sync()
            usable = store.size if size is None or store.is_device else min(size, store.size)
            store.close()
            cat = Catalog(os.path.join(path, CATALOG))
            cat.commit(meta={"format": str(FORMAT_VERSION), "uuid": pool_id, "data": data_path,
                             "data_size": str(usable), "created": repr(time.time())})
            cat.close()
        except BaseException:
            for name in (CATALOG, CATALOG + "-wal", CATALOG + "-shm", DATA):
                try:
                    os.unlink(os.path.join(path, name))
                except FileNotFoundError:
                    pass
            if created_dir:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str, *, wait: float = 0.0) -> "Pool":
        pool = cls(path)
        pool._open(wait)
        return pool

    def _open(self, wait: float) -> None:
        cat_path = os.path.join(self.path, CATALOG)
        if not os.path.isfile(cat_path):
            raise NotAPool(f"{self.path}: not a blocksnap pool (run 'blocksnap pool init' first)")
        self._lockfd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._lockfd, 32, 0).decode(errors="replace").strip()
                    os.close(self._lockfd)
                    raise Busy(f"{self.path}: pool is in use by another process"
                               + (f" (pid {holder})" if holder else "")) from None
                time.sleep(0.05)
        os.ftruncate(self._lockfd, 0)
        os.pwrite(self._lockfd, str(os.getpid()).encode(), 0)
        try:
            self._load(cat_path)
        except BaseException:
            os.close(self._lockfd)
            raise

    def _load(self, cat_path: str) -> None:
        self.catalog = Catalog(cat_path)
        self.jobs = JobLog(self.catalog, self.lock)   # the agent's job history
        meta = self.catalog.meta()
        if meta.get("format") != str(FORMAT_VERSION):
            raise NotAPool(f"{self.path}: unsupported pool format {meta.get('format')!r}")
        self.uuid = meta["uuid"]
        self.data_path = meta["data"]
        self.store = FileStore(self.data_path)
        header = self.store.pread(UNIT, 0)
        if not header.startswith(DATA_MAGIC + self.uuid.encode()):
            self.store.close()
            raise NotAPool(f"{self.data_path}: data store does not belong to pool {self.path}")
        self.data_size = min(int(meta["data_size"]), self.store.size)
        self.pages = PagePool()
        self.maps = Maps(self.pages)
        self.space = Space(self.data_size // UNIT)
        self.pages.on_blocks_released = self.space.decref
        self.pages.on_blocks_shared = self.space.incref
        for pid, kind, units, blob in self.catalog.pages():
            ptr, csum = PagePool.deserialize(kind, blob)
            self.pages.load(pid, kind, units, ptr, csum)
        self.direct = DirectAccess(self)   # leases for the compiled direct path
        vrows = self.catalog.volume_rows()
        srows = self.catalog.snapshot_rows()
        roots = [(v.root, v.levels) for v in vrows] + [(s.root, s.levels) for s in srows]
        report = rebuild_refcounts(self.pages, self.space, roots)
        self.reclaimed_on_open = report.reclaimed
        if report.unreachable_pages:
            # pages a crash left behind: delete them so ids are never used twice
            self.catalog.commit(freed_pages=report.unreachable_pages)
        self.check_report = report
        self.reclaimed_on_open["host_bytes"] = self._reclaim_host_space()
        by_vol: dict[str, list[SnapshotRow]] = {}
        for s in srows:
            by_vol.setdefault(s.volume, []).append(s)
        for v in vrows:
            self._volumes[v.name] = build_volume(self, v, by_vol.get(v.name, []))
        self._dirty_volumes: set[str] = set()
        self.inplace = InPlaceLog(os.path.join(self.path, INPLACE), FileStore)
        self.inplace.on_emptied = self.direct.revoke_all
        self.reclaimed_on_open["rehashed_blocks"] = self.inplace.recover(self)

    # -- context manager ----------------------------------------------------
    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                self.commit()
                self.inplace.committed(closing=True)
            finally:
                self.abandon()

    def abandon(self) -> None:
        """Drop the pool without committing, as a crash would (crash tests use it;
        close() ends with it after its commit)."""
        self.closed = True
        if hasattr(self, "direct"):
            self.direct.close()
        for v in self._volumes.values():
            v._close()
        self.store.close()
        if hasattr(self, "inplace"):
            self.inplace.close()
        self.catalog.close()
        os.close(self._lockfd)

    def _check_open(self) -> None:
        if self.closed:
            raise InvalidArgument("pool is closed")

    # -- transactions -------------------------------------------------------
    def mark_dirty(self, volume: str) -> None:
        self._dirty_volumes.add(volume)

    def commit(self, *, snapshots=(), deleted_snapshots=(), volumes=(), deleted_volumes=(),
               sync_origins: bool = True) -> None:
        """Make every completed write durable, then publish metadata atomically.

        Order: data store fsync -> origins fsync -> one SQLite transaction -> only then
        are blocks freed by this transaction handed back to the allocator.
        """
        with self.lock:
            self._check_open()
            self.direct.harvest()   # checksums direct writes changed: their pages are dirty
            pp = self.pages
            vols = {v.name: v for v in volumes}
            for name in self._dirty_volumes:
                if name in self._volumes and name not in vols:
                    vols[name] = self._volumes[name]
            snapshots = list(snapshots)
            for v in self._volumes.values():
                moved = v._dirty_snapshot_rows()
                known = {(r.volume, r.name) for r in snapshots}
                snapshots.extend(r for r in moved if (r.volume, r.name) not in known)
            nothing = not (pp.dirty or pp.freed or vols or snapshots or deleted_snapshots
                           or deleted_volumes or self.space.pending or self.space._fresh_list)
            if sync_origins:
                for v in self._volumes.values():
                    v._sync_origin()
            if nothing:
                return
            self.store.sync()
            page_rows = [(pid, int(pp.kind[pid]), int(pp.units[pid]), pp.serialize(pid))
                         for pid in sorted(pp.dirty)]
            self.catalog.commit(
                pages=page_rows, freed_pages=sorted(pp.freed - pp.dirty),
                volumes=[v.row() for v in vols.values()], deleted_volumes=deleted_volumes,
                snapshots=snapshots, deleted_snapshots=deleted_snapshots)
            pp.dirty.clear()
            pp.freed.clear()
            self._dirty_volumes.clear()
            self.commit_epoch += 1
            self._quarantine.append((self.commit_epoch, self.space.take_pending()))
            self.inplace.committed()
            self.partial.clear()
            self._release_quarantine()

    # -- readers outside the lock -------------------------------------------
    def reader_enter(self) -> int:
        """Called under the lock by a read that will do its I/O unlocked."""
        ep = self.commit_epoch
        self._readers[ep] = self._readers.get(ep, 0) + 1
        return ep

    def reader_exit(self, ep: int) -> None:
        with self.lock:
            n = self._readers[ep] - 1
            if n:
                self._readers[ep] = n
            else:
                del self._readers[ep]
            self._release_quarantine()

    def _release_quarantine(self) -> None:
        """Free blocks released by commits that every running reader started after.

        A read resolves its map under the lock and reads unlocked; a block it resolved
        may be released by a commit meanwhile, so it is not reusable until that read
        is over.
        """
        oldest = min(self._readers, default=None)
        keep = []
        for ep, released in self._quarantine:
            if oldest is not None and oldest < ep:
                keep.append((ep, released))
                continue
            for starts, units in released:
                self.space.mark(starts, units, False)
                self._punch(starts, units)
        self._quarantine = keep

    def quarantined(self) -> list[tuple[np.ndarray, int]]:
        """Units not free yet but referenced by no map: released while a read ran
        (check discounts them)."""
        return [item for _, released in self._quarantine for item in released]

    def _reclaim_host_space(self) -> int:
        """Punch out parts of a sparse data file that hold no referenced unit.

        After a crash, blocks written by the lost transaction still occupy host space.
        """
        if self.store.is_device:
            return 0
        fd, freed = self.store.fd, 0
        off = HEADER_UNITS * UNIT
        end = self.space.total * UNIT
        while off < end:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            except OSError:
                break
            if start >= end:
                break
            u0, u1 = start // UNIT, -(-stop // UNIT)
            free = ~self.space.used[u0:u1]
            m = np.concatenate(([False], free, [False])).astype(np.int8)
            d = np.diff(m)
            for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
                self.store.punch_hole((u0 + int(a)) * UNIT, int(b - a) * UNIT)
                freed += int(b - a) * UNIT
            off = stop
        return freed

    def _punch(self, starts: np.ndarray, units: int) -> None:
        if self.store.is_device or not len(starts):
            return
        s = np.sort(starts.astype(np.int64))
        breaks = np.flatnonzero(np.diff(s) != units) + 1
        for run in np.split(s, breaks):
            self.store.punch_hole(int(run[0]) * UNIT, len(run) * units * UNIT)

    # -- volumes ------------------------------------------------------------
    def create_volume(self, name: str, size: int | None = None, mode: str = "row",
                      block_size: int = DEFAULT_BLOCK_SIZE, origin: str | None = None) -> VolumeBase:
        validate_name(name, "volume name")
        validate_block_size(block_size)
        if mode not in ("row", "cow"):
            raise InvalidArgument(f"invalid mode {mode!r}: use row or cow")
        with self.lock:
            self._check_open()
            self._refuse_existing(name)
            if mode == "cow":
                if not origin:
                    raise InvalidArgument("a cow volume needs an origin image or device", param="origin")
                origin = os.path.abspath(origin)
                osize = device_size(origin)
                if size is not None and size != osize:
                    raise InvalidArgument(f"size {size} differs from the origin's size {osize}", param="size")
                size = osize
                if any(v.origin == origin for v in self._volumes.values()):
                    raise Busy(f"{origin} is already the origin of another volume")
            elif origin:
                raise InvalidArgument("an origin is only for cow volumes; import copies an image "
                                      "into a row volume", param="mode")
            if size is None:
                raise InvalidArgument("a volume needs a size", param="size")
            if size <= 0 or size % 512:
                raise InvalidArgument(f"invalid volume size {size}: must be a positive multiple of 512")
            nblocks = -(-size // block_size)
            row = VolumeRow(name=name, mode=mode, size=size, block_size=block_size, origin=origin,
                            root=0, levels=levels_for(nblocks), created=time.time())
            return self._register(build_volume(self, row, []))

    def clone_snapshot(self, snap: Snapshot, name: str,
                       progress: Callable[[int, int], None] | None = None) -> VolumeBase:
        """A new writable ROW volume with the snapshot's content, sharing its blocks."""
        validate_name(name, "volume name")
        vol = snap.volume
        with self.lock:
            snap._check()
            self._refuse_existing(name)
            nblocks = -(-snap.size // vol.block_size)
            row = VolumeRow(name=name, mode="row", size=snap.size, block_size=vol.block_size,
                            origin=None, root=0, levels=levels_for(nblocks), created=time.time(),
                            info={"cloned_from": snap.ref})
            clone = build_volume(self, row, [])
            vol._clone_into(snap.row, clone, progress)
            return self._register(clone)

    def import_volume(self, name: str, source: str, block_size: int = DEFAULT_BLOCK_SIZE,
                      progress: Callable[[int, int], None] | None = None) -> VolumeBase:
        """A new ROW volume holding a copy of an image or device (holes stay holes)."""
        validate_name(name, "volume name")
        with self.lock:
            self._refuse_existing(name)
        return import_image(self, name, source, block_size, progress)

    def delete_volume(self, name: str, recursive: bool = False) -> None:
        """Drop a volume (and, with recursive, its snapshots). A cow origin is left as is."""
        with self.lock:
            vol = self.volume(name)
            if vol.snapshot_rows and not recursive:
                raise Busy(f"volume {name!r} has {len(vol.snapshot_rows)} snapshot(s): "
                           "delete them first, or delete recursively", param="recursive")
            self.direct.revoke_all()   # (a COW volume's origin closes)
            vol._drop_all()
            deleted = [(name, s.name) for s in vol.snapshot_rows]
            del self._volumes[name]
            vol.deleted = True
            vol._close()
            self.commit(deleted_volumes=[name], deleted_snapshots=deleted)

    def _refuse_existing(self, name: str) -> None:
        if name in self._volumes:
            raise AlreadyExists(f"volume {name!r} already exists")

    def _register(self, vol: VolumeBase) -> VolumeBase:
        """Publish a new volume durably, or leave the pool as it was."""
        self._volumes[vol.name] = vol
        try:
            self.commit(volumes=[vol])
        except BaseException:
            del self._volumes[vol.name]
            vol._drop_all()
            vol._close()
            raise
        return vol

    def has_volume(self, name: str) -> bool:
        with self.lock:
            return name in self._volumes

    def volume(self, name: str) -> VolumeBase:
        with self.lock:
            self._check_open()
            try:
                return self._volumes[name]
            except KeyError:
                validate_name(name, "volume name")
                raise NotFound(f"no volume named {name!r}") from None

    def volumes(self) -> list[VolumeBase]:
        with self.lock:
            return [self._volumes[n] for n in sorted(self._volumes)]

    def start_writeback(self) -> None:
        """Start writeback of the data store and the COW origins written to: data
        then reaches the disk while writes go on, not all at the next commit."""
        with self.lock:   # (copies of the descriptors: writeback may block, not under the lock)
            if self.closed:
                return
            stores = [self.store] + [v._origin for v in self._volumes.values()
                                     if getattr(v, "_origin", None) is not None]
            fds: list[int] = []
            try:
                for st in stores:
                    fds.append(os.dup(st.fd))
            except OSError:
                pass   # (out of descriptors: start what we have)
        for fd in fds:
            try:
                start_writeback(fd)
            finally:
                os.close(fd)

    # -- reporting ----------------------------------------------------------
    def free_bytes(self) -> int:
        """Data-store bytes no block holds (what writes may still allocate).

        Without the lock (the FUSE write path asks for every request, while a write
        holding the lock does its I/O): a counter read, exact as of some instant.
        """
        return (self.space.total - HEADER_UNITS - self.space.used_units()) * UNIT

    def status(self) -> dict:
        with self.lock:
            self._check_open()
            total = (self.space.total - HEADER_UNITS) * UNIT
            used = self.space.used_units() * UNIT
            direct_reads, direct_writes = self.direct.counts()
            return {
                "pool": self.path, "uuid": self.uuid, "data": self.data_path,
                "data_is_device": self.store.is_device,
                "size": total, "used": used, "free": total - used,
                "used_percent": round(100.0 * used / total, 2) if total else 0.0,
                "host_allocated": self.store.allocated_bytes(),
                "store_written": self.store.written,   # bytes written to the data store since open
                # requests the compiled FUSE path served since open (engine/direct.py)
                "direct_reads": direct_reads, "direct_writes": direct_writes,
                "volumes": len(self._volumes),
                "snapshots": sum(len(v.snapshot_rows) for v in self._volumes.values()),
                "metadata_pages": int(self.pages.next_id - 1 - len(self.pages.free_ids)),
                "reclaimed_on_open": self.reclaimed_on_open,
                "health": "ok" if not self.check_report.errors else "errors",
            }

    def check(self, repair: bool = False) -> dict:
        return check_pool(self, repair)
