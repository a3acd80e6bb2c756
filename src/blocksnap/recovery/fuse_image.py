# ruff: noqa: ARG002  (mfusepy's operation signatures)
"""A FUSE filesystem of one file: `/<backup id>.img`, a backup's image.

Read-only, or writable over a throwaway `Overlay` (drills). Reads go to the
`BlockSource` (chunks fetched on demand through its cache); a damaged or missing
chunk, or a repository that does not answer, is EIO for that read and one log
line naming the chunk, never wrong data. The tree never changes, so the kernel
may cache names and attributes; data is direct I/O (no second page cache: the
loop device above has its own).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Any, Callable

from ..errors import BlocksnapError
from ..fuse.fs import FuseOSError, mfusepy  # through blocksnap.fuse, which makes mfusepy load libfuse3
from ..fuse.mount import _FUSE, fuse_options
from .overlay import Overlay
from .source import BlockSource

log = logging.getLogger("blocksnap.recovery")
MAX_THREADS = 16


class ImageFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, source: BlockSource, overlay: Overlay | None = None,
                 on_init: Callable[[], None] | None = None, on_error: Callable[[str], None] | None = None):
        self.source, self.overlay, self.on_init, self.on_error = source, overlay, on_init, on_error
        self.name = f"{source.id}.img"
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime = int(source.manifest.info.get("time", time.time()) * 1e9)
        self.mode = stat.S_IFREG | (0o600 if overlay is not None else 0o400)
        self.initialized = threading.Event()
        self.errors: list[str] = []

    def _check(self, path: str) -> str:
        if path in ("/", f"/{self.name}"):
            return path
        raise FuseOSError(errno.ENOENT)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path is not None and self._check(path) == "/":
            return {"st_mode": stat.S_IFDIR | 0o500, "st_nlink": 2, "st_uid": self.uid, "st_gid": self.gid,
                    "st_mtime": self.mtime, "st_ctime": self.mtime, "st_atime": self.mtime}
        size = self.source.size
        return {"st_mode": self.mode, "st_nlink": 1, "st_uid": self.uid, "st_gid": self.gid, "st_size": size,
                "st_blocks": -(-size // 512), "st_blksize": self.source.chunk_size,
                "st_mtime": self.mtime, "st_ctime": self.mtime, "st_atime": self.mtime}

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", self.name]

    def open(self, path: str, flags: int) -> int:
        if self._check(path) == "/":
            raise FuseOSError(errno.EISDIR)
        if (flags & os.O_ACCMODE) != os.O_RDONLY and self.overlay is None:
            raise FuseOSError(errno.EROFS)
        return 1

    def _fail(self, what: str, e: BlocksnapError | OSError) -> FuseOSError:
        msg = str(e)
        if msg not in self.errors:
            self.errors.append(msg)
            if self.on_error is not None:
                self.on_error(f"{what}: {msg}")
            else:
                log.error("%s: %s", what, msg)
        return FuseOSError(errno.EIO)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[:self.read_into(path, memoryview(buf), offset, fh)])

    def read_into(self, path: str | None, out: memoryview, offset: int, fh: int) -> int:
        try:
            if self.overlay is not None:
                return self.overlay.read_into(offset, out, self.source.read_into)
            return self.source.read_into(offset, out)
        except (BlocksnapError, OSError) as e:
            raise self._fail(f"read at {offset}", e) from None

    def write(self, path: str | None, data: Any, offset: int, fh: int) -> int:
        if self.overlay is None:
            raise FuseOSError(errno.EROFS)
        room = self.source.size - offset
        if room <= 0:
            raise FuseOSError(errno.ENOSPC)
        return self.overlay.write(offset, data[:room] if len(data) > room else data)

    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fh: int) -> int:
        if self.overlay is None:
            raise FuseOSError(errno.EROFS)
        if not mode & 0x02:          # only PUNCH_HOLE (discard): the image cannot grow
            raise FuseOSError(errno.EOPNOTSUPP)
        end = min(offset + length, self.source.size)
        if offset < end:
            self.overlay.discard(offset, end - offset)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if self.overlay is None:
            raise FuseOSError(errno.EROFS)
        if length != self.source.size:
            raise FuseOSError(errno.EPERM)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        return 0         # the overlay is thrown away: nothing to make durable

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": self.source.size // 4096, "f_bfree": 0,
                "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            conn_info.max_write = 1 << 20
            conn_info.max_background = 64
        if config_3 is not None:
            config_3.direct_io = 1
            config_3.entry_timeout = 3600.0
            config_3.attr_timeout = 3600.0
            config_3.nullpath_ok = 1
        self.initialized.set()
        if self.on_init is not None:
            self.on_init()


def run_image_fuse(fs: ImageFS, mountpoint: str) -> None:
    """Serve until unmounted (blocks): fuse/mount.py's session (zero-copy reads and
    writes), with a bounded thread count (libfuse's default, unbounded, makes it
    print a warning on stderr, which a drill's caller would see)."""
    opts = fuse_options(f"blocksnap-backup:{fs.source.id}", read_only=fs.overlay is None, allow_other=False)
    _FUSE(fs, mountpoint, max_threads=MAX_THREADS, max_idle_threads=MAX_THREADS, **opts)


def serve_in_thread(fs: ImageFS, mountpoint: str, timeout: float = 30.0) -> threading.Thread:
    """Serve `fs` from a thread of this process (drills): returns once the kernel has
    the mount. Unmounting the mountpoint ends the thread."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            run_image_fuse(fs, mountpoint)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failed.append(e)
            fs.initialized.set()

    t = threading.Thread(target=run, name="image-fuse", daemon=True)
    t.start()
    if not fs.initialized.wait(timeout) or failed:
        raise BlocksnapError(f"cannot serve the image over FUSE at {mountpoint}"
                             + (f": {failed[0]}" if failed else ""))
    return t
