"""Running the FUSE session: libfuse3 multithreaded, foreground, zero-copy writes.

mfusepy copies every write into a bytes object (`ctypes.string_at`); at 1 MiB per
request that copy is a visible share of the time, so writes are handed to the
engine as a memoryview over libfuse's buffer instead (valid for the call only,
and the engine copies it into the data store before returning). Reads go the
other way: the engine fills libfuse's reply buffer in place (`read_into`), so no
request allocates a buffer of its own.
"""
from __future__ import annotations

import ctypes
import logging
import re
from typing import Any

import mfusepy

from . import fast

log = logging.getLogger("blocksnap.fuse")

_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.restype = ctypes.py_object
_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PyBUF_READ = 0x100
_PyBUF_WRITE = 0x200


def _view(buf: Any, size: int, flags: int = _PyBUF_READ) -> memoryview:
    """A memoryview on a C buffer, without copying it."""
    if not size:
        return memoryview(b"")
    return _from_memory(ctypes.cast(buf, ctypes.c_void_p).value, size, flags)


class _FUSE(mfusepy.FUSE):
    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        """mfusepy drops the file handle here; with nullpath_ok it is all we get."""
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                        length, fh)

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return self.operations.read_into(None if path is None else path.decode(self.encoding, self.errors),
                                         _view(buf, size, _PyBUF_WRITE), offset, fip.contents.fh)

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return self.operations.write(None if path is None else path.decode(self.encoding, self.errors),
                                     _view(buf, size), offset, fip.contents.fh)


def fuse_options(fsname: str, *, read_only: bool, allow_other: bool) -> dict[str, Any]:
    """Mount options: only the owner gets in (default_permissions), unless allow_other."""
    opts: dict[str, Any] = {"foreground": True, "fsname": re.sub(r"[,\s]", "_", fsname),
                            "subtype": "blocksnap", "default_permissions": True}
    if read_only:
        opts["ro"] = True
    if allow_other:
        opts["allow_other"] = True
    return opts


def run_fuse(operations: Any, mountpoint: str, *, fsname: str = "blocksnap", read_only: bool = False,
             allow_other: bool = False, debug: bool = False) -> None:
    """Serve until unmounted (blocks). Raises RuntimeError if libfuse cannot mount."""
    opts = fuse_options(fsname, read_only=read_only, allow_other=allow_other)
    if debug:
        opts["debug"] = True
    log.info("mounting FUSE at %s with %s", mountpoint, opts)
    fast.starting(getattr(operations, "fast", None))
    try:
        _FUSE(operations, mountpoint, **opts)
    finally:
        fast.starting(None)
