"""Freeze watchdog: a separate process that thaws filesystems when its parent cannot.

The kernel keeps a filesystem frozen after the process that froze it is gone, so a
`kill -9` of blocksnap between FIFREEZE and FITHAW would leave it frozen for good.
This process is started (and has opened every mountpoint) *before* anything is frozen,
and thaws every mountpoint as soon as either

* its parent dies (EOF on stdin, or it gets re-parented), or
* the deadline (unix time) passes, or
* it receives SIGTERM.

If the parent thawed everything itself it writes ``done`` on the pipe and the watchdog
exits without touching anything.

Protocol (line based):
  parent -> watchdog (stdin):  ``done``                   (anything else is ignored)
  watchdog -> parent (stdout): ``ready`` once every mountpoint is open,
                               ``thawed PATH`` / ``not-frozen PATH`` / ``error PATH MSG``
                               for each mountpoint when it had to act.

Deliberately standard-library only and free of package imports: it is run as
``python -I -B .../watchdog.py --deadline T --parent PID MOUNT...`` so that it starts
fast, never writes bytecode files, and does not depend on the rest of the package
(``python -m blocksnap.hooks.watchdog`` works too). It never writes to stderr while a
filesystem may be frozen (stderr might be a file on it).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import select
import signal
import sys
import time

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

POLL_S = 0.1  # how often the parent pid is checked besides the pipe


def thaw_fd(fd: int) -> str:
    """FITHAW one fd: 'thawed', 'not-frozen' (EINVAL: was not frozen) or 'error MSG'."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return "thawed"
    except OSError as e:
        if e.errno == errno.EINVAL:
            return "not-frozen"
        return f"error {os.strerror(e.errno or 0)}"


class _Term(Exception):
    pass


def _on_term(signum, frame):  # noqa: ARG001
    raise _Term()


def _say(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # parent gone: nobody to tell


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blocksnap-freeze-watchdog")
    ap.add_argument("--deadline", type=float, required=True, help="unix time to thaw at")
    ap.add_argument("--parent", type=int, default=None, help="pid of the freezing process")
    ap.add_argument("mounts", nargs="+")
    args = ap.parse_args(argv)

    # Terminal signals are for the CLI, not for us (we also run in our own session).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)

    parent = args.parent if args.parent is not None else os.getppid()
    fds: list[tuple[str, int]] = []
    for path in args.mounts:
        try:
            fds.append((path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)))
        except OSError as e:
            _say(f"error {path} cannot open: {e.strerror}")
            return 2
    _say("ready")

    stdin_fd = sys.stdin.fileno()
    reason = "deadline"
    try:
        while True:
            left = args.deadline - time.time()
            if left <= 0:
                reason = "deadline"
                break
            r, _, _ = select.select([stdin_fd], [], [], min(left, POLL_S))
            if r:
                data = os.read(stdin_fd, 4096)
                if not data:
                    reason = "parent-exited"
                    break
                if b"done" in data:
                    return 0  # parent thawed everything itself
            if os.getppid() != parent:
                reason = "parent-died"
                break
    except _Term:
        reason = "sigterm"
    except Exception:  # noqa: BLE001 - whatever happens, thaw
        reason = "error"

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Thaw first, talk afterwards (the parent may be dead; stdout may be a closed pipe).
    results = [(path, thaw_fd(fd)) for path, fd in reversed(fds)]
    for path, res in results:
        _say(f"{res.split(' ', 1)[0]} {path} {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
