"""The image server: a process of its own that serves one backup's image over FUSE.

`python -m blocksnap.recovery.server` reads one JSON request on standard input
(repository, endpoint, password, backup, mountpoint, cache, overlay), opens the
repository, takes a shared lock in it (so a prune cannot delete the packs it
reads), mounts `/<id>.img` at the mountpoint and says so on the status pipe it
was given, then serves until it is unmounted (or gets SIGTERM, after which libfuse
unmounts). An error before that goes back on the same pipe as JSON, so the
command that started it prints it as its one `error:` line.

It runs detached (its own session) and is the only process holding the password
and the key; the pool's daemon is never involved. Damaged chunks it meets are
appended, one line each, to the `damaged` file of its state directory.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading

from ..errors import BlocksnapError


def _report(fd: int, msg: dict) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def serve(req: dict) -> int:
    from ..backup.repo import Repository
    from .fuse_image import ImageFS, run_image_fuse
    from .overlay import Overlay
    from .source import BlockSource, ChunkCache

    status_fd = int(req.get("status_fd", -1))
    password = base64.b64decode(req["password"])
    damaged_path = os.path.join(req["state_dir"], "damaged")
    damage_lock = threading.Lock()

    def on_damage(msg: str) -> None:
        with damage_lock, open(damaged_path, "a") as f:
            f.write(msg.replace("\n", " ") + "\n")

    repo, _ = Repository.open(req["repo"], lambda new: password, req.get("endpoint"))
    with repo.lock(req.get("op", "mount")):
        m = repo.manifest(req["backup"])
        repo.load_index()
        cache = ChunkCache(int(req["cache_size"]), int(m.info["chunk_size"]), req.get("cache_dir"))
        source = BlockSource(repo, m, cache, on_damage=on_damage)
        overlay = Overlay(req["overlay_dir"], source.size) if req.get("overlay_dir") else None

        def ready() -> None:
            _report(status_fd, {"ready": True, "backup": m.id, "image": os.path.join(req["mountpoint"],
                                                                                     f"{m.id}.img"),
                                "size": source.size, "chunk_size": source.chunk_size, "pid": os.getpid(),
                                "volume": m.volume, "snapshot": m.info["source"].get("snapshot")})
            os.close(status_fd)
            req["status_fd"] = -1      # reported: later errors go to the log only

        fs = ImageFS(source, overlay, on_init=ready)
        try:
            run_image_fuse(fs, req["mountpoint"])
        finally:
            logging.getLogger("blocksnap.recovery").info(
                "served %s: %d requests, %d bytes fetched, cache %d hits %d misses", m.id, source.requests,
                source.fetched_bytes, cache.hits, cache.misses)
            source.close()
            if overlay is not None:
                overlay.close()
    if not fs.initialized.is_set():
        raise BlocksnapError(f"cannot mount FUSE at {req['mountpoint']}")
    return 0


def preload() -> None:
    """Import what `serve` needs (before a fork, so the server does not)."""
    from ..backup import repo  # noqa: F401
    from . import fuse_image, overlay, source  # noqa: F401


def main() -> int:
    """As a program: the request on standard input."""
    req = json.loads(sys.stdin.read())
    sys.stdin.close()
    return run(req)


def run(req: dict) -> int:
    """Serve `req` until unmounted; an error before that goes to its status pipe."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s blocksnap image server: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        return serve(req)
    except BlocksnapError as e:
        _report(int(req.get("status_fd", -1)), {"error": str(e), "class": type(e).__name__, "exit_code": e.exit_code})
        logging.error("%s", e)
    except Exception as e:   # reported to the command that started us, and logged
        _report(int(req.get("status_fd", -1)),
                {"error": f"image server failed: {type(e).__name__}: {e}", "exit_code": 1})
        logging.exception("image server failed")
    return 1


if __name__ == "__main__":
    sys.exit(main())
