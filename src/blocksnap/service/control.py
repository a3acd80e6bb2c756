"""Talking to the pool's daemon over its Unix socket (the daemon side: daemon_server).

Protocol: newline-delimited JSON, `{"op": NAME, "args": {...}}` answered by
`{"ok": RESULT}` or `{"error": MESSAGE, "type": EXCEPTION_CLASS}`. Errors come back
as the same blocksnap.errors class, so the CLI prints them as one `error:` line.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Callable, Iterator

from .. import errors
from ..settings import resolve

SOCKET_NAME = "daemon.sock"
NOT_RUNNING = object()
_SUN_PATH_MAX = 107


def socket_path(pool_path: str) -> str:
    return os.path.join(os.path.abspath(pool_path), SOCKET_NAME)


@contextlib.contextmanager
def sun_path(path: str) -> Iterator[str]:
    """An address short enough for AF_UNIX (108 bytes): long ones go via /proc/self/fd."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def remote_error(resp: dict[str, Any]) -> errors.BlocksnapError:
    """The exception a daemon reported, as the matching blocksnap.errors class."""
    cls = getattr(errors, str(resp.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.BlocksnapError)):
        cls = errors.BlocksnapError
    param = resp.get("param")
    return cls(str(resp.get("error") or "the pool's daemon reported an unknown error"),
               param=param if isinstance(param, str) else None)


def connect(pool_path: str, timeout: float | None = None) -> socket.socket | None:
    """A connection to the pool's daemon, or None if none listens (no socket, or stale)."""
    path = socket_path(pool_path)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        with sun_path(path) as addr:
            s.connect(addr)
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        return None
    except PermissionError:
        s.close()
        raise errors.Busy(f"{pool_path}: served by a daemon of another user (socket {path})") from None
    except BaseException:
        s.close()
        raise
    return s


# operations that answer at once when the daemon is alive (others run as long as they need)
QUICK_OPS = {"pool_status", "daemon_status", "volume_list", "volume_show", "snapshot_list", "snapshot_show",
             "umount", "detach", "stop"}


def request(sock: socket.socket, op: str, args: dict[str, Any], fds: list[int] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Any:
    """One request, one answer. `fds` go along with it (SCM_RIGHTS): the daemon reads
    or writes a stream on the caller's own file, never on a descriptor number it is told.
    With `progress`, the daemon sends progress lines before the answer."""
    if progress is not None:
        args = dict(args, progress=True)
    payload = json.dumps({"op": op, "args": args}).encode() + b"\n"
    if fds:
        sent = socket.send_fds(sock, [payload], fds)
        sock.sendall(payload[sent:])
    else:
        sock.sendall(payload)
    reader = sock.makefile("rb")
    while True:
        try:
            line = reader.readline()
        except TimeoutError:
            raise errors.Busy(f"the pool's daemon did not answer {op} within {sock.gettimeout():.0f} s: is it "
                              "stopped or stuck? (see daemon.log in the pool; 'kill -9' it and run "
                              "'blocksnap stop --force' to clean up)") from None
        if not line:
            raise errors.BlocksnapError("the pool's daemon closed the connection without answering "
                                        "(see daemon.log in the pool)")
        resp = json.loads(line)
        if "progress" not in resp:
            break
        if progress is not None:
            progress(*resp["progress"])
    if "ok" in resp:
        return resp["ok"]
    raise remote_error(resp)


def try_remote(pool_path: str, op: str, args: dict[str, Any], *, daemon_timeout: float | None = None) -> Any:
    """Run `op` in the pool's daemon if one serves it; NOT_RUNNING otherwise.

    An `fd` argument is passed as a file descriptor, not as a number; a `progress`
    callback gets the daemon's progress reports. A QUICK_OPS answer is waited for
    `daemon_timeout` seconds (None: BLOCKSNAP_DAEMON_TIMEOUT, settings.py)."""
    sock = connect(pool_path)
    if sock is None:
        return NOT_RUNNING
    fds = [args["fd"]] if "fd" in args else None
    if op in QUICK_OPS:   # a stopped or stuck daemon must not hang `status` forever
        sock.settimeout(resolve(None).daemon_timeout if daemon_timeout is None else daemon_timeout)
    with sock:
        return request(sock, op, {k: v for k, v in args.items() if k not in ("progress", "fd")}, fds,
                       args.get("progress"))
