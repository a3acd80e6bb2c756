"""A throwaway writable layer over a read-only image: a sparse file and an extent map.

Writes go to an unnamed sparse file (O_TMPFILE: nothing to clean up, even after
kill -9) at the offset they were made; the extent map (sorted, disjoint, merged
byte ranges) says which parts of the image the layer holds. A read takes those
parts from the file and the rest from the image below, so the backup under it is
never changed. A discard punches the range out of the file and marks it held:
it then reads as zeros, as on a disk.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import threading
from typing import Callable

from .source import O_TMPFILE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_PUNCH = 0x02 | 0x01          # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

Reader = Callable[[int, memoryview], int]


class Overlay:
    def __init__(self, directory: str, size: int):
        os.makedirs(directory, exist_ok=True)
        self.size = size
        self.fd = os.open(directory, O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._lock = threading.Lock()
        self.written = 0

    def _add(self, lo: int, hi: int) -> None:
        """Mark [lo, hi) as held, merging with touching ranges (under the lock)."""
        i = bisect.bisect_left(self.ends, lo)          # first range that ends at or after lo
        j = bisect.bisect_right(self.starts, hi)       # ranges before j start at or before hi
        if i < j:
            lo, hi = min(lo, self.starts[i]), max(hi, self.ends[j - 1])
        self.starts[i:j] = [lo]
        self.ends[i:j] = [hi]

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """[lo, hi) cut into (start, end, held by the layer)."""
        out = []
        with self._lock:
            i = bisect.bisect_right(self.ends, lo)
            at = lo
            while at < hi and i < len(self.starts) and self.starts[i] < hi:
                s, e = max(self.starts[i], at), min(self.ends[i], hi)
                if s > at:
                    out.append((at, s, False))
                out.append((s, e, True))
                at = e
                i += 1
        if at < hi:
            out.append((at, hi, False))
        return out

    def write(self, offset: int, data: bytes | memoryview) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        with self._lock:
            self._add(offset, offset + len(view))
            self.written += len(view)
        return len(view)

    def discard(self, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, _PUNCH, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        with self._lock:
            self._add(offset, offset + length)

    def read_into(self, offset: int, out: memoryview, below: Reader) -> int:
        """Fill `out` at `offset`: held parts from the layer, the rest from `below`."""
        end = min(offset + len(out), self.size)
        for s, e, held in self.pieces(offset, end):
            dst = out[s - offset:e - offset]
            if held:
                n = os.preadv(self.fd, [dst], s)
                if n < len(dst):
                    dst[n:] = bytes(len(dst) - n)
            else:
                below(s, dst)
        return max(0, end - offset)

    def extents(self) -> int:
        return len(self.starts)

    def close(self) -> None:
        os.close(self.fd)
