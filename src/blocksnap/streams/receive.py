"""`receive`: a stream becomes a snapshot of a volume in this pool, or nothing.

A full stream makes a new ROW volume; an incremental one goes on top of the
volume's newest snapshot, which must be the stream's base (same origin volume,
name and creation time, recorded when that snapshot was itself received) with
no writes since. Records are checked before they are written; the snapshot is
created only after the end record checked out. Anything that goes wrong before
that undoes the receive: a new volume is deleted, an existing one rolled back to
its base, so the pool is left as it was.
"""
from __future__ import annotations

from typing import Any, BinaryIO, Callable

from ..engine import CONSISTENCY
from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..units import validate_name
from .format import DATA, StreamError, StreamReader

Progress = Callable[[int, int], None] | None
RECEIVED = "received"   # volume info: snapshot name -> {source: its id where it was sent from,
                        #                             created: the local snapshot's creation time}
PARTIAL = "partial_receive"   # volume info, until a full receive is done: what it was receiving


def _header(r: StreamReader) -> dict[str, Any]:
    """The header, with everything the receive will use checked before any data."""
    h = r.header
    try:
        src, base, labels = h["source"], h["base"], h.get("labels") or {}
        ok = (h["kind"] in ("full", "incremental") and type(h["size"]) is int and h["size"] > 0
              and type(h["block_size"]) is int and _is_id(src)
              and (base is None if h["kind"] == "full" else _is_id(base))
              and isinstance(labels, dict) and h.get("consistency", "crash") in CONSISTENCY
              and not h.get("start"))   # a backup's partial stream is not a snapshot
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StreamError("damaged stream: its header lacks what a receive needs")
    validate_name(src["snapshot"], "snapshot name")
    for k, v in labels.items():
        if not isinstance(v, str) or not k or "=" in k:
            raise StreamError(f"damaged stream: invalid label {k!r}={v!r} in its header")
    return h


def _is_id(x: Any) -> bool:
    return (isinstance(x, dict) and isinstance(x.get("volume"), str) and isinstance(x.get("snapshot"), str)
            and isinstance(x.get("created"), (int, float)))


def _apply(vol, r: StreamReader, total: int, progress: Progress) -> int:
    size, done = vol.size, 0
    for rec in r.records():
        if rec.offset + rec.length > size:
            raise StreamError(f"damaged stream: a record at {rec.offset}+{rec.length} is past the volume's end")
        if rec.kind == DATA:
            vol.write(rec.offset, rec.data)
        elif rec.length:
            vol.discard(rec.offset, rec.length)
        done += rec.length
        if progress:
            progress(min(done, total), total)
    vol.flush()
    return done


def _finish(pool, vol, h: dict[str, Any]) -> None:
    """The snapshot, then the record of where it came from.

    The record names the local snapshot too (its creation time): a snapshot
    deleted and made again under the same name is not the one received.
    """
    src = h["source"]
    with pool.lock:
        snap = vol.snapshot(src["snapshot"], labels=h.get("labels") or None,
                            consistency=h.get("consistency") or "crash")
        names = {s.name for s in vol.snapshots()}
        received = {k: v for k, v in (vol.extra.get(RECEIVED) or {}).items() if k in names}
        received[snap.name] = {"source": src, "created": snap.created}
        vol.update_extra({RECEIVED: received}, drop=(PARTIAL,))


def receive(pool, name: str, src: BinaryIO, progress: Progress = None, force: bool = False) -> dict[str, Any]:
    """`force`: an incremental stream first rolls the volume back to its base if it
    was written since (its changes since the base are lost, as with `zfs receive -F`)."""
    validate_name(name, "volume name")
    r = StreamReader(src)
    h = _header(r)
    snap = h["source"]["snapshot"]
    total = int(h.get("scan_bytes") or 0)
    if h["base"] is None:
        if pool.has_volume(name):
            if PARTIAL in pool.volume(name).extra:
                raise AlreadyExists(f"volume {name!r} holds a receive that was interrupted: delete it "
                                    f"(blocksnap volume delete {name}) and receive again")
            raise AlreadyExists(f"volume {name!r} already exists (a full stream makes a new volume)")
        vol = pool.create_volume(name, size=h["size"], mode="row", block_size=h["block_size"])
        vol.update_extra({PARTIAL: h["source"]})   # durable before any data: a crash leaves
                                                   # a volume that says so
        try:
            written = _apply(vol, r, total, progress)
            _finish(pool, vol, h)
        except BaseException:
            vol.delete(recursive=True)
            raise
    else:
        vol = _incremental_target(pool, name, h, force)
        base = h["base"]["snapshot"]
        try:
            if vol.size != h["size"]:
                vol.resize(h["size"], shrink=True)   # the stream's snapshot is that size
            written = _apply(vol, r, total, progress)
            _finish(pool, vol, h)
        except BaseException:
            vol.rollback(base)
            raise
    return {"volume": name, "snapshot": f"{name}@{snap}", "kind": h["kind"], "bytes": written,
            "stream_bytes": r.read_bytes}


def _incremental_target(pool, name: str, h: dict[str, Any], force: bool = False):
    base, src = h["base"], h["source"]
    want = f"{name}@{base.get('snapshot')}"
    if not pool.has_volume(name):
        raise NotFound(f"no volume {name!r}: an incremental stream needs {want} to apply to "
                       f"(receive the full stream of {base.get('volume')}@{base.get('snapshot')} first)")
    vol = pool.volume(name)
    snaps = vol.snapshots()
    if any(s.name == src["snapshot"] for s in snaps):
        raise AlreadyExists(f"snapshot {name}@{src['snapshot']} already exists")
    if not snaps or snaps[-1].name != base.get("snapshot"):
        newest = snaps[-1].name if snaps else "none"
        raise InvalidArgument(f"the stream applies on top of {want}, but the newest snapshot of "
                              f"{name} is {newest}")
    got = (vol.extra.get(RECEIVED) or {}).get(base["snapshot"]) or {}
    if got.get("source") != base or got.get("created") != snaps[-1].created:
        raise InvalidArgument(f"{want} is not the snapshot this stream was made against "
                              f"({base.get('volume')}@{base.get('snapshot')} of another pool or time)")
    if vol.block_size != h["block_size"]:
        raise InvalidArgument(f"block size {h['block_size']} of the stream differs from {name}'s")
    if vol.diff(base["snapshot"]) or vol.size != snaps[-1].size:
        if not force:
            raise InvalidArgument(f"volume {name} was written since {want}: roll it back first "
                                  f"(blocksnap snapshot rollback {want}), or let the receive roll it back",
                                  param="force")
        vol.rollback(base["snapshot"])
    return vol
