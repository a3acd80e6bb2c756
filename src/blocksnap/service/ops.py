"""Every pool operation the CLI (or the daemon, for its clients) can run.

Each takes an open Pool and JSON-friendly arguments and returns JSON-friendly
data, so the same function serves a local call and a request over the socket.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from ..engine import Pool
from ..engine import scrub as _scrub
from ..errors import BlocksnapError, Busy
from ..recovery import hydrate_state as _hydration
from ..units import split_snapshot_pair, split_snapshot_ref, validate_name
from .fdio import stream_file

Progress = Callable[[int, int], None] | None


def _snap(pool: Pool, ref: str):
    vol, name = split_snapshot_ref(ref)
    return pool.volume(vol).get_snapshot(name)


def pool_status(pool: Pool) -> dict:
    st = pool.status()
    st["volume_list"] = [volume_show(pool, v.name) for v in pool.volumes()]   # (with a hydration entry)
    return st


def volume_create(pool: Pool, name: str, size: int | None, mode: str, origin: str | None,
                  block_size: int) -> dict:
    return pool.create_volume(name, size=size, mode=mode, block_size=block_size, origin=origin).info()


def volume_import(pool: Pool, name: str, source: str, block_size: int, progress: Progress = None) -> dict:
    return pool.import_volume(name, source, block_size, progress).info()


def volume_list(pool: Pool) -> list[dict]:
    return [v.info() for v in pool.volumes()]


def volume_show(pool: Pool, name: str) -> dict:
    info = pool.volume(name).info()
    hyd = _hydration.progress(pool, name)
    if hyd is not None:
        info["hydration"] = hyd
    return info


def volume_delete(pool: Pool, name: str, recursive: bool = False) -> dict:
    pool.volume(name).delete(recursive=recursive)
    _hydration.remove_files(pool.path, name)     # a volume deleted while it hydrated: its pending set
    return {"deleted": name}


def volume_resize(pool: Pool, name: str, size: int, shrink: bool = False) -> dict:
    """The command's resize: to whole blocks (rounded up, and the answer says so)."""
    _not_hydrating(pool, name, "resize")
    vol = pool.volume(name)
    bs = vol.block_size
    whole = -(-size // bs) * bs if size > 0 and size % 512 == 0 else size   # (else the engine says why)
    vol.resize(whole, shrink=shrink)
    info = vol.info()
    if whole != size:
        info["rounded_up_from"] = size
    return info


def snapshot_create(pool: Pool, ref: str, labels: dict[str, str] | None = None,
                    consistency: str = "crash", hooks: dict | None = None) -> dict:
    vol, name = split_snapshot_ref(ref)
    _not_hydrating(pool, vol, "snapshot")
    return pool.volume(vol).snapshot(name, labels=labels, consistency=consistency, hooks=hooks).info()


def snapshot_set_metadata(pool: Pool, ref: str, consistency: str | None = None,
                          hooks: dict | None = None) -> dict:
    snap = _snap(pool, ref)
    snap.set_metadata(consistency=consistency, hooks=hooks)
    return snap.info()


def snapshot_list(pool: Pool, volume: str | None = None) -> list[dict]:
    vols = [pool.volume(volume)] if volume else pool.volumes()
    return [s.info() for v in vols for s in v.snapshots()]


def snapshot_show(pool: Pool, ref: str) -> dict:
    return _snap(pool, ref).info()


def snapshot_delete(pool: Pool, ref: str) -> dict:
    _snap(pool, ref).delete()
    return {"deleted": ref}


def snapshot_rollback(pool: Pool, ref: str) -> dict:
    vol, name = split_snapshot_ref(ref)
    pool.volume(vol).rollback(name)
    return {"rolled_back": ref}


def snapshot_clone(pool: Pool, ref: str, new_volume: str, progress: Progress = None) -> dict:
    return _snap(pool, ref).clone(new_volume, progress=progress).info()


def snapshot_diff(pool: Pool, a: str, b: str | None = None) -> dict:
    va, na, nb = split_snapshot_pair(a, b, "diff")
    vol = pool.volume(va)
    extents = vol.diff(na, nb)
    return {"from": a, "to": b or va, "block_size": vol.block_size, "extents": extents,
            "changed_bytes": sum(e["length"] for e in extents)}


def export(pool: Pool, ref: str, output: str, force: bool = False, progress: Progress = None) -> dict:
    res = _snap(pool, ref).export(output, progress=progress, force=force)
    res.update({"snapshot": ref, "output": output})
    return res


def send(pool: Pool, ref: str, fd: int, base: str | None = None, progress: Progress = None,
         watch_fd: int | None = None, start: int = 0) -> dict:
    """The stream goes to `fd`: the caller's own, or one a client passed to the daemon
    (then `watch_fd` is the client's connection, and the send ends if it closes)."""
    from ..streams import send as _send
    try:
        with stream_file(fd, "wb", watch_fd) as out:
            return _send(pool, ref, out, base, progress, start)
    except BrokenPipeError:
        raise BlocksnapError("the stream's reader closed it before the end (broken pipe)") from None


def receive(pool: Pool, name: str, fd: int, progress: Progress = None, watch_fd: int | None = None,
            force: bool = False) -> dict:
    from ..streams import receive as _receive
    with stream_file(fd, "rb", watch_fd) as src:
        return _receive(pool, name, src, progress, force)


def check(pool: Pool, repair: bool = False) -> dict:
    return pool.check(repair=repair)


def scrub(pool: Pool, target: str, progress: Progress = None) -> dict:
    if "@" in target:
        vol, name = split_snapshot_ref(target)
    else:
        vol, name = validate_name(target, "volume name"), None
    res = _scrub(pool, vol, name, progress)
    res["target"] = target
    return res


def job_begin(pool: Pool, volume: str, kind: str, target: str, started: float, runner: str,
              info: dict | None = None) -> int:
    return pool.jobs.begin(volume, kind, target, started, runner, info)


def job_end(pool: Pool, job_id: int, result: str, ended: float, bytes_read: int = 0, bytes_stored: int = 0,
            error: str | None = None, info: dict | None = None) -> dict:
    pool.jobs.end(job_id, result, ended, bytes_read, bytes_stored, error, info)
    return {"id": job_id, "result": result}


def job_list(pool: Pool, volume: str | None = None, limit: int | None = None, since: float | None = None) -> list:
    return [r.to_json() for r in pool.jobs.rows(volume, limit, since)]


def job_summary(pool: Pool) -> list[dict]:
    return pool.jobs.summary()


def jobs_interrupt(pool: Pool, ended: float, note: str) -> list[dict]:
    return [r.to_json() for r in pool.jobs.interrupt_running(ended, note)]


# -- instant recovery (recovery/hydrate_state.py: what is pending, filled without overwriting) --
def _not_hydrating(pool: Pool, name: str, verb: str) -> None:
    """A snapshot of a volume still hydrating would hold holes where the backup's data
    is yet to come: refused until it is hydrated (as is a resize)."""
    if pool.has_volume(name) and pool.volume(name).extra.get("hydration", {}).get("state") == "hydrating":
        raise Busy(f"cannot {verb} volume {name} while it hydrates from a backup (see `volume show {name}`)")


def volume_create_from_backup(pool: Pool, name: str, size: int, block_size: int, hydration: dict,
                              starts: list[int], counts: list[int]) -> dict:
    """A ROW volume that hydrates from a backup: the runs file first, then the info
    that says so (a crash between leaves an empty volume, never a wrong one)."""
    vol = pool.create_volume(name, size=size, mode="row", block_size=block_size)
    try:
        _hydration.save_runs(pool.path, name, starts, counts)
        vol.update_extra({"hydration": dict(hydration, state="hydrating", created=time.time())})
    except BaseException:
        vol.delete()
        _hydration.remove_files(pool.path, name)
        raise
    return volume_show(pool, name)


def volume_hydration(pool: Pool, name: str, limit: int = 256, start: int = 0) -> dict:
    """The hydrator's question: up to `limit` pending blocks ([first, count] runs)
    from block `start` on (the hydrator's cursor: no rescan of what it has done)."""
    vol = pool.volume(name)
    h = _hydration.hydrations(pool).get(name)
    if h is None:
        return {"state": vol.extra.get("hydration", {}).get("state", "none"), "pending": []}
    runs, _ = h.pending_runs(limit, start)
    return {"state": "hydrating", "pending": runs}


def volume_hydrate(pool: Pool, name: str, blocks: list[int], fd: int, watch_fd: int | None = None) -> dict:  # noqa: ARG001
    """Backup blocks from the hydrator (whole blocks, in the file `fd` it passed: a
    memfd, not JSON), written where still pending (never over a write)."""
    h = _hydration.hydrations(pool).require(name)
    want = len(blocks) * h.vol.block_size
    data = bytearray(want)
    got = os.preadv(fd, [data], 0)
    if got != want:
        raise BlocksnapError(f"volume_hydrate: {got} bytes passed for {len(blocks)} blocks")
    return {"written": h.fill(blocks, data)}


def volume_hydrate_done(pool: Pool, name: str) -> dict:
    return _hydration.hydrations(pool).done(name)


# The operations a client may ask for, by name: this table, not whatever the module
# defines, is what the daemon offers over its socket (daemon_ops adds its own).
OPS: dict[str, Callable[..., Any]] = {
    "pool_status": pool_status,
    "volume_create": volume_create, "volume_import": volume_import, "volume_list": volume_list,
    "volume_show": volume_show, "volume_delete": volume_delete, "volume_resize": volume_resize,
    "snapshot_create": snapshot_create, "snapshot_set_metadata": snapshot_set_metadata,
    "snapshot_list": snapshot_list, "snapshot_show": snapshot_show, "snapshot_delete": snapshot_delete,
    "snapshot_rollback": snapshot_rollback, "snapshot_clone": snapshot_clone, "snapshot_diff": snapshot_diff,
    "export": export, "send": send, "receive": receive, "check": check, "scrub": scrub,
    "job_begin": job_begin, "job_end": job_end, "job_list": job_list, "job_summary": job_summary,
    "jobs_interrupt": jobs_interrupt,
    "volume_create_from_backup": volume_create_from_backup, "volume_hydration": volume_hydration,
    "volume_hydrate": volume_hydrate, "volume_hydrate_done": volume_hydrate_done,
}
PROGRESS_OPS = {"volume_import", "snapshot_clone", "export", "scrub", "send", "receive"}
