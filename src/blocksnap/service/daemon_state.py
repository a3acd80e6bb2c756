"""What a daemon has attached and mounted, kept in <pool>/daemon.json.

The file outlives a `kill -9`: the next daemon (which can only start once the dead
one's pool lock is gone) reads it, together with what the kernel still shows, to
take down the stale FUSE mount, the loop devices pointing into it and the
snapshot mounts on those devices.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Busy, NotFound
from . import loopdev

log = logging.getLogger("blocksnap.daemon")

STATE_NAME = "daemon.json"
LOG_NAME = "daemon.log"
FSNAME_PREFIX = "blocksnap:"


def state_path(pool_path: str) -> str:
    return os.path.join(os.path.abspath(pool_path), STATE_NAME)


def log_path(pool_path: str) -> str:
    return os.path.join(os.path.abspath(pool_path), LOG_NAME)


def fsname(pool_path: str) -> str:
    """The FUSE source name: identifies a mount as this pool's, alive or dead."""
    return re.sub(r"[,\s]", "_", FSNAME_PREFIX + os.path.abspath(pool_path))


@dataclass
class Device:
    """A loop device the daemon made: a live volume, or a snapshot mounted at `mount`."""

    device: str
    volume: str
    path: str
    read_only: bool
    snapshot: str | None = None
    mount: str | None = None
    fstype: str | None = None


@dataclass
class State:
    pid: int
    mountpoint: str
    read_only: bool = False
    devices: list[Device] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, pool_path: str) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        path = state_path(pool_path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, pool_path: str) -> "State | None":
        try:
            with open(state_path(pool_path)) as f:
                raw = json.load(f)
            return cls(pid=int(raw["pid"]), mountpoint=raw["mountpoint"],
                       read_only=bool(raw.get("read_only")),
                       devices=[Device(**d) for d in raw.get("devices", [])])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def remove_state(pool_path: str) -> None:
    try:
        os.unlink(state_path(pool_path))
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _take_down(device: str, why: str) -> None:
    """Unmount whatever sits on a dead loop device, then detach it."""
    for where in loopdev.mounted_at(device):
        log.warning("%s: lazily unmounting %s from dead device %s", why, where, device)
        try:
            loopdev.umount(where, lazy=True)
        except loopdev.CommandFailed as e:
            log.error("cannot unmount %s: %s", where, e)
    path = loopdev.backing_file(device)
    log.warning("%s: detaching %s (was %s)", why, device, path)
    try:
        loopdev.detach(device)
    except loopdev.CommandFailed as e:
        log.error("cannot detach %s: %s", device, e)
        return
    if path and not loopdev.wait_detached(device, path):
        log.warning("%s is still bound (in use?): it will go when its last user closes it", device)


def cleanup_stale(pool_path: str, mountpoint: str) -> list[str]:
    """Clean up after a daemon that died without shutting down; returns what was done.

    Call only while holding the pool's lock: then no live daemon serves the pool,
    and any FUSE mount with this pool's name is a dead one.
    """
    done: list[str] = []
    state = State.load(pool_path)
    name = fsname(pool_path)
    mps = {os.path.abspath(mountpoint)}
    if state is not None:
        mps.add(os.path.abspath(state.mountpoint))
        for d in state.devices:  # recorded devices still bound to what we made them for
            if loopdev.backing_file(d.device) == d.path:
                _take_down(d.device, "stale device")
                done.append(d.device)
    for mp in sorted(mps):
        m = loopdev.mount_at(mp)
        if m is None or m.source != name:
            continue
        for dev in loopdev.loops_under(mp):
            if dev not in done:   # a recorded one is down already
                _take_down(dev, "stale device")
                done.append(dev)
        log.warning("unmounting stale FUSE mount %s", mp)
        try:
            loopdev.umount_fuse(mp)
            done.append(mp)
        except loopdev.CommandFailed as e:
            log.error("cannot unmount stale %s: %s", mp, e)
    sock = os.path.join(os.path.abspath(pool_path), "daemon.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    remove_state(pool_path)
    return done


def check_mountpoint(mountpoint: str) -> None:
    """The mountpoint must be a directory nothing is mounted on (created if missing)."""
    if os.path.exists(mountpoint) and not os.path.isdir(mountpoint):
        raise Busy(f"{mountpoint}: exists and is not a directory")
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    if loopdev.mount_at(mountpoint) is not None or is_dead_mount(mountpoint):
        raise Busy(f"{mountpoint}: something is already mounted there")


def offline_umount(pool_path: str, directory: str) -> Device:
    """`umount DIR` when the daemon is dead: take down the recorded snapshot mount."""
    state = State.load(pool_path)
    target = os.path.abspath(directory)
    for d in state.devices if state else []:
        if d.mount and os.path.abspath(d.mount) == target:
            if loopdev.mount_at(target) is not None:
                loopdev.umount(target, lazy=True)
            if loopdev.backing_file(d.device) == d.path:
                loopdev.detach(d.device)
            state.devices.remove(d)
            state.save(pool_path)
            return d
    raise NotFound(f"{directory}: not a snapshot mounted by blocksnap for this pool")
