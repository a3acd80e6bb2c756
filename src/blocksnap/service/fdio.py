"""Stream files on descriptors a client passed to the daemon, given up with the client.

A client that is killed or interrupted closes its control connection, but the
descriptor it passed stays open in the daemon, so a receive would go on (or
wait forever on a stalled pipe) for nobody. Every read and write here waits on
the stream and on the client's connection at once, and stops with an error
the moment the connection closes: the receive then undoes itself as for any
other failure.
"""
from __future__ import annotations

import io
import os
import select

from ..errors import BlocksnapError

_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)


class ClientGone(BlocksnapError):
    """The client that asked for the operation went away."""


class Watched(io.RawIOBase):
    """A descriptor read from (`reading`) or written to, while the client stays."""

    def __init__(self, fd: int, watch_fd: int, reading: bool):
        self.fd, self.watch_fd, self.reading = fd, watch_fd, reading
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN if reading else select.POLLOUT)
        self._poll.register(watch_fd, _GONE)

    def _wait(self) -> None:
        """Until the stream is ready; raises if the client's connection closed first."""
        while True:
            events = dict(self._poll.poll())
            if events.get(self.watch_fd, 0) & _GONE:
                raise ClientGone("the client went away: operation abandoned")
            if self.fd in events:
                return

    def readable(self) -> bool:
        return self.reading

    def writable(self) -> bool:
        return not self.reading

    def readinto(self, b) -> int:
        self._wait()
        return os.readv(self.fd, [b])

    def write(self, b) -> int:
        self._wait()
        return os.write(self.fd, b)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def stream_file(fd: int, mode: str, watch_fd: int | None = None) -> io.BufferedIOBase:
    """A buffered file on a copy of `fd` ('rb' or 'wb'), watched when `watch_fd` is given."""
    fd = os.dup(fd)
    if watch_fd is None:
        return os.fdopen(fd, mode, buffering=1 << 20)
    if mode == "rb":
        return io.BufferedReader(Watched(fd, watch_fd, reading=True), 1 << 20)
    return io.BufferedWriter(Watched(fd, watch_fd, reading=False), 1 << 20)
