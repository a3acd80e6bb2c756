"""Loop devices and mounts, through losetup/mount/umount and what /sys and /proc show.

The daemon never trusts only its own records: after a crash the kernel's view
(/sys/block/loopN/loop/backing_file, /proc/self/mountinfo) says what is really
attached and mounted, so stale devices are found even if no record survived.
"""
from __future__ import annotations

import errno
import glob
import os
import re
import subprocess
import time
from dataclasses import dataclass

from ..errors import BlocksnapError, Busy, InvalidArgument

# ext2/3/4 without journal replay, xfs without log recovery (and a duplicate UUID is
# expected: the snapshot's filesystem may be mounted live at the same time)
RO_OPTIONS = {"ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload",
              "xfs": "ro,norecovery,nouuid", "btrfs": "ro,rescue=nologreplay"}


class CommandFailed(BlocksnapError):
    """A system tool (losetup, mount, umount) failed; the message is its stderr."""


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CommandFailed(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{' '.join(cmd)}: timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        # the tool's own first error line (the last is often a hint like "dmesg(1) may
        # have more information"), without the tool's name when it gives it already
        lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "dmesg(1)" not in ln), lines[-1] if lines else "")
        msg = msg or f"exit status {res.returncode}"
        raise CommandFailed(msg if msg.startswith(f"{cmd[0]}:") else f"{cmd[0]}: {msg}")
    return res.stdout


# -- loop devices ---------------------------------------------------------------
def attach(path: str, *, read_only: bool, direct_io: bool) -> str:
    """losetup -f on `path`; retries the race with another losetup grabbing the device."""
    cmd = ["losetup", "-f", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if read_only:
        cmd.append("-r")
    for attempt in range(5):
        try:
            return _run(cmd + [path]).strip()
        except CommandFailed as e:
            if "busy" not in str(e).lower() or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def detach(device: str) -> None:
    _run(["losetup", "-d", device])


def backing_file(device: str) -> str | None:
    """What a loop device is bound to, or None if it is free (or no loop device)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def bound_loops() -> dict[str, str]:
    """{/dev/loopN: backing file} for every bound loop device."""
    out = {}
    for p in glob.glob("/sys/block/loop*/loop/backing_file"):
        dev = "/dev/" + p.split("/")[3]
        try:
            with open(p) as f:
                out[dev] = f.read().rstrip("\n")
        except OSError:
            pass
    return out


def loops_under(directory: str) -> dict[str, str]:
    """Loop devices whose backing file lies under `directory`."""
    d = os.path.abspath(directory).rstrip("/") + "/"
    return {dev: f for dev, f in bound_loops().items()
            if f.removesuffix(" (deleted)").startswith(d)}


def wait_detached(device: str, path: str, timeout: float = 5.0) -> bool:
    """losetup -d may finish asynchronously: wait until the device lets go of `path`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backing_file(device) != path:
            return True
        time.sleep(0.02)
    return False


def holders(device: str) -> list[str]:
    """Device-mapper/md devices stacked on a loop device."""
    try:
        return os.listdir(f"/sys/block/{os.path.basename(device)}/holders")
    except OSError:
        return []


# -- mounts ---------------------------------------------------------------------
@dataclass
class MountEntry:
    devno: str  # "major:minor"
    mountpoint: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) >= 5 and len(b) >= 2:
                out.append(MountEntry(a[2], _unescape(a[4]), b[0], _unescape(b[1])))
    return out


def devno(device: str) -> str | None:
    try:
        st = os.stat(device)
    except OSError:
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounted_at(device: str) -> list[str]:
    """Where a block device is mounted (matched by device number, not by name)."""
    num = devno(device)
    return [m.mountpoint for m in mounts() if num and m.devno == num]


def mount_at(directory: str) -> MountEntry | None:
    """The topmost mount on `directory`, if it is a mountpoint."""
    d = os.path.realpath(directory) if os.path.exists(directory) else os.path.abspath(directory)
    found = None
    for m in mounts():
        if m.mountpoint == d:
            found = m
    return found


def fstype(device: str) -> str | None:
    try:
        res = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                             capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def mount_ro(device: str, directory: str) -> str:
    """Mount read-only without log replay; returns the filesystem type."""
    kind = fstype(device)
    cmd = ["mount", "-o", RO_OPTIONS.get(kind or "", "ro")]
    if kind:
        cmd += ["-t", kind]
    try:
        _run(cmd + [device, directory])
    except CommandFailed as e:
        what = kind or "blkid finds no filesystem on it"
        raise InvalidArgument(f"cannot mount {device} ({what}): {e}") from None
    return kind or "unknown"


def umount(directory: str, *, lazy: bool = False) -> None:
    _run(["umount"] + (["-l"] if lazy else []) + [directory])


def umount_fuse(mountpoint: str) -> None:
    """Lazy unmount of a FUSE mount (dead or alive); as a user through fusermount3."""
    if os.geteuid() == 0:
        _run(["umount", "-l", mountpoint])
    else:
        _run(["fusermount3", "-u", "-z", mountpoint])


def check_free(device: str) -> None:
    """Refuse to detach a device something still uses (a mount or a stacked device)."""
    where = mounted_at(device)
    if where:
        raise Busy(f"{device} is mounted on {where[0]}: unmount it first")
    held = holders(device)
    if held:
        raise Busy(f"{device} is in use by {', '.join(held)}: remove those first")
    for _ in range(10):   # udev and blkid open a device for a moment after changes
        users = openers(device)
        if not users:
            break
        time.sleep(0.1)
    if users:
        raise Busy(f"{device} is open in {', '.join(users)}: close it first")
    if claimed(device):
        raise Busy(f"{device} is in use (mounted in another mount namespace?): unmount it first")


def openers(device: str) -> list[str]:
    """Processes other than this one holding the device open ('pid N (name)')."""
    real = os.path.realpath(device)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == real for fd in fds):
                with open(f"/proc/{pid}/comm") as f:
                    found.append(f"pid {pid} ({f.read().strip()})")
        except OSError:
            continue   # gone, or not ours to look at
    return found


def claimed(device: str) -> bool:
    """Held exclusively (a mount anywhere, even in a namespace we cannot see)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False
