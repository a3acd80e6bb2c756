"""Filesystem freeze/thaw with the FIFREEZE/FITHAW ioctls on an fd of the mountpoint."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from dataclasses import dataclass

from .ioctls import FIFREEZE, FITHAW
from .plan import HookError

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_info(path: str) -> tuple[str, str]:
    """(fstype, source) of the mount at `path` from /proc/self/mountinfo, or ('?', '?')."""
    found = ("?", "?")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                rparts = right.split()
                if len(parts) >= 5 and len(rparts) >= 2 and _unescape(parts[4]) == path:
                    found = (rparts[0], rparts[1])  # the last (topmost) mount wins
    except OSError:
        pass
    return found


@dataclass
class Mount:
    """One mountpoint to freeze, opened before anything is frozen."""

    path: str  # canonical path
    fd: int
    dev: int
    fstype: str
    source: str
    same_as: str | None = None  # another listed mountpoint of the same filesystem
    frozen: bool = False
    frozen_at: float | None = None
    thawed_at: float | None = None
    status: str = "pending"  # pending | frozen | ok | failed | lost | aborted
    error: str | None = None

    def entry(self) -> dict:
        e = {"kind": "fs", "target": self.path, "status": self.status, "fstype": self.fstype,
             "source": self.source}
        if self.frozen_at is not None and self.thawed_at is not None:
            e["ms"] = round((self.thawed_at - self.frozen_at) * 1000, 3)
        else:
            e["ms"] = 0.0
        if self.same_as:
            e["same_filesystem_as"] = self.same_as
        if self.error:
            e["error"] = self.error
        return e


def open_mount(path: str) -> Mount:
    """Validate and open a mountpoint (no freezing). Raises HookError."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise HookError(f"cannot freeze {path}: no such directory")
    if not os.path.isdir(real):
        raise HookError(f"cannot freeze {path}: not a directory")
    if not os.path.ismount(real):
        raise HookError(f"cannot freeze {path}: not a mountpoint")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HookError(f"cannot freeze {path}: {e.strerror}") from None
    fstype, source = mount_info(real)
    return Mount(path=real, fd=fd, dev=os.fstat(fd).st_dev, fstype=fstype, source=source)


class FsFreezer:
    """Freezes a list of mounts in order and thaws them in reverse, exactly once.

    `thaw_all` may be called from the deadline timer thread and the main thread; a
    lock makes the thaw happen once. A mount found already thawed at thaw time
    (someone else, e.g. the watchdog, thawed it) is marked "lost".
    """

    def __init__(self, paths: list[str]):
        self.mounts: list[Mount] = []
        self._lock = threading.Lock()
        try:
            seen: dict[int, str] = {}
            for p in paths:
                m = open_mount(p)
                if m.dev in seen:
                    m.same_as = seen[m.dev]
                else:
                    seen[m.dev] = m.path
                self.mounts.append(m)
        except BaseException:
            self.close()
            raise

    @property
    def devs(self) -> set[int]:
        return {m.dev for m in self.mounts}

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.mounts]

    def unique(self) -> list[Mount]:
        return [m for m in self.mounts if m.same_as is None]

    def freeze_all(self) -> None:
        """Freeze each filesystem once; on failure raises HookError (caller thaws)."""
        for m in self.mounts:
            if m.same_as is not None:
                m.status = "frozen"
                continue
            with self._lock:
                try:
                    fcntl.ioctl(m.fd, FIFREEZE, 0)
                except OSError as e:
                    m.status = "failed"
                    m.error = _freeze_error(e, m)
                    raise HookError(f"cannot freeze {m.path}: {m.error}") from None
                m.frozen = True
                m.frozen_at = time.monotonic()
                m.status = "frozen"
        for m in self.mounts:
            if m.same_as is not None:
                first = next(x for x in self.mounts if x.path == m.same_as and x.same_as is None)
                m.frozen_at = first.frozen_at

    def thaw_all(self, final_status: str = "ok") -> list[str]:
        """Thaw in reverse order; returns error strings (never raises).

        final_status: "ok" (normal end), "aborted" (undo after a failure) or "timeout"
        (deadline thread). A filesystem found already thawed is "lost" in the normal case.
        """
        errors: list[str] = []
        with self._lock:
            for m in reversed(self.mounts):
                if m.same_as is not None or not m.frozen:
                    continue
                try:
                    fcntl.ioctl(m.fd, FITHAW, 0)
                    m.status = final_status
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        if final_status == "ok":
                            m.status = "lost"
                            m.error = "was already thawed (by the watchdog or another process)"
                            errors.append(f"fs {m.path}: freeze not held until the end: {m.error}")
                        else:
                            m.status = final_status
                    else:
                        m.status = "failed"
                        m.error = f"thaw failed: {os.strerror(e.errno or 0)}"
                        errors.append(f"fs {m.path}: {m.error}")
                m.frozen = False
                m.thawed_at = time.monotonic()
            for m in self.mounts:
                if m.same_as is not None and m.status == "frozen":
                    first = next(x for x in self.mounts if x.path == m.same_as and x.same_as is None)
                    m.status, m.thawed_at = first.status, first.thawed_at
                elif m.status == "pending":
                    m.status = "aborted"
        return errors

    def any_frozen(self) -> bool:
        return any(m.frozen for m in self.mounts)

    def close(self) -> None:
        for m in self.mounts:
            if m.fd >= 0:
                try:
                    os.close(m.fd)
                except OSError:
                    pass
                m.fd = -1


def _freeze_error(e: OSError, m: Mount) -> str:
    if e.errno == errno.EBUSY:
        return "already frozen by another process (see `fsfreeze --unfreeze`)"
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
        return f"filesystem type {m.fstype} does not support freezing"
    if e.errno == errno.EPERM:
        return "freezing a filesystem needs root (CAP_SYS_ADMIN)"
    return os.strerror(e.errno or 0)
