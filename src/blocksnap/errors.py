"""Exceptions that carry a user-facing message; the CLI prints them as one `error:` line."""
from __future__ import annotations

import errno


class BlocksnapError(Exception):
    """Base class: anything the user can cause or fix. `errno` maps it for FUSE,
    `exit_code` for the command line (docs/usage.md lists them).

    `param` names the argument at fault in the API's terms ("size", "force"): the
    engine says what is wrong, and the command line adds which flag fixes it.
    """

    errno: int = errno.EINVAL
    exit_code: int = 1

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidArgument(BlocksnapError):
    """A value the user gave is wrong (exit 1, the general case, as DESIGN.md says)."""

    errno = errno.EINVAL


class NotFound(BlocksnapError):
    errno = errno.ENOENT
    exit_code = 3


class AlreadyExists(BlocksnapError):
    errno = errno.EEXIST
    exit_code = 4


class Busy(BlocksnapError):
    """The pool or object is in use (locked pool, attached volume, dependent clone)."""

    errno = errno.EBUSY
    exit_code = 5


class OutOfSpace(BlocksnapError):
    errno = errno.ENOSPC
    exit_code = 6


class CorruptionError(BlocksnapError):
    """A checksum or metadata invariant failed: data is not returned silently."""

    errno = errno.EIO
    exit_code = 7


class NotAPool(BlocksnapError):
    errno = errno.ENOENT
    exit_code = 8


class UnknownOperation(InvalidArgument):
    """A control-socket request names an operation the daemon does not offer."""
