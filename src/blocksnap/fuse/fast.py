"""The compiled read and write entry points of a mount (fuse/_fastfuse.c).

Why: every request through mfusepy takes the GIL and runs Python before the engine
sees it. For an open image the engine serves directly (engine/direct.py: leased
blocks), libfuse's read and write callbacks are C functions that do the request
without the interpreter; any other request goes on to mfusepy's ctypes callback,
as before. BlocksnapFS registers each open image here (fh -> engine image), and
leases blocks after the Python path served a request there.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import mfusepy
import numpy as np

try:
    from . import _fastfuse
except ImportError:   # not compiled (setup.py)
    _fastfuse = None

log = logging.getLogger("blocksnap.fuse")

_slots_lock = threading.Lock()
_slots_used: set[int] = set()
_installing = threading.local()   # the FastPath a mount in this thread is starting with


def available(direct: Any) -> bool:
    return _fastfuse is not None and direct.enabled


class FastPath:
    """One mount's slot of C entry points and its table of open files."""

    def __init__(self, direct: Any):
        self.direct = direct
        self.rows = _fastfuse.FH_ROWS
        self.fht = np.zeros((self.rows, 2), np.uint64)   # [fh, image | writable << 32]
        self.slot: int | None = None

    def install(self, ops: Any) -> bool:
        """Put this mount's C callbacks in libfuse's operations table, in front of
        the ctypes ones mfusepy put there (False: no slot free, left as it was)."""
        read, write = (ctypes.cast(getattr(ops, n), ctypes.c_void_p).value for n in ("read", "write"))
        if not read or not write:
            return False
        with _slots_lock:
            free = [s for s in range(_fastfuse.SLOTS) if s not in _slots_used]
            if not free:
                log.warning("no slot for compiled FUSE callbacks left: this mount uses the Python path")
                return False
            self.slot = free[0]
            _slots_used.add(self.slot)
        dread, dwrite = self.direct.entry_points()
        fast_read, fast_write = _fastfuse.install(
            self.slot, read, write, mfusepy.fuse_file_info.fh.offset, dread, dwrite,
            self.direct.address, int(self.fht.ctypes.data))
        base = ctypes.addressof(ops)
        for name, addr in (("read", fast_read), ("write", fast_write)):
            ctypes.c_void_p.from_address(base + getattr(type(ops), name).offset).value = addr
        log.info("compiled FUSE read/write callbacks in slot %d", self.slot)
        return True

    def register(self, fh: int, image: int, writable: bool) -> None:
        row = self.fht[fh % self.rows]
        if row[0]:
            return   # (the row serves another open file: this one takes the Python path)
        row[1] = image | (int(writable) << 32)
        row[0] = fh   # (last: the C side reads the tag first)

    def unregister(self, fh: int) -> None:
        row = self.fht[fh % self.rows]
        if int(row[0]) == fh:
            row[0] = 0

    def close(self) -> None:
        """After the session: the slot may serve another mount."""
        self.fht[:] = 0
        with _slots_lock:
            _slots_used.discard(self.slot)
        self.slot = None


def _fuse_main_real(argc: Any, argv: Any, ops_p: Any, size: Any, ctx: Any) -> int:
    """mfusepy's call into libfuse, with the operations table amended first."""
    fast = getattr(_installing, "fast", None)
    if fast is not None:
        _installing.fast = None
        fast.install(ops_p.contents)
    return _real_fuse_main(argc, argv, ops_p, size, ctx)


_real_fuse_main = mfusepy.fuse_main_real
mfusepy.fuse_main_real = _fuse_main_real


def starting(fast: FastPath | None) -> None:
    """The next mount this thread starts uses `fast`'s callbacks."""
    _installing.fast = fast
