"""The record of frozen mounts (last layer of the thaw guarantee).

Before freezing, blocksnap adds an entry (its pid, the mountpoints and their device
numbers, the deadline) to ``frozen.json`` in a runtime directory that is never on a
filesystem being frozen (tmpfs: /run/blocksnap, $XDG_RUNTIME_DIR/blocksnap or
/dev/shm/blocksnap-UID; $BLOCKSNAP_RUNTIME_DIR overrides). The entry is removed after
the thaw. `recover_stale_freezes()` thaws the mounts of entries whose process is gone
(or is past its deadline) and drops them; the CLI calls it at startup. The two
variables come in a settings.Settings (`settings=None`: the environment's now).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from ..errors import BlocksnapError
from ..settings import Settings, resolve
from .ioctls import FITHAW

log = logging.getLogger("blocksnap.hooks")

STATE_NAME = "frozen.json"
LOCK_NAME = "frozen.lock"
OVERDUE_GRACE_S = 5.0  # a live owner this long past its deadline is treated as stale


def candidate_dirs(settings: Settings | None = None) -> list[Path]:
    settings = resolve(settings)
    out: list[Path] = []
    if settings.runtime_dir:
        return [Path(settings.runtime_dir)]
    if os.geteuid() == 0:
        out.append(Path("/run/blocksnap"))
    if settings.xdg_runtime_dir:
        out.append(Path(settings.xdg_runtime_dir) / "blocksnap")
    out.append(Path(f"/dev/shm/blocksnap-{os.geteuid()}"))
    return out


def _dir_dev(path: Path) -> int | None:
    """st_dev of `path` or of its closest existing parent."""
    p = path
    while True:
        try:
            return os.stat(p).st_dev
        except OSError:
            if p.parent == p:
                return None
            p = p.parent


def pick_dir(avoid_devs: set[int], settings: Settings | None = None) -> Path | None:
    """First usable runtime dir not on any of `avoid_devs` (created 0700), or None."""
    for d in candidate_dirs(settings):
        dev = _dir_dev(d)
        if dev is None or dev in avoid_devs:
            continue
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.stat(d).st_dev in avoid_devs or not os.access(d, os.W_OK):
                continue
            return d
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(d: Path) -> list[dict]:
    try:
        data = json.loads((d / STATE_NAME).read_text())
        entries = data.get("entries", [])
        return [e for e in entries if isinstance(e, dict)]
    except (OSError, ValueError, AttributeError):
        return []


def _store(d: Path, entries: list[dict]) -> None:
    path = d / STATE_NAME
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = d / f".{STATE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "entries": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a process, to tell a reused pid apart."""
    st = _proc_stat(pid)
    return st[1] if st else None


def _alive(pid: int | None, start: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc: trust kill(0)
    if st[0] in ("Z", "X"):  # killed, not yet reaped
        return False
    return start is None or st[1] == start


class FreezeRecord:
    """This process's entry in frozen.json (add before freezing, remove after thawing)."""

    def __init__(self, directory: Path, entry: dict):
        self.dir = directory
        self.entry = entry
        self.id = f"{os.getpid()}-{time.time_ns()}"
        entry["id"] = self.id

    @classmethod
    def add(cls, avoid_devs: set[int], mounts: list[tuple[str, int]], deadline: float,
            watchdog_pid: int | None, volume: str | None, snapshot: str | None,
            settings: Settings | None = None) -> "FreezeRecord | None":
        d = pick_dir(avoid_devs, settings)
        if d is None:
            return None
        entry = {"pid": os.getpid(), "start_time": proc_start_time(os.getpid()),
                 "watchdog_pid": watchdog_pid, "deadline": deadline, "created": time.time(),
                 "mounts": [{"path": p, "dev": dev} for p, dev in mounts],
                 "volume": volume, "snapshot": snapshot}
        rec = cls(d, entry)
        with _locked(d):
            entries = _load(d)
            entries.append(entry)
            _store(d, entries)
        return rec

    def remove(self) -> None:
        try:
            with _locked(self.dir):
                _store(self.dir, [e for e in _load(self.dir) if e.get("id") != self.id])
        except OSError as e:
            log.warning("cannot update %s: %s", self.dir / STATE_NAME, e.strerror)


def _thaw_path(path: str, dev: int | None) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return f"skipped: {e.strerror}"
    try:
        if dev is not None and os.fstat(fd).st_dev != dev:
            return "skipped: another filesystem is mounted there now"
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            return "thawed"
        except OSError as e:
            if e.errno == errno.EINVAL:
                return "not-frozen"
            return f"error: {os.strerror(e.errno or 0)}"
    finally:
        os.close(fd)


def recover_stale_freezes(settings: Settings | None = None) -> list[dict]:
    """Thaw filesystems left frozen by a blocksnap process that died (or overran).

    Returns one dict per mount acted on: {"path", "pid", "status"} where status is
    "thawed" (it was still frozen), "not-frozen", "skipped: ..." or "error: ...".
    Never raises: it runs at CLI startup.
    """
    results: list[dict] = []
    try:
        dirs = candidate_dirs(settings)
    except BlocksnapError as ex:   # a bad variable: the command itself reports it
        log.warning("stale freeze recovery skipped: %s", ex)
        return results
    for d in dirs:
        try:
            if not (d / STATE_NAME).exists():
                continue
            with _locked(d):
                entries = _load(d)
                keep = []
                now = time.time()
                for e in entries:
                    owner_alive = _alive(e.get("pid"), e.get("start_time"))
                    overdue = now > float(e.get("deadline") or 0) + OVERDUE_GRACE_S
                    if owner_alive and not overdue:
                        keep.append(e)
                        continue
                    for m in reversed(e.get("mounts") or []):
                        status = _thaw_path(str(m.get("path")), m.get("dev"))
                        results.append({"path": m.get("path"), "pid": e.get("pid"), "status": status})
                        if status == "thawed":
                            log.warning("thawed %s, left frozen by blocksnap pid %s", m.get("path"), e.get("pid"))
                _store(d, keep)
        except Exception as ex:  # noqa: BLE001 - recovery must never stop the CLI
            log.warning("stale freeze recovery in %s failed: %s", d, ex)
    return results
