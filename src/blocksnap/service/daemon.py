"""The pool's daemon: owns the open pool, serves it over FUSE and a control socket.

Threads: libfuse's worker threads serve the FUSE tree, the control socket has an
accept thread and one per client, and the main thread only waits for a signal.
SIGTERM/SIGINT/SIGHUP are blocked in every thread and taken with sigwait() by the
main thread, so shutdown always runs as ordinary Python in a known order:
unmount snapshots and detach loop devices (while FUSE still serves them, so their
last writes land), flush the pool, unmount FUSE, close the pool.

The process marks itself PR_SET_IO_FLUSHER: it sits under loop devices, so memory
reclaim that waits on I/O to those devices must not wait on us in turn.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from ..engine import Pool
from . import daemon_state, loopdev
from .control import socket_path
from .daemon_ops import DaemonOps
from .daemon_server import ControlServer
from .daemon_state import State

log = logging.getLogger("blocksnap.daemon")

PR_SET_IO_FLUSHER = 57
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
READY_TIMEOUT = 30.0


def set_io_flusher() -> bool:
    """prctl(PR_SET_IO_FLUSHER): no deadlock under memory pressure (needs CAP_SYS_RESOURCE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_IO_FLUSHER failed (needs CAP_SYS_RESOURCE): %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def setup_logging(pool_path: str, debug: bool = False) -> None:
    """Everything to <pool>/daemon.log; to stderr as well when run in a terminal
    (a daemon that daemon_spawn started has its stderr on daemon.log already)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    fh = logging.FileHandler(daemon_state.log_path(pool_path))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if sys.stderr.isatty():
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    logging.getLogger("fuse").setLevel(logging.DEBUG if debug else logging.WARNING)


class Daemon:
    """`loop_direct_io`, `write_behind` and `fast_io` are BLOCKSNAP_LOOP_DIRECT_IO,
    BLOCKSNAP_WRITE_BEHIND and BLOCKSNAP_FAST_IO of the command that starts it (`serve`
    passes its settings)."""

    def __init__(self, pool_path: str, mountpoint: str, *, read_only: bool = False,
                 allow_other: bool = False, loop_direct_io: bool = True, write_behind: bool = True,
                 fast_io: bool = True, debug: bool = False):
        self.pool_path = os.path.abspath(pool_path)
        self.mountpoint = os.path.abspath(mountpoint)
        self.read_only = read_only
        self.allow_other = allow_other
        self.loop_direct_io = loop_direct_io
        self.write_behind = write_behind
        self.fast_io = fast_io
        self.debug = debug
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.fuse_done = threading.Event()
        self.fuse_error: BaseException | None = None
        self.pool: Any = None
        self.fs: Any = None
        self.server: ControlServer | None = None
        self.state = State(pid=os.getpid(), mountpoint=self.mountpoint, read_only=read_only)
        self.ops = DaemonOps(self)

    # -- start -------------------------------------------------------------------
    def run(self) -> None:
        """Serve until a signal or `stop`; raises a BlocksnapError if it cannot start."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # inherited by every thread
        set_io_flusher()
        self.pool = Pool.open(self.pool_path)
        try:
            self._start()
        except BaseException:
            log.exception("daemon failed to start")
            self._shutdown()
            raise
        log.info("ready: pool %s served at %s (pid %d)", self.pool_path, self.mountpoint, os.getpid())
        sig = signal.sigwait(SIGNALS)
        log.info("%s: shutting down", signal.Signals(sig).name)
        self._shutdown()

    def _start(self) -> None:
        done = daemon_state.cleanup_stale(self.pool_path, self.mountpoint)
        if done:
            log.warning("cleaned up after a daemon that died: %s", ", ".join(done))
        daemon_state.check_mountpoint(self.mountpoint)
        from ..fuse import BlocksnapFS  # late: loads libfuse only in the daemon
        self.fs = BlocksnapFS(self.pool, read_only=self.read_only, allow_other=self.allow_other,
                              write_behind=self.write_behind, fast_io=self.fast_io)
        from ..recovery.hydrate_state import hydrations
        self.fs.hydration = hydrations(self.pool)   # volumes restored instantly: reads fetch, writes keep
        threading.Thread(target=self._fuse_main, name="fuse", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.fs.initialized.wait(0.05):
            if self.fuse_done.is_set() or time.monotonic() > deadline:
                from ..errors import BlocksnapError
                raise BlocksnapError(f"cannot mount FUSE at {self.mountpoint}: "
                                     f"{self.fuse_error or 'no answer from the kernel'}")
        self.state.save(self.pool_path)
        self.server = ControlServer(socket_path(self.pool_path), self.ops)
        self.server.start()
        self.ready.set()

    def _fuse_main(self) -> None:
        from ..fuse import run_fuse
        try:
            run_fuse(self.fs, self.mountpoint, fsname=daemon_state.fsname(self.pool_path),
                     read_only=self.read_only, allow_other=self.allow_other, debug=self.debug)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.fuse_error = e
            log.error("FUSE session failed: %s", e)
        finally:
            self.fuse_done.set()
            if self.ready.is_set() and not self.stopping.is_set():
                log.error("FUSE mount %s went away: shutting down", self.mountpoint)
                self.request_stop()

    def request_stop(self) -> None:
        """Wake the main thread (blocked in sigwait) to shut down."""
        os.kill(os.getpid(), signal.SIGTERM)

    # -- stop ----------------------------------------------------------------------
    def _shutdown(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.close()
        problems = self.ops.release_all() if self.fs is not None else []
        for p in problems:
            log.error("shutdown: %s", p)
        if self.fs is not None:
            self.fs.close_queues()
        if self.pool is not None and not self.pool.closed:
            try:
                self.pool.commit()
            except Exception:
                log.exception("flush at shutdown failed")
        if self.fs is not None and not self.fuse_done.is_set():
            self._unmount_fuse()
        if self.pool is not None and not self.pool.closed:
            self.pool.close()
        if self.state.devices:
            self.state.save(self.pool_path)  # leave a record for the next daemon to clean
        else:
            daemon_state.remove_state(self.pool_path)
        log.info("stopped")

    def _unmount_fuse(self) -> None:
        """Lazy unmount ends the session once nothing holds a file; abort if something does."""
        entry = loopdev.mount_at(self.mountpoint)
        try:
            loopdev.umount_fuse(self.mountpoint)
        except loopdev.CommandFailed as e:
            log.error("cannot unmount %s: %s", self.mountpoint, e)
        if self.fuse_done.wait(10):
            return
        if entry is not None:
            minor = entry.devno.split(":")[1]
            log.warning("files still open under %s: aborting the FUSE connection", self.mountpoint)
            try:
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.error("cannot abort the FUSE connection: %s", e)
        self.fuse_done.wait(10)
