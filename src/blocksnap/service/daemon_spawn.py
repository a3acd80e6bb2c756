"""Starting the pool's daemon in the background and knowing when it is ready.

The parent starts `blocksnap serve --foreground` in a new session, its output going
to <pool>/daemon.log, and polls the control socket until the daemon answers
`daemon_status` with ready (FUSE mounted, socket listening). If the child exits
first, its last `error:` line from the log becomes the parent's error. The child
inherits this process's environment, so the settings of the command that starts
the daemon (BLOCKSNAP_WRITE_BEHIND..., settings.py) are the daemon's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from ..errors import BlocksnapError, Busy
from . import daemon_state
from .control import NOT_RUNNING, try_remote
from .daemon import READY_TIMEOUT
from .daemon_state import log_path, pid_alive

DEFAULT_MOUNT_DIR = "mnt"


def default_mountpoint(pool_path: str) -> str:
    return os.path.join(os.path.abspath(pool_path), DEFAULT_MOUNT_DIR)


def status(pool_path: str) -> dict[str, Any] | None:
    """The running daemon's status, or None when no daemon serves the pool."""
    res = try_remote(pool_path, "daemon_status", {})
    return None if res is NOT_RUNNING else res


def _child_error(log_file: str, offset: int) -> str | None:
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    errs = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    return errs[-1] if errs else (lines[-1] if lines else None)


def start(pool_path: str, mountpoint: str, *, read_only: bool = False, allow_other: bool = False,
          debug: bool = False) -> dict[str, Any]:
    """Start a daemon for the pool and wait until it serves; returns its status."""
    pool_path = os.path.abspath(pool_path)
    if not os.path.isdir(pool_path):
        from ..errors import NotAPool
        raise NotAPool(f"{pool_path}: not a blocksnap pool (run 'blocksnap pool init' first)")
    cmd = [sys.executable, "-m", "blocksnap", "--pool", pool_path]
    if debug:
        cmd.append("--debug")
    cmd += ["serve", "--foreground", os.path.abspath(mountpoint)]
    if read_only:
        cmd.append("--read-only")
    if allow_other:
        cmd.append("--allow-other")
    logf = log_path(pool_path)
    with open(logf, "ab") as out:
        offset = out.tell()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True, cwd="/")
    deadline = time.monotonic() + READY_TIMEOUT + 5
    while time.monotonic() < deadline:
        if child.poll() is not None:
            msg = _child_error(logf, offset) or f"exit status {child.returncode}"
            if "in use by another process" in msg or "already served" in msg:
                other = wait_ready(pool_path, 10.0)  # lost a race with another starter?
                if other is not None:
                    return other
                raise Busy(msg)
            raise BlocksnapError(f"the daemon did not start: {msg}")
        st = status(pool_path)
        if st is not None and st.get("ready") and st.get("pid") == child.pid:
            return st
        time.sleep(0.05)
    child.kill()
    raise BlocksnapError(f"the daemon did not get ready within {READY_TIMEOUT:.0f} s (see {logf})")


def wait_ready(pool_path: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(pool_path)
        if st is not None and st.get("ready"):
            return st
        time.sleep(0.1)
    return None


def ensure(pool_path: str) -> tuple[dict[str, Any], bool]:
    """The running daemon's status, starting one at <pool>/mnt if none runs."""
    st = status(pool_path)
    if st is not None:
        if not st.get("ready"):
            st = wait_ready(pool_path, READY_TIMEOUT) or st
        return st, False
    return start(pool_path, default_mountpoint(pool_path)), True


def cleanup_dead(pool_path: str) -> list[str]:
    """What a daemon killed without shutting down left behind (its FUSE mount, loop
    devices, snapshot mounts), taken down while holding the pool: none can be serving."""
    from ..engine import Pool
    with Pool.open(pool_path):
        return daemon_state.cleanup_stale(pool_path, default_mountpoint(pool_path))


def wait_stopped(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid) or _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
