"""Instant recovery, the repository's side: the hydrator, a process that holds the
password and copies a backup into a live volume.

`start` (from `volume create --from-backup` and `volume hydrate`) forks it,
detached (its own session, its log in `<pool>/hydrate/<name>.log`), like the image
server of `blocksnap mount`: it opens the repository, takes a shared `hydrate`
lock there (a prune cannot delete the packs it reads), reads the manifest and the
index, listens on `<pool>/hydrate/<name>.sock` and says it is ready. Then:

* **Urgent reads.** The daemon's FUSE read path asks, over that socket, for
  pending blocks a reader needs now (`{"blocks": [...]}` -> `{"ok": n}` and the
  bytes, or `{"error": ...}`); they come through the bounded chunk cache of
  recovery/source.py.
* **Background copy.** It asks the pool (its daemon, or the pool itself when none
  runs) which blocks are pending, fetches them pack by pack (`BlockSource.chunks`,
  each range once) and hands them to `volume_hydrate`, which writes only those
  still pending. When none is left, `volume_hydrate_done` flushes the volume and
  records it hydrated, and the hydrator ends.
* **Outages.** A repository that cannot be read pauses the copy (one log line),
  retried every few seconds; it resumes (one log line) when the repository answers.

The daemon never sees the password; the hydrator never opens the pool while a
daemon serves it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from ..errors import BlocksnapError, Busy, CorruptionError, NotFound
from .hydrate_state import paths
from .mount import _Child, _read_status, alive, start_time, stop_process
from .source import BlockSource, ChunkCache

log = logging.getLogger("blocksnap.hydrator")
BATCH = 32                  # blocks handed to the pool in one call (passed in a memfd)
CACHE = 64 << 20            # the urgent reads' chunk cache
RETRY = 2.0                 # seconds between tries while the repository or the daemon is away


# -- the running hydrator -------------------------------------------------------------
class Hydrator:
    def __init__(self, req: dict, source: BlockSource):
        self.req, self.source = req, source
        self.pool, self.name = req["pool"], req["name"]
        self.bs = source.chunk_size
        self.rate = float(req.get("rate") or 0)
        self.stop = threading.Event()
        self.copied = 0
        self.started = time.monotonic()
        self._down: str | None = None

    # -- urgent requests ------------------------------------------------------------
    def serve_socket(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                req = json.loads(conn.makefile("rb").readline() or b"{}")
                if "ping" in req:
                    conn.sendall(b'{"ok": 0}\n')
                    return
                blocks = [int(b) for b in req.get("blocks", [])]
                buf = bytearray(len(blocks) * self.bs)
                for i, b in enumerate(blocks):
                    self.source.read_into(b * self.bs, memoryview(buf)[i * self.bs:(i + 1) * self.bs])
                conn.sendall(json.dumps({"ok": len(blocks)}).encode() + b"\n" + bytes(buf))
            except (BlocksnapError, OSError, ValueError) as e:
                self._outage(e)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": str(e) or type(e).__name__}).encode() + b"\n")

    def _outage(self, e: BaseException) -> None:
        if self._down is None:
            log.error("cannot read backup %s from %s: %s (hydration paused, retried every %.0f s)",
                      self.req["backup"], self.req["repo"], e, RETRY)
        self._down = str(e)

    def _back(self) -> None:
        if self._down is not None:
            log.info("the repository answers again: hydration resumes")
            self._down = None

    # -- the background copy ----------------------------------------------------------
    def call(self, op: str, **kw: Any) -> Any:
        """An op on the pool: its daemon's, or the pool opened here when none serves
        it. While a daemon that died is not restarted yet (its state file is left),
        wait for it rather than take the pool from under its restart."""
        from ..service.control import NOT_RUNNING, try_remote
        from ..service.runner import call
        while not self.stop.is_set():
            res = try_remote(self.pool, op, kw)
            if res is not NOT_RUNNING:
                return res
            if not os.path.exists(os.path.join(self.pool, "daemon.json")):
                try:
                    return call(self.pool, op, **kw)
                except Busy:
                    pass
            self.stop.wait(RETRY)
        raise _Stopped()

    def run(self) -> int:
        cursor = 0               # blocks before it were handed over (or written meanwhile)
        while not self.stop.is_set():
            state = self.call("volume_hydration", name=self.name, limit=BATCH * 16, start=cursor)
            if state["state"] != "hydrating":
                log.info("volume %s is %s: nothing to do", self.name, state["state"])
                return 0
            if not state["pending"] and cursor:
                cursor = 0       # once more from the start: what a failed call or a crash left
                continue
            if not state["pending"]:
                self.call("volume_hydrate_done", name=self.name)
                secs = time.monotonic() - self.started
                log.info("volume %s hydrated: %d bytes copied in %.1f s (%.1f MB/s)", self.name, self.copied,
                         secs, self.copied / max(secs, 1e-9) / 1e6)
                return 0
            try:
                self._copy(state["pending"])
                cursor = state["pending"][-1][0] + state["pending"][-1][1]
            except NotFound:
                raise            # the volume was deleted: the hydration ends
            except (BlocksnapError, OSError) as e:
                if isinstance(e, CorruptionError) and "damaged" in str(e):
                    log.error("%s", e)
                self._outage(e)
                self.stop.wait(RETRY)
        return 0

    def _copy(self, runs: list[list[int]]) -> None:
        blocks = np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in runs])
        src = self.source
        r = np.searchsorted(src.starts, blocks, side="right") - 1
        rows = src.first_row[r] + blocks - src.starts[r]
        got: list[tuple[int, bytes]] = []
        for chunk, data in src.chunks(rows):
            got.append((chunk, data))
            if len(got) >= BATCH:
                self._hand(got)
                got = []
        if got:
            self._hand(got)

    def _hand(self, got: list[tuple[int, bytes]]) -> None:
        self._back()             # chunks came: the repository answers
        bs = self.bs
        t0 = time.monotonic()
        fd = os.memfd_create("hydrate", os.MFD_CLOEXEC)     # passed to the daemon, not copied through JSON
        try:
            os.writev(fd, [d.ljust(bs, b"\0") for _, d in got])
            self.call("volume_hydrate", name=self.name, blocks=[c for c, _ in got], fd=fd)
        finally:
            os.close(fd)
        n = len(got) * bs
        self.copied += n
        if self.rate > 0:        # a ceiling on the copy, batch by batch (urgent reads are never held back)
            self.stop.wait(max(0.0, n / self.rate - (time.monotonic() - t0)))


class _Stopped(Exception):
    pass


def serve(req: dict) -> int:
    from ..backup.repo import Repository
    status_fd = int(req.get("status_fd", -1))
    password = base64.b64decode(req["password"])
    p = paths(req["pool"], req["name"])
    repo, _ = Repository.open(req["repo"], lambda new: password, req.get("endpoint"))
    with repo.lock("hydrate"):
        m = repo.manifest(req["backup"])
        repo.load_index()
        source = BlockSource(repo, m, ChunkCache(int(req.get("cache_size") or CACHE), int(m.info["chunk_size"]),
                                                 req.get("cache_dir", "/var/tmp")))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p["sock"])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(p["sock"])
        os.chmod(p["sock"], 0o600)
        sock.listen(16)
        h = Hydrator(req, source)
        signal.signal(signal.SIGTERM, lambda *_: h.stop.set())
        threading.Thread(target=h.serve_socket, args=(sock,), name="urgent", daemon=True).start()
        with open(p["pid"] + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "start": start_time(os.getpid())}, f)
        os.replace(p["pid"] + ".tmp", p["pid"])
        _report(status_fd, {"ready": True, "pid": os.getpid(), "backup": m.id})
        os.close(status_fd)
        req["status_fd"] = -1
        log.info("hydrating volume %s from backup %s in %s", req["name"], m.id, req["repo"])
        try:
            return h.run()
        except _Stopped:
            log.info("stopped (SIGTERM): hydration continues when a hydrator is started again")
            return 0
        except NotFound as e:      # the volume was deleted
            log.info("%s: hydration ends", e)
            return 0
        finally:
            h.stop.set()
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p["sock"])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p["pid"])
            source.close()


def _report(fd: int, msg: dict) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps(msg) + "\n").encode())


def run(req: dict) -> int:
    root = logging.getLogger()
    for hd in list(root.handlers):
        root.removeHandler(hd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s blocksnap hydrator[%(process)d]: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        return serve(req)
    except BlocksnapError as e:
        _report(int(req.get("status_fd", -1)), {"error": str(e), "class": type(e).__name__})
        log.error("%s", e)
    except Exception as e:
        _report(int(req.get("status_fd", -1)), {"error": f"the hydrator failed: {type(e).__name__}: {e}"})
        log.exception("the hydrator failed")
    return 1


# -- starting and stopping it ----------------------------------------------------------
def running(pool: str, name: str) -> int | None:
    """The pid of the volume's hydrator, if one runs."""
    try:
        with open(paths(pool, name)["pid"]) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    return st["pid"] if alive(st.get("pid"), st.get("start")) else None


def stop(pool: str, name: str) -> bool:
    """End the volume's hydrator (SIGTERM, then SIGKILL): True if one ran."""
    pid = running(pool, name)
    if pid is None:
        return False
    stop_process(pid, start_time(pid), timeout=0.1)
    return True


def start(pool: str, name: str, *, repo: str, endpoint: str | None, password: bytes, backup: str,
          rate: float = 0, cache_size: int = CACHE) -> int:
    """Fork the hydrator, detached; its pid once it is ready (or its error, raised)."""
    from .mount import _error_class
    if running(pool, name) is not None:
        raise Busy(f"volume {name} already has a hydrator running (pid {running(pool, name)})")
    from ..backup import repo as _repo  # noqa: F401  (loaded before the fork)
    p = paths(pool, name)
    os.makedirs(os.path.dirname(p["log"]), mode=0o700, exist_ok=True)
    r, w = os.pipe()
    req = {"pool": os.path.abspath(pool), "name": name, "repo": repo, "endpoint": endpoint,
           "password": base64.b64encode(password).decode(), "backup": backup, "rate": rate,
           "cache_size": cache_size, "status_fd": w}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            logfd = os.open(p["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.closerange(3, w)
            os.closerange(w + 1, 65536)
            code = run(req)
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
    return pid
