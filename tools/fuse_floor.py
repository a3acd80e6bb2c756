#!/usr/bin/env python3
"""The floor of blocksnap's FUSE path: one image file served by mfusepy on libfuse3,
with blocksnap's own FUSE class and init options (zero-copy views, direct I/O,
1 MiB requests), whose read and write are a bare os.preadv / os.pwrite on a raw
file. No engine, no lock, no checksum: what any Python engine behind this layer
could at best reach, per request (`tools/bench_fuse.py --random --targets pyfuse,...`).

Usage: python tools/fuse_floor.py IMAGE MOUNTPOINT   (serves MOUNTPOINT/disk until unmounted)
"""
from __future__ import annotations

import errno
import os
import stat
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from blocksnap.fuse import mount  # (blocksnap.fuse picks libfuse3 before mfusepy loads)
from blocksnap.fuse.fs import MAX_WRITE

mfusepy = mount.mfusepy


class Floor(mfusepy.Operations):
    use_ns = True

    def __init__(self, image: str):
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path in ("/disk", None):  # None: nullpath_ok, a call on the open file
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": self.size}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "disk"]

    def open(self, path, flags):
        return 1

    def read(self, path, size, offset, fh):  # mfusepy registers read only if defined
        return os.pread(self.fd, size, offset)

    def read_into(self, path, view, offset, fh):
        return os.preadv(self.fd, [view], offset)

    def write(self, path, view, offset, fh):
        return os.pwrite(self.fd, view, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    def release(self, path, fh):
        return 0

    def init_with_config(self, conn_info, config_3):
        if conn_info is not None:
            conn_info.max_write = MAX_WRITE
            conn_info.max_background = 64
            conn_info.congestion_threshold = 48
        if config_3 is not None:
            config_3.direct_io = 1
            config_3.attr_timeout = 1.0
            config_3.nullpath_ok = 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    opts = mount.fuse_options("floor", read_only=False, allow_other=False)
    mount._FUSE(Floor(sys.argv[1]), sys.argv[2], **opts)
