"""`blocksnap serve|attach|detach|stop|mount|umount`: the FUSE daemon and loop devices."""
from __future__ import annotations

import contextlib
import os

import click

from ..errors import BlocksnapError, Busy
from ..service import daemon_spawn
from ..service.control import NOT_RUNNING, try_remote
from ..service.runner import call
from .context import Settings, emit, json_option, pass_settings


def _note(settings: Settings, text: str) -> None:
    """Progress chatter goes to stderr, so stdout stays the one useful line."""
    if not settings.quiet:
        click.echo(text, err=True)


def _remote(settings: Settings, op: str, **args) -> dict:
    res = try_remote(settings.pool, op, args, daemon_timeout=settings.env.daemon_timeout)
    if res is NOT_RUNNING:
        raise BlocksnapError(f"no daemon serves {os.path.abspath(settings.pool)} "
                             "(start one with 'blocksnap attach' or 'blocksnap serve')")
    return res


def _ensure_daemon(settings: Settings, check_op: str, **check_args) -> tuple[dict, bool]:
    """The pool's daemon, started if needed, but not for a volume or snapshot that does
    not exist (checked first, where the pool lives)."""
    call(settings.pool, check_op, **check_args)
    return daemon_spawn.ensure(settings.pool)


@click.command("serve")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", is_flag=True, help="Stay in the foreground (logs still go to daemon.log).")
@click.option("--read-only", is_flag=True, help="Serve the live volumes read-only too.")
@click.option("--allow-other", is_flag=True, help="Let other users in (FUSE allow_other; file modes still apply).")
@pass_settings
def serve(settings: Settings, mountpoint: str, foreground: bool, read_only: bool, allow_other: bool) -> None:
    """Serve the pool over FUSE at MOUNTPOINT and own it until stopped."""
    st = daemon_spawn.status(settings.pool)
    if st is not None:
        raise Busy(f"{os.path.abspath(settings.pool)} is already served at {st['mountpoint']} (pid {st['pid']})")
    if foreground:
        from ..service.daemon import Daemon, setup_logging
        setup_logging(settings.pool, settings.debug)
        Daemon(settings.pool, mountpoint, read_only=read_only, allow_other=allow_other,
               loop_direct_io=settings.env.loop_direct_io, write_behind=settings.env.write_behind,
               fast_io=settings.env.fast_io,
               debug=settings.debug).run()
        return
    st = daemon_spawn.start(settings.pool, mountpoint, read_only=read_only, allow_other=allow_other,
                            debug=settings.debug)
    _note(settings, f"serving {st['pool']} at {st['mountpoint']} (pid {st['pid']})")


@click.command("attach")
@click.argument("volume")
@click.option("--read-only", is_flag=True, help="A read-only loop device.")
@json_option
@pass_settings
def attach(settings: Settings, volume: str, read_only: bool, as_json: bool) -> None:
    """Loop-attach a live volume (starting the daemon if needed); prints /dev/loopN."""
    st, started = _ensure_daemon(settings, "volume_show", name=volume)
    dev = _remote(settings, "attach", volume=volume, read_only=read_only)
    if started:
        _note(settings, f"started daemon (pid {st['pid']}) serving at {st['mountpoint']}")
    emit(dev, as_json, dev["device"])


@click.command("detach")
@click.argument("target", metavar="VOLUME|/dev/loopN")
@pass_settings
def detach(settings: Settings, target: str) -> None:
    """Detach the loop device of a volume."""
    res = _remote(settings, "detach", target=target)
    _note(settings, f"detached {', '.join(res['detached'])} ({res['volume']})")


@click.command("stop")
@click.option("--force", is_flag=True, help="Unmount and detach everything first; interrupt a receive.")
@pass_settings
def stop(settings: Settings, force: bool) -> None:
    """Stop the pool's daemon (refused while devices are attached or a receive runs, unless --force)."""
    if force and try_remote(settings.pool, "daemon_status", {},
                            daemon_timeout=settings.env.daemon_timeout) is NOT_RUNNING:
        # a daemon killed with -9 leaves its mounts and devices: take them down
        done = daemon_spawn.cleanup_dead(settings.pool)
        _note(settings, "no daemon was running; "
              + (f"cleaned up {', '.join(done)}" if done else "nothing to clean up"))
        return
    res = _remote(settings, "stop", force=force)
    # a forced stop unmounts and detaches every device first, a few seconds each when busy
    if not daemon_spawn.wait_stopped(res["stopping"], timeout=300.0 if force else 60.0):
        raise BlocksnapError(f"the daemon (pid {res['stopping']}) is still shutting down")
    left: list[str] = []
    if force:   # if it died on the way (kill -9 during the stop), take down what it left
        with contextlib.suppress(Busy):   # (another command got the pool first: it cleans up)
            left = daemon_spawn.cleanup_dead(settings.pool)
    _note(settings, f"stopped daemon (pid {res['stopping']})" + (f"; cleaned up {', '.join(left)}" if left else ""))


@click.command("mount")
@click.argument("ref", metavar="VOLUME@NAME")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@pass_settings
def mount(settings: Settings, ref: str, directory: str, as_json: bool) -> None:
    """Mount a snapshot's filesystem read-only (no journal replay) on DIRECTORY."""
    st, started = _ensure_daemon(settings, "snapshot_show", ref=ref)
    res = _remote(settings, "mount", ref=ref, directory=os.path.abspath(directory))
    if started:
        _note(settings, f"started daemon (pid {st['pid']}) serving at {st['mountpoint']}")
    emit(res, as_json, None if settings.quiet else
         f"mounted {ref} ({res['fstype']}) on {res['mount']} via {res['device']}")


@click.command("umount")
@click.argument("directory", type=click.Path(file_okay=False))
@pass_settings
def umount(settings: Settings, directory: str) -> None:
    """Unmount a snapshot mounted with `blocksnap mount` and free its loop device."""
    res = try_remote(settings.pool, "umount", {"directory": os.path.abspath(directory)},
                     daemon_timeout=settings.env.daemon_timeout)
    if res is NOT_RUNNING:
        from ..service.daemon_state import offline_umount
        dev = offline_umount(settings.pool, directory)
        res = {"unmounted": directory, "device": dev.device}
    _note(settings, f"unmounted {res['unmounted']} ({res['device']} detached)")


COMMANDS = [serve, attach, detach, stop, mount, umount]
