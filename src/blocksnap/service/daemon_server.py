"""The daemon's end of the control socket: <pool>/daemon.sock, mode 0600, owner only.

File mode keeps other users from connecting; SO_PEERCRED is checked as well, so a
socket made reachable by mistake (a chmod, a bind mount) still refuses them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator

from ..errors import BlocksnapError
from .control import sun_path

log = logging.getLogger("blocksnap.daemon")

Handler = Callable[[str, dict[str, Any]], Any]
MAX_LINE = 16 << 20


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def answer(handler: Handler, line: bytes, fds: list[int] | None = None,
           watch_fd: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One request line -> one response object; never raises.

    A descriptor passed with the request becomes its `fd` argument, and the
    client's connection its `watch_fd` (the operation ends if the client goes);
    numbers sent under those names in the JSON are dropped: the daemon must
    never read or write its own files on a client's word."""
    try:
        req = json.loads(line)
        op, args = req["op"], req.get("args") or {}
        if not isinstance(op, str) or not isinstance(args, dict):
            raise ValueError("op must be a string and args an object")
    except (ValueError, KeyError, TypeError) as e:
        return {"error": f"bad request: {e}", "type": "InvalidArgument"}
    args.pop("fd", None)
    args.pop("watch_fd", None)
    if args.pop("progress", None) is True and progress is not None:
        args["progress"] = progress   # the client shows a bar: report to it as we go
    if fds:
        args["fd"] = fds[0]
        if watch_fd is not None:
            args["watch_fd"] = watch_fd
    try:
        return {"ok": handler(op, args)}
    except BlocksnapError as e:
        return {"error": str(e), "type": type(e).__name__, "param": e.param}
    except TypeError as e:
        return {"error": f"bad arguments for {op}: {e}", "type": "InvalidArgument"}
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return {"error": f"{e.strerror or e}{where}", "type": "BlocksnapError"}
    except Exception as e:
        log.exception("op %s failed", op)
        return {"error": f"internal error in the daemon: {type(e).__name__}: {e}", "type": "BlocksnapError"}


def _progress_to(conn: socket.socket, every: float = 0.2) -> Callable[[int, int], None]:
    """Progress lines to a client, a few per second (and the last one)."""
    last = [0.0]

    def send(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every or done >= total:
            last[0] = now
            conn.sendall(json.dumps({"progress": [int(done), int(total)]}).encode() + b"\n")
    return send


def _requests(conn: socket.socket) -> Iterator[tuple[bytes, list[int]]]:
    """Request lines, each with the descriptors that arrived with it."""
    buf, fds = b"", []
    try:
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line, buf = buf[:nl + 1], buf[nl + 1:]
                got, fds = fds, []
                yield line, got
                continue
            if len(buf) > MAX_LINE:
                return
            data, new, _, _ = socket.recv_fds(conn, 1 << 16, 4, socket.MSG_CMSG_CLOEXEC)
            fds += new
            if not data:
                return
            buf += data
    finally:
        for fd in fds:
            os.close(fd)


class ControlServer:
    """Accepts connections in a thread; each connection gets a thread of its own."""

    def __init__(self, path: str, handler: Handler):
        self.path = path
        self.handler = handler
        self.uid = os.getuid()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if os.path.lexists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # born 0600: no window where others could connect
        try:
            with sun_path(self.path) as addr:
                sock.bind(addr)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self.sock = sock
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.thread.start()
        log.info("control socket %s listening", self.path)

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = peer_uid(conn)
                if uid != self.uid:
                    log.warning("refused a connection from uid %d", uid)
                    conn.sendall(json.dumps({"error": f"permission denied: the daemon serves uid {self.uid} only",
                                             "type": "BlocksnapError"}).encode() + b"\n")
                    return
                for line, fds in _requests(conn):
                    try:
                        resp = answer(self.handler, line, fds, conn.fileno(), _progress_to(conn))
                    finally:
                        for fd in fds:
                            os.close(fd)
                    conn.sendall(json.dumps(resp, default=str).encode() + b"\n")
            except OSError:
                return  # the client went away

    def close(self) -> None:
        """Stop accepting; clients then see no daemon (and find the pool locked)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
