"""Operations only a daemon has: attach/detach/mount/umount/stop/status, and guards.

Everything in service.ops runs here too, on the daemon's open pool. Operations that
would pull data from under a loop device or a mounted snapshot (rollback, volume
delete or resize, snapshot delete) are refused while it is attached, mounted or
open, checked and run under the pool lock so nothing can open it in between.

Locks: `pool.lock` guards the engine, `reg_lock` the device list (held briefly,
never across a subprocess), `ops_lock` serialises attach/detach/mount/umount/stop,
which run losetup and mount and so must never hold the pool lock (the FUSE threads
serving those tools need it).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import Busy, InvalidArgument, NotFound, UnknownOperation
from ..units import split_snapshot_ref, validate_name
from . import loopdev
from .daemon_state import Device
from .ops import OPS

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("blocksnap.daemon")
# operations that change a volume, refused while a receive writes it
CHANGES_VOLUME = {"attach", "volume_delete", "volume_resize", "snapshot_create", "snapshot_set_metadata",
                  "snapshot_delete", "snapshot_rollback"}


class DaemonOps:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.reg_lock = threading.Lock()
        self.ops_lock = threading.Lock()
        self.receiving: set[str] = set()   # volumes a receive is writing: not to be attached
        self.handlers = {
            "receive": self.receive,
            "daemon_status": self.daemon_status, "attach": self.attach, "detach": self.detach,
            "mount": self.mount, "umount": self.umount, "stop": self.stop,
            "snapshot_delete": self._guard_snapshot("snapshot_delete"),
            "snapshot_rollback": self._guard_volume("snapshot_rollback", "roll back"),
            "volume_delete": self._guard_volume("volume_delete", "delete"),
            "volume_resize": self._guard_volume("volume_resize", "resize"),
        }

    # -- dispatch ----------------------------------------------------------------
    def __call__(self, op: str, args: dict[str, Any]) -> Any:
        if op not in self.handlers and op not in OPS:
            raise UnknownOperation(f"the daemon offers no operation {op!r} (known: "
                                   f"{', '.join(sorted(self.operations()))})")
        self._refuse_during_receive(op, args)
        self.d.fs.drain()   # every write acknowledged before the command is in the engine
        if op in self.handlers:
            return self.handlers[op](**args)
        return OPS[op](self.d.pool, **args)

    def operations(self) -> set[str]:
        """Every operation a client may ask for: service.ops' table and the daemon's own."""
        return set(OPS) | set(self.handlers)

    def _refuse_during_receive(self, op: str, args: dict[str, Any]) -> None:
        """Nothing changes a volume a receive is writing (reads, send, export go on)."""
        if not self.receiving:
            return
        if op == "check" and args.get("repair"):
            raise Busy("a receive is running: repair the pool when it is over")
        if op not in CHANGES_VOLUME:
            return
        target = args.get("ref") or args.get("name") or args.get("volume") or ""
        volume = str(target).split("@")[0]
        if volume in self.receiving:
            raise Busy(f"volume {volume} is being received into; try again when that is over")

    @property
    def devices(self) -> list[Device]:
        return self.d.state.devices

    def _save(self) -> None:
        with self.reg_lock:
            self.d.state.save(self.d.pool_path)

    # -- guards --------------------------------------------------------------------
    def _busy_volume(self, volume: str, snapshots_too: bool) -> str | None:
        for dev in self.devices:
            if dev.volume == volume and (dev.snapshot is None or snapshots_too):
                what = f"mounted on {dev.mount}" if dev.mount else f"attached as {dev.device}"
                return f"{volume}@{dev.snapshot} is {what}" if dev.snapshot else f"volume {volume} is {what}"
        n = self.d.fs.volume_in_use(volume) if snapshots_too else self.d.fs.in_use(volume)
        if n:
            return f"volume {volume} is open ({n} handle(s) on its image in {self.d.mountpoint})"
        return None

    def _guard_volume(self, op: str, verb: str):
        def run(name: str | None = None, ref: str | None = None, **kw: Any) -> Any:
            volume = split_snapshot_ref(ref)[0] if ref is not None else validate_name(name or "", "volume name")
            with self.d.pool.lock, self.reg_lock:
                why = self._busy_volume(volume, snapshots_too=(op == "volume_delete"))
                if why:
                    raise Busy(f"cannot {verb} {ref or volume}: {why}; detach it first")
                args = dict(kw, **({"ref": ref} if ref is not None else {"name": name}))
                return OPS[op](self.d.pool, **args)
        return run

    def _guard_snapshot(self, op: str):
        def run(ref: str, **kw: Any) -> Any:
            volume, snap = split_snapshot_ref(ref)
            with self.d.pool.lock, self.reg_lock:
                for dev in self.devices:
                    if dev.volume == volume and dev.snapshot == snap:
                        where = f"mounted on {dev.mount}" if dev.mount else f"attached as {dev.device}"
                        raise Busy(f"cannot delete {ref}: it is {where}; unmount it first")
                if self.d.fs.in_use(volume, snap):
                    raise Busy(f"cannot delete {ref}: its image is open in {self.d.mountpoint}")
                return OPS[op](self.d.pool, ref=ref, **kw)
        return run

    def receive(self, name: str, fd: int | None = None, watch_fd: int | None = None,
                progress: Any = None, force: bool = False) -> Any:
        """A stream into a volume nobody has attached, mounted or open, kept so until done."""
        if fd is None:
            raise InvalidArgument("receive needs the stream's file passed with the request")
        if self.d.read_only:
            raise Busy("the pool is served read-only: nothing can be received into it")
        volume = validate_name(name, "volume name")
        with self.ops_lock, self.d.pool.lock, self.reg_lock:
            self._check_running()
            if volume in self.receiving:
                raise Busy(f"volume {volume} is already being received into")
            why = self._busy_volume(volume, snapshots_too=False) if self.d.pool.has_volume(volume) else None
            if why:
                raise Busy(f"cannot receive into {volume}: {why}; detach it first")
            self.receiving.add(volume)
            self.d.fs.write_blocked.add(volume)   # nor can the FUSE image be opened to write
        try:
            return OPS["receive"](self.d.pool, name=volume, fd=fd, watch_fd=watch_fd, progress=progress,
                                  force=force)
        finally:
            self.d.fs.write_blocked.discard(volume)
            self.receiving.discard(volume)

    # -- status --------------------------------------------------------------------
    def daemon_status(self) -> dict[str, Any]:
        with self.reg_lock:
            devices = [vars(d).copy() for d in self.devices]
        return {"pid": os.getpid(), "pool": self.d.pool_path, "mountpoint": self.d.mountpoint,
                "read_only": self.d.read_only, "ready": self.d.ready.is_set(),
                "stopping": self.d.stopping.is_set(), "devices": devices,
                "loop_direct_io": self.d.loop_direct_io}

    def _check_running(self) -> None:
        if self.d.stopping.is_set():
            raise Busy("the pool's daemon is shutting down")

    # -- attach / detach -------------------------------------------------------------
    def attach(self, volume: str, read_only: bool = False) -> dict[str, Any]:
        with self.ops_lock:
            self._check_running()
            vol = self.d.pool.volume(volume)
            if self.d.read_only and not read_only:
                raise InvalidArgument(f"the pool is served read-only: use 'attach --read-only {volume}'")
            with self.reg_lock:
                for dev in self.devices:
                    if dev.volume == volume and dev.snapshot is None and not (dev.read_only and read_only):
                        raise Busy(f"volume {volume} is already attached as {dev.device}")
            path = os.path.join(self.d.mountpoint, vol.name, "volume.img")
            device = loopdev.attach(path, read_only=read_only, direct_io=self.d.loop_direct_io)
            dev = Device(device=device, volume=volume, path=path, read_only=read_only)
            with self.reg_lock:
                self.devices.append(dev)
            self._save()
            log.info("attached %s as %s%s", volume, device, " (read-only)" if read_only else "")
            return vars(dev).copy()

    def _detach_one(self, dev: Device) -> None:
        loopdev.check_free(dev.device)
        if loopdev.backing_file(dev.device) == dev.path:
            loopdev.detach(dev.device)
            if not loopdev.wait_detached(dev.device, dev.path):
                log.warning("%s still bound after detach (held open elsewhere)", dev.device)
        with self.reg_lock:
            if dev in self.devices:
                self.devices.remove(dev)
        self._save()
        self._wait_released(dev)
        log.info("detached %s (%s)", dev.device, dev.volume)

    def _wait_released(self, dev: Device, timeout: float = 3.0) -> None:
        """FUSE release is asynchronous: let it land so a rollback right after works."""
        deadline = time.monotonic() + timeout
        while self.d.fs.in_use(dev.volume, dev.snapshot) and time.monotonic() < deadline:
            time.sleep(0.01)

    def detach(self, target: str) -> dict[str, Any]:
        with self.ops_lock:
            with self.reg_lock:
                if target.startswith("/dev/"):
                    real = os.path.realpath(target)
                    found = [d for d in self.devices if os.path.realpath(d.device) == real]
                else:
                    validate_name(target, "volume name")
                    found = [d for d in self.devices if d.volume == target and d.snapshot is None]
            if not found:
                raise NotFound(f"{target}: not attached by this pool's daemon")
            for dev in found:
                if dev.mount:
                    raise Busy(f"{dev.device} holds {dev.volume}@{dev.snapshot} mounted on {dev.mount}: "
                               f"use 'blocksnap umount {dev.mount}'")
            for dev in found:
                self._detach_one(dev)
            return {"detached": [d.device for d in found], "volume": found[0].volume}

    # -- snapshot mounts -------------------------------------------------------------
    def mount(self, ref: str, directory: str) -> dict[str, Any]:
        volume, snap = split_snapshot_ref(ref)
        directory = os.path.abspath(directory)
        with self.ops_lock:
            self._check_running()
            self.d.pool.volume(volume).get_snapshot(snap)
            if not os.path.isdir(directory):
                raise NotFound(f"{directory}: no such directory")
            self._check_mount_target(directory)
            if loopdev.mount_at(directory) is not None:
                raise Busy(f"{directory}: something is already mounted there")
            path = os.path.join(self.d.mountpoint, volume, "snapshots", snap + ".img")
            device = loopdev.attach(path, read_only=True, direct_io=self.d.loop_direct_io)
            dev = Device(device=device, volume=volume, path=path, read_only=True, snapshot=snap,
                         mount=os.path.realpath(directory))
            with self.reg_lock:
                self.devices.append(dev)
            self._save()
            try:
                dev.fstype = loopdev.mount_ro(device, directory)
            except BaseException:
                loopdev.detach(device)
                with self.reg_lock:
                    self.devices.remove(dev)
                self._save()
                self._wait_released(dev)
                raise
            self._save()
            log.info("mounted %s (%s) on %s via %s", ref, dev.fstype, directory, device)
            return vars(dev).copy()

    def _check_mount_target(self, directory: str) -> None:
        """Not over the pool (it would hide the socket and the catalog), nor inside
        the daemon's own FUSE tree (it would hide the images loop devices need)."""
        real = os.path.realpath(directory)
        for what, path, hides in (("the pool", self.d.pool_path, True),
                                  ("the pool's FUSE tree", self.d.mountpoint, False)):
            root = os.path.realpath(path)
            inner, outer = (root, real) if hides else (real, root)
            if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
                raise InvalidArgument(f"cannot mount on {directory}: it would "
                                      f"{'hide' if hides else 'sit inside'} {what} ({root})")

    def umount(self, directory: str) -> dict[str, Any]:
        target = os.path.realpath(directory)
        with self.ops_lock:
            with self.reg_lock:
                found = [d for d in self.devices if d.mount == target]
            if not found:
                raise NotFound(f"{directory}: not a snapshot mounted by blocksnap for this pool")
            dev = found[0]
            if loopdev.mount_at(target) is not None:
                try:
                    loopdev.umount(target)
                except loopdev.CommandFailed as e:
                    raise Busy(f"cannot unmount {target}: {e}") from None
            dev.mount = None
            self._detach_one(dev)
            return {"unmounted": target, "device": dev.device, "snapshot": f"{dev.volume}@{dev.snapshot}"}

    # -- shutdown --------------------------------------------------------------------
    def stop(self, force: bool = False) -> dict[str, Any]:
        with self.ops_lock:
            with self.reg_lock:
                devices = list(self.devices)
            if self.receiving and not force:
                raise Busy(f"a receive into {', '.join(sorted(self.receiving))} is running; wait for it "
                           "or use --force (it is then left as an interrupted receive, see docs/streams.md)")
            if devices and not force:
                desc = ", ".join(f"{d.device} ({d.volume}@{d.snapshot} on {d.mount})" if d.mount
                                 else f"{d.device} ({d.volume})" for d in devices)
                raise Busy(f"{len(devices)} device(s) in use: {desc}; detach them or use --force")
            self.d.request_stop()
            return {"stopping": os.getpid()}

    def release_all(self) -> list[str]:
        """Shutdown: unmount snapshots, unmount what sits on attached devices, detach."""
        problems = []
        with self.ops_lock:
            with self.reg_lock:
                devices = list(self.devices)
            for dev in devices:
                where = ([dev.mount] if dev.mount else []) + [m for m in loopdev.mounted_at(dev.device)
                                                            if m != dev.mount]
                for m in where:
                    try:
                        loopdev.umount(m)
                    except loopdev.CommandFailed:
                        log.warning("%s is busy: unmounting it lazily", m)
                        try:
                            loopdev.umount(m, lazy=True)
                        except loopdev.CommandFailed as e:
                            problems.append(f"{m}: {e}")
                dev.mount = None
                try:
                    self._detach_one(dev)
                except Exception as e:  # noqa: BLE001 - keep going: shut down as much as we can
                    problems.append(f"{dev.device}: {e}")
        return problems
