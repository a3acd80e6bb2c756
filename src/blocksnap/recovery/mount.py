"""A backup's filesystem mounted read-only, and everything it takes, made and undone.

`mount_backup` starts the image server (server.py, detached) on a FUSE mountpoint,
loop-attaches `<id>.img` read-only and mounts its filesystem read-only without
log replay (ext4 `noload`, xfs `norecovery`: service/loopdev.RO_OPTIONS). What it
made is written down first, in a state directory of the runtime directory
(`recovery/<key>/state.json`, key from the directory's path), so `unmount` (and
the next drill, for a drill's leftovers) can undo all of it even after the
command, the server or the drill was killed: the filesystem, the loop device, the
FUSE mount, the server process, and the lock the server held in the repository.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BlocksnapError, Busy, InvalidArgument, NotFound
from ..service import loopdev
from ..settings import Settings, resolve
from .source import DEFAULT_CACHE

CACHE_DIR = "/var/tmp"          # the cache file (unnamed) and drill work directories
START_TIMEOUT = 120.0


class ServerFailed(BlocksnapError):
    """The image server could not start (its own error, or its exit)."""


def registry(settings: Settings | None = None) -> Path:
    """Where the state of mounts and drills is kept: the runtime directory's recovery/."""
    s = resolve(settings)
    base = (Path(s.runtime_dir) if s.runtime_dir else
            Path("/run/blocksnap") if os.geteuid() == 0 else
            Path(s.xdg_runtime_dir) / "blocksnap" if s.xdg_runtime_dir else Path(f"/dev/shm/blocksnap-{os.geteuid()}"))
    d = base / "recovery"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def key_of(directory: str) -> str:
    return hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]


def state_dir(directory: str, settings: Settings | None = None) -> Path:
    return registry(settings) / key_of(directory)


def load_state(d: Path) -> dict | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def save_state(d: Path, state: dict) -> None:
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / "state.json")


def all_states(settings: Settings | None = None) -> list[tuple[Path, dict]]:
    out = []
    for d in sorted(registry(settings).iterdir()):
        st = load_state(d)
        if st is not None:
            out.append((d, st))
        elif d.is_dir() and time.time() - d.stat().st_mtime > 60:
            shutil.rmtree(d, ignore_errors=True)     # a state dir whose state was never written
    return out


# -- processes ------------------------------------------------------------------------
def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat: a pid reused later
    differs), or None when it is gone or a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int | None, started: str | None) -> bool:
    return bool(pid) and start_time(pid) is not None and start_time(pid) == started


def stop_process(pid: int | None, started: str | None, timeout: float = 5.0) -> bool:
    """Wait for it to end, then SIGTERM, then SIGKILL: True if it had to be killed."""
    killed = False
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            killed = True
        deadline = time.monotonic() + timeout
        while alive(pid, started) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
        if not alive(pid, started):
            return killed
    return killed


class _Child:
    """The forked image server, as far as its starter needs it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def spawn_server(sd: Path, *, repo: str, endpoint: str | None, password: bytes, backup: str, mountpoint: str,
                 cache_size: int, cache_dir: str | None, overlay_dir: str | None = None,
                 op: str = "mount") -> tuple[_Child, dict]:
    """Start the image server detached; returns it and its ready message (or raises
    its error). It is a fork of this process (which must have no threads yet): the
    modules it needs are loaded already, so it starts in the time it takes to open
    the repository, not to start another interpreter. The password stays in memory."""
    from . import server  # loaded before the fork, with what it imports
    server.preload()
    r, w = os.pipe()
    req = {"repo": repo, "endpoint": endpoint, "password": base64.b64encode(password).decode(),
           "backup": backup, "mountpoint": mountpoint, "cache_size": cache_size, "cache_dir": cache_dir,
           "overlay_dir": overlay_dir, "state_dir": str(sd), "status_fd": w, "op": op}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:         # the server: its own session, its log as stdout and stderr, no other fds
        code = 1
        try:
            os.setsid()
            log = os.open(sd / "server.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.closerange(3, w)
            os.closerange(w + 1, 65536)
            code = server.run(req)
        finally:
            os._exit(code)
    os.close(w)
    child = _Child(pid)
    try:
        msg = _read_status(r, child)
    finally:
        os.close(r)
    if "error" in msg:
        child.wait(30)
        raise _error_class(msg.get("class"))(msg["error"])
    return child, msg


def _read_status(fd: int, proc: _Child) -> dict:
    buf = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise ServerFailed(f"the image server did not start within {START_TIMEOUT:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            piece = os.read(fd, 65536)
            if not piece:
                break
            buf += piece
    if b"\n" not in buf:
        proc.wait(10)
        raise ServerFailed(f"the image server exited with status {proc.returncode} before it was ready")
    return json.loads(buf.split(b"\n", 1)[0])


def _error_class(name: str | None) -> type[BlocksnapError]:
    from .. import errors
    from ..backup import backends, crypto
    for mod in (errors, crypto, backends):
        cls = getattr(mod, name or "", None)
        if isinstance(cls, type) and issubclass(cls, BlocksnapError):
            return cls
    return ServerFailed


# -- mount and unmount ---------------------------------------------------------------
def check_directory(directory: str, settings: Settings | None = None) -> str:
    """The directory's real path; refuses what is missing, not a directory, already a
    mountpoint, or already registered for a backup mount or drill."""
    if not os.path.exists(directory):
        raise NotFound(f"{directory}: no such directory")
    if not os.path.isdir(directory):
        raise InvalidArgument(f"{directory}: not a directory")
    real = os.path.realpath(directory)
    if loopdev.mount_at(real) is not None or load_state(state_dir(real, settings)) is not None:
        raise Busy(f"{directory}: already a mountpoint (`blocksnap umount {directory}` first)")
    return real


def mount_backup(repo: str, password: bytes, backup: str, directory: str, *, endpoint: str | None = None,
                 cache_size: int = DEFAULT_CACHE, cache_dir: str | None = CACHE_DIR, image_only: bool = False,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Mount backup's filesystem read-only at `directory` (or with `image_only`, serve
    `directory/<id>.img`). The image server runs on after this returns."""
    real = check_directory(directory, settings)
    sd = state_dir(real, settings)
    sd.mkdir(mode=0o700)
    image_mnt = real if image_only else str(sd / "image")
    state: dict[str, Any] = {"kind": "image" if image_only else "mount", "dir": real, "image_mnt": image_mnt,
                             "repo": repo, "endpoint": endpoint, "backup": backup, "created": time.time(),
                             "host": socket.gethostname()}
    save_state(sd, state)
    try:
        os.makedirs(image_mnt, exist_ok=True)
        proc, ready = spawn_server(sd, repo=repo, endpoint=endpoint, password=password, backup=backup,
                                   mountpoint=image_mnt, cache_size=cache_size, cache_dir=cache_dir)
        state.update(server_pid=proc.pid, server_start=start_time(proc.pid), backup=ready["backup"],
                     image=ready["image"], size=ready["size"], volume=ready["volume"])
        save_state(sd, state)
        if not image_only:
            state["device"] = loopdev.attach(ready["image"], read_only=True, direct_io=False)
            save_state(sd, state)
            state["fstype"] = loopdev.mount_ro(state["device"], real)
            save_state(sd, state)
    except BaseException:
        with contextlib.suppress(BlocksnapError, OSError):
            teardown(sd, state, lazy=True)
        raise
    return {k: state.get(k) for k in ("backup", "volume", "dir", "image", "device", "fstype", "size", "kind")}


def find(directory: str, settings: Settings | None = None) -> tuple[Path, dict] | None:
    """The mount or drill registered for `directory`, if any."""
    sd = state_dir(directory, settings)
    st = load_state(sd)
    return (sd, st) if st is not None else None


def teardown(sd: Path, state: dict, *, lazy: bool = False) -> list[str]:
    """Undo everything `state` records, innermost first; returns what was done. A
    filesystem still in use is refused (Busy) unless `lazy`."""
    done: list[str] = []
    for svc in state.get("services", []):
        if alive(svc.get("pid"), svc.get("start")):
            if svc.get("group"):          # a command's whole process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc["pid"], signal.SIGKILL)
            stop_process(svc["pid"], svc.get("start"), timeout=0.5)
            done.append(f"stopped {svc.get('kind')} (pid {svc['pid']})")
    fs_dir = state.get("fs_dir") or (state["dir"] if state.get("kind") == "mount" else None)
    dev = state.get("device")
    if fs_dir:
        m = loopdev.mount_at(fs_dir)
        if m is not None and (dev is None or m.source == dev or m.devno == loopdev.devno(dev)):
            try:
                loopdev.umount(fs_dir, lazy=lazy)
            except loopdev.CommandFailed as e:
                if not lazy:
                    raise Busy(f"{state['dir']}: {e}") from None
                loopdev.umount(fs_dir, lazy=True)
            done.append(f"unmounted {fs_dir}")
    image = state.get("image")
    if dev and image and loopdev.backing_file(dev) in (image, image + " (deleted)"):
        with contextlib.suppress(loopdev.CommandFailed):
            loopdev.detach(dev)
        loopdev.wait_detached(dev, image)
        done.append(f"detached {dev}")
    image_mnt = state.get("image_mnt")
    if image_mnt and loopdev.mount_at(image_mnt) is not None:
        try:
            loopdev.umount(image_mnt)
        except loopdev.CommandFailed:
            loopdev.umount_fuse(image_mnt)
        done.append(f"unmounted {image_mnt}")
    pid, started = state.get("server_pid"), state.get("server_start")
    if pid:
        if stop_process(pid, started):
            done.append(f"killed image server {pid}")
            _drop_lock(state, pid)
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    owner = state.get("owner_pid")
    if owner and owner != os.getpid() and not alive(owner, state.get("owner_start")):
        _drop_lock(state, owner)       # a drill killed while it held its lock
    for d in state.get("remove", []):
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(sd, ignore_errors=True)
    return done


def _drop_lock(state: dict, pid: int) -> None:
    """The repository lock a killed process of this host left (no key needed to delete it)."""
    from ..backup.backends import open_backend
    with contextlib.suppress(Exception):
        be = open_backend(state["repo"], state.get("endpoint"))
        for key in be.list("locks"):
            lk = json.loads(be.get(key))
            if lk.get("host") == socket.gethostname() and lk.get("pid") == pid:
                be.delete(key)


def sweep(settings: Settings | None = None) -> list[str]:
    """Undo what killed drills left (their owner process is gone): returns what was done."""
    done = []
    for sd, st in all_states(settings):
        if st.get("kind") == "drill" and not alive(st.get("owner_pid"), st.get("owner_start")):
            with contextlib.suppress(BlocksnapError, OSError):
                done += teardown(sd, st, lazy=True)
    return done


def unmount(directory: str, settings: Settings | None = None) -> dict[str, Any]:
    """Undo `mount_backup` (or a drill's leftovers) at `directory`."""
    found = find(directory, settings)
    if found is None:
        raise NotFound(f"{directory}: no backup is mounted there")
    sd, state = found
    damaged = _damaged(sd)
    done = teardown(sd, state)
    return {"dir": state["dir"], "backup": state.get("backup"), "done": done, "damaged": damaged}


def _damaged(sd: Path) -> list[str]:
    try:
        return [ln for ln in (sd / "damaged").read_text().splitlines() if ln]
    except OSError:
        return []
