"""Restore drills: a backup brought up on a throwaway overlay, checked, timed, recorded.

`run_drill` serves the backup's image from a FUSE thread of this process, with
every write going to an `Overlay` (the backup never changes), loop-attaches it
read-write, runs the checks (checks.py) in order and stops at the first that
fails. The RTO is the time from the start of the drill until the last check
passed: what a recovery from this backup, with these checks as its acceptance
test, would have taken. A chunk found damaged on the way fails the drill with
the chunk, its pack and its offset named, even when the check itself passed.

The result is sealed into the repository as `drills/<backup id>-<UTC time>-<random>`, so
`drill_results` on any host with the password sees it. Everything the drill made
(the mount, the loop device, the FUSE mount, servers it started, the work
directory) is written down in its state directory before it is made, and undone
at the end, on success, failure or SIGTERM; after a kill -9, by the next drill
(`mount.sweep`) or `blocksnap umount DIR`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..backup.repo import Repository
from ..errors import BlocksnapError, NotFound
from ..service import loopdev
from ..settings import Settings
from . import mount as reg
from .checks import CHECKS, Bringup, CheckFailed, parse_check
from .fuse_image import ImageFS, serve_in_thread
from .overlay import Overlay
from .source import DEFAULT_CACHE, BlockSource, ChunkCache

Progress = Callable[[int, int], None] | None
PREFIX = "drills"


class DrillFailed(BlocksnapError):
    """A drill ran and a check failed (the result is recorded)."""


class _Terminated(BaseException):
    """SIGTERM during a drill: clean up, record, then stop."""


def newest_backup(repo: Repository, volume: str) -> str:
    ms = [m for m in repo.manifests() if m.volume == volume]
    if not ms:
        raise NotFound(f"no backup of volume {volume!r} in {repo.url}")
    return ms[-1].id


@contextlib.contextmanager
def _sigterm_raises():
    """In the main thread, SIGTERM raises _Terminated so the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum, _frame):
        raise _Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _endpoint(repo: Repository) -> str | None:
    s3 = getattr(repo.backend, "s3", None)
    return getattr(getattr(s3, "meta", None), "endpoint_url", None) if s3 is not None else None


def run_drill(repo: Repository, backup_id: str, checks: list[str | dict], progress: Progress = None, *,
              cache_size: int = DEFAULT_CACHE, work_root: str = reg.CACHE_DIR, record: bool = True,
              settings: Settings | None = None) -> dict[str, Any]:
    """Drill one backup (ID or unique prefix) with `checks` ('fsck', 'postgres',
    'mariadb', 'command:CMD', or dicts from checks.parse_check). Returns the result:
    ok, rto_seconds (None unless ok), checks (name, ok, seconds, summary, output),
    error, damaged (chunks found damaged), and the backup's identity."""
    t0 = time.monotonic()
    specs = [parse_check(c) if isinstance(c, str) else c for c in checks] or [parse_check("fsck")]
    swept = reg.sweep(settings)
    result: dict[str, Any] = {"backup": backup_id, "ok": False, "rto_seconds": None, "checks": [], "error": None,
                              "damaged": [], "read_errors": [], "time": time.time(), "host": socket.gethostname(),
                              "repo": repo.url, "cleaned_up_leftovers": swept}
    with _sigterm_raises(), repo.lock("drill"):
        m = repo.manifest(backup_id)      # an unknown ID is the caller's error, not a failed drill
        result.update(backup=m.id, volume=m.volume, snapshot=m.info["source"].get("snapshot"),
                      group=list(m.group), size=m.info["size"])
        try:
            _drill(repo, m, specs, result, t0, progress, cache_size, work_root, settings)
        except _Terminated:
            result["error"] = "interrupted (SIGTERM)"
        except BlocksnapError as e:
            result["error"] = result["error"] or str(e)
        if result["damaged"]:
            result["ok"], result["rto_seconds"] = False, None
            result["error"] = f"the backup is damaged: {result['damaged'][0]}" + (
                f" (and {len(result['damaged']) - 1} more)" if len(result["damaged"]) > 1 else "")
        result["seconds"] = round(time.monotonic() - t0, 3)
        if record:
            save_result(repo, result)
    if result["error"] == "interrupted (SIGTERM)":
        raise DrillFailed(f"drill of {result['backup']} interrupted (SIGTERM); everything it made is removed")
    return result


def _drill(repo: Repository, m, specs: list[dict], result: dict, t0: float, progress: Progress, cache_size: int,
           work_root: str, settings: Settings | None) -> None:
    steps = len(specs) + 1
    work = Path(tempfile.mkdtemp(prefix="blocksnap-drill-", dir=work_root))
    os.chmod(work, 0o755)          # database servers run as their own user, and must reach fs/
    result["work_dir"] = str(work)
    (work / "fs").mkdir()
    (work / "image").mkdir()
    sd = reg.state_dir(str(work / "fs"), settings)
    sd.mkdir(mode=0o700)
    state: dict[str, Any] = {"kind": "drill", "dir": str(work / "fs"), "fs_dir": str(work / "fs"),
                             "image_mnt": str(work / "image"), "image": str(work / "image" / f"{m.id}.img"),
                             "repo": repo.url, "endpoint": _endpoint(repo), "backup": m.id, "owner_pid": os.getpid(),
                             "owner_start": reg.start_time(os.getpid()), "remove": [str(work)], "services": [],
                             "created": time.time()}
    reg.save_state(sd, state)
    lock = threading.Lock()

    def damaged(msg: str) -> None:
        with lock:
            if msg not in result["damaged"]:
                result["damaged"].append(msg)

    def keep(svc: dict) -> None:
        state["services"].append(svc)
        reg.save_state(sd, state)

    source = fs_thread = overlay = None
    try:
        repo.load_index()
        source = BlockSource(repo, m, ChunkCache(cache_size, int(m.info["chunk_size"]), work_root),
                             on_damage=damaged)
        overlay = Overlay(str(work), source.size)
        fs_thread = serve_in_thread(ImageFS(source, overlay, on_error=result["read_errors"].append),
                                    str(work / "image"))
        state["device"] = loopdev.attach(state["image"], read_only=False, direct_io=False)
        reg.save_state(sd, state)
        b = Bringup(work, state["device"], loopdev.fstype(state["device"]), m, repo.url, state["image"], keep)
        result["fstype"] = b.fstype
        if progress:
            progress(1, steps)
        for i, spec in enumerate(specs):
            c0 = time.monotonic()
            try:
                ok, output, summary = CHECKS[spec["kind"]](b, spec)
            except CheckFailed as e:
                ok, output, summary = False, str(e), str(e)
            result["checks"].append({"name": spec["name"], "kind": spec["kind"], "ok": ok, "summary": summary,
                                     "seconds": round(time.monotonic() - c0, 3), "output": output,
                                     **({"command": spec["command"]} if spec["kind"] == "command" else {})})
            if progress:
                progress(i + 2, steps)
            if not ok:
                result["error"] = f"check {spec['name']} failed: {summary}" + (
                    f" (reads of the backup failed: {result['read_errors'][0]})" if result["read_errors"] else "")
                return
        result["ok"] = True
        result["rto_seconds"] = round(time.monotonic() - t0, 3)
    finally:
        result["fetched_bytes"] = source.fetched_bytes if source is not None else 0
        result["overlay_bytes"] = overlay.written if overlay is not None else 0
        with contextlib.suppress(BlocksnapError, OSError):
            reg.teardown(sd, state, lazy=True)
        if fs_thread is not None:
            fs_thread.join(10)
        if source is not None:
            source.close()
        if overlay is not None:
            overlay.close()


# -- results in the repository ----------------------------------------------------------
def save_result(repo: Repository, result: dict) -> str:
    when = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(result["time"]))
    key = f"{PREFIX}/{result['backup']}-{when}-{os.urandom(3).hex()}"   # two drills in one second: two records
    body = json.dumps(result, sort_keys=True, default=str).encode()
    repo.backend.put(key, repo.keys.seal(body, key.encode()))
    result["key"] = key
    return key


def drill_results(repo: Repository, volume: str | None = None) -> list[dict]:
    """Every drill recorded in the repository (of `volume`'s backups, if given), oldest first."""
    out = []
    for key in sorted(repo.backend.list(PREFIX)):
        try:
            d = json.loads(repo.keys.open(repo.backend.get(key), key.encode(), f"{repo.url}: {key}"))
        except (BlocksnapError, ValueError):
            continue            # a damaged record, or one removed meanwhile: the others still count
        if volume is None or d.get("volume") == volume:
            out.append(dict(d, key=key))
    return sorted(out, key=lambda d: d.get("time", 0))
