"""`blocksnap send|receive`: snapshots as streams, to a file or a pipe."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from ..errors import InvalidArgument
from ..service.runner import call
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings
from .progress import progress_bar


def _open(path: str | None, write: bool) -> int:
    """The stream's descriptor: the file named, else stdout/stdin (never a terminal)."""
    if path is None or path == "-":
        std = sys.stdout if write else sys.stdin
        try:
            fd = os.dup(std.fileno())
        except (AttributeError, ValueError, OSError):   # closed (`>&-`, `<&-`)
            raise InvalidArgument(f"no standard {'output' if write else 'input'}: use "
                                  f"{'-o FILE' if write else '-i FILE'}") from None
        if os.isatty(fd):
            os.close(fd)
            raise InvalidArgument(f"refusing to {'write a stream to' if write else 'read a stream from'} "
                                  f"a terminal: use {'-o FILE' if write else '-i FILE'} or a pipe")
        return fd
    try:
        if write:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileExistsError:
        raise InvalidArgument(f"{path}: exists (a stream is never written over a file)") from None
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path}: is a directory") from None


@click.command("send")
@click.argument("ref", metavar="VOLUME@NAME")
@click.option("--from", "base", metavar="VOLUME@BASE", help="Send only the changes since this older snapshot.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the stream here (default: stdout).")
@json_option
@pass_settings
def send(settings: Settings, ref: str, base: str | None, output: str | None, as_json: bool) -> None:
    """Write a snapshot as a stream: whole, or the changes since --from."""
    fd = _open(output, write=True)
    try:
        with progress_bar(settings, f"send {ref}") as prog:
            res = call(settings.pool, "send", progress=prog, ref=ref, fd=fd, base=base)
    except BaseException:
        if output not in (None, "-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(output)   # a stream cut short is no stream: leave nothing behind
        raise
    finally:
        os.close(fd)
    # with the stream on stdout, the report goes to stderr
    to_stderr = output in (None, "-")
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True), err=to_stderr)
    elif not settings.quiet:
        click.echo(f"sent {ref} ({res['kind']}{', from ' + base if base else ''}): "
                   f"{format_size(res['data_bytes'])} of data in a {format_size(res['stream_bytes'])} stream",
                   err=to_stderr)


@click.command("receive")
@click.argument("volume")
@click.option("-i", "--input", "source", type=click.Path(dir_okay=False),
              help="Read the stream from here (default: stdin).")
@click.option("-F", "--force", is_flag=True,
              help="Roll the volume back to the stream's base first if it was written since (those writes are lost).")
@json_option
@pass_settings
def receive(settings: Settings, volume: str, source: str | None, force: bool, as_json: bool) -> None:
    """Make a snapshot from a stream: a new volume (full) or on top of its base (incremental)."""
    fd = _open(source, write=False)
    try:
        with progress_bar(settings, f"receive {volume}") as prog:
            res = call(settings.pool, "receive", progress=prog, name=volume, fd=fd, force=force)
    finally:
        os.close(fd)
    emit(res, as_json, None if settings.quiet else
         f"received {res['snapshot']} ({res['kind']}, {format_size(res['bytes'])} applied)")


COMMANDS = [send, receive]
