"""Positional I/O on a regular file or a block device, with fsync and hole punching.

The engine never relies on the page cache for durability: it calls `sync()` before
every metadata commit. Block devices get the same API as files.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading

from ..errors import InvalidArgument, NotFound, OutOfSpace
from ..settings import resolve

try:  # the compiled read path (setup.py); a FileStore opened with pure_python does without
    from . import _blockread
except ImportError:
    _blockread = None

_BLKGETSIZE64 = 0x80081272
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


class WriteFailed(Exception):
    """merge_write's write failed after it began (the block may hold part of the
    new bytes): `error` is what the writer gets."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def device_size(path: str) -> int:
    """Size in bytes of a regular file or a block device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file or device") from None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        finally:
            os.close(fd)
    raise InvalidArgument(f"{path}: not a regular file or block device")


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to the disk, without waiting for it, so
    a later fsync has less to do (sync_file_range WRITE: not a durability step)."""
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class FileStore:
    """An open file or block device. Thread-safe: pread/pwrite carry their offset.

    `pure_python` reads blocks with engine.blockio's Python code instead of the
    compiled `read_mapped` (for comparison); None takes BLOCKSNAP_PURE_PYTHON
    (settings.py).
    """

    def __init__(self, path: str, *, writable: bool = True, create_size: int | None = None,
                 pure_python: bool | None = None):
        self.path = path
        if pure_python is None:
            pure_python = resolve(None).pure_python
        if pure_python:
            self.read_mapped = None   # (hides the compiled methods of the class)
            self.merge_write = None
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create_size is not None:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file or device") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{path}: is a directory, not an image file or device") from None
        st = os.fstat(self.fd)
        self.is_device = stat.S_ISBLK(st.st_mode)
        if not self.is_device and not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise InvalidArgument(f"{path}: not a regular file or block device")
        if create_size is not None and not self.is_device and st.st_size < create_size:
            os.ftruncate(self.fd, create_size)
        self.size = device_size(path) if self.is_device else os.fstat(self.fd).st_size
        self._closed = False
        self._lock = threading.Lock()
        self.written = 0   # bytes written through pwritev (write amplification: pool status)

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly `length` bytes; past the end of a file reads zeros."""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill buf from offset; past the end of the file reads zeros. (One call
        returns at most 2 GiB - 4 KiB on Linux: a short read is not the end.)"""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    if _blockread is not None:
        def read_mapped(self, ptrs, sums, bs: int, unit: int, buf, *, zero_holes: bool, verify: bool,
                        skip: int = 0, length: int = -1) -> int:
            """Blocks at store units `ptrs` into buf (or their bytes [skip, skip+length)),
            checked against `sums` without the GIL (see _blockread.c): the first block
            that fails its checksum, or -1."""
            return _blockread.read_blocks(self.fd, ptrs, sums, bs, unit, buf, verify, zero_holes, skip, length)
    else:
        read_mapped = None  # engine.blockio reads with preadinto instead

    if _blockread is not None:
        def merge_write(self, pos: int, lo: int, data, block, have: bool, old_sum: int) -> tuple[int, int]:
            """A small write into the stored block at byte `pos`, in place, in one call
            without the GIL: `block` (a block-sized buffer) is read and checked against
            `old_sum` unless `have` (it holds the block already), gets `data` at `lo`,
            and only `data` is written. Returns (status, xxh3 of the merged block):
            status 0 written, 1 the stored block failed its checksum, 2 the merged
            block would be all zeros (nothing written in either case). A failed
            write raises WriteFailed (it may have written part of `data`); a failed
            read, OSError."""
            status, new = _blockread.merge_write(self.fd, pos, lo, data, block, have, old_sum)
            if status == 3:
                if new in (errno.ENOSPC, errno.EDQUOT):
                    raise WriteFailed(OutOfSpace(f"{self.path}: no space left on the device holding it"))
                raise WriteFailed(OSError(new, os.strerror(new)))
            if not status:
                self.written += len(data)
            return status, new
    else:
        merge_write = None  # engine.row_write merges in Python instead

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        self.pwritev([data], offset)

    def pwritev(self, pieces: list, offset: int) -> None:
        """Write the buffers one after the other from `offset`, in one system call
        when the kernel takes them all (a short write continues where it stopped)."""
        views = [memoryview(p).cast("B") for p in pieces]
        try:
            while views:
                n = os.pwritev(self.fd, views, offset)
                offset += n
                self.written += n   # (racy += between threads only blurs a statistic)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
                views = [v for v in views if len(v)]
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"{self.path}: no space left on the device holding it") from None
            raise

    def sync(self) -> None:
        os.fsync(self.fd)


    def punch_hole(self, offset: int, length: int) -> None:
        """Give space back to the host filesystem (files only; best effort)."""
        if self.is_device or length <= 0:
            return
        _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def allocated_bytes(self) -> int:
        if self.is_device:
            return self.size
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
