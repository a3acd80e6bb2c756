"""Exceptions that carry a user-facing message; the CLI prints them as one `error:` line."""
from __future__ import annotations

import errno


class BlocksnapError(Exception):
    """Base class: anything the user can cause or fix. `errno` maps it for FUSE."""

    errno: int = errno.EINVAL


class InvalidArgument(BlocksnapError):
    errno = errno.EINVAL


class NotFound(BlocksnapError):
    errno = errno.ENOENT


class AlreadyExists(BlocksnapError):
    errno = errno.EEXIST


class Busy(BlocksnapError):
    """The pool or object is in use (locked pool, attached volume, dependent clone)."""

    errno = errno.EBUSY


class OutOfSpace(BlocksnapError):
    errno = errno.ENOSPC


class CorruptionError(BlocksnapError):
    """A checksum or metadata invariant failed: data is not returned silently."""

    errno = errno.EIO


class NotAPool(BlocksnapError):
    errno = errno.ENOENT
