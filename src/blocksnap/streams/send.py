"""`send`: a snapshot as a stream, whole or as the changes since a base snapshot.

A full stream carries the snapshot's non-zero blocks (the receiver starts from an
empty volume); an incremental one carries the extents that differ from the base,
found from the maps alone, with zero runs sent as ZERO records so the receiver
frees them. Each snapshot is named in the stream by its volume, name and creation
time: a receiver applies an incremental stream only on top of the very snapshot
it was made against.
"""
from __future__ import annotations

from typing import Any, BinaryIO, Callable, Iterator

from ..engine import mask_runs, nonzero_blocks
from ..errors import InvalidArgument
from ..units import split_snapshot_pair
from .format import CHUNK, DATA, ZERO, Record, StreamWriter

Progress = Callable[[int, int], None] | None


def snapshot_id(snap) -> dict[str, Any]:
    """What names a snapshot across pools: volume, name and creation time."""
    return {"volume": snap.volume.name, "snapshot": snap.name, "created": snap.created}


def _extents(vol, snap, base) -> list[tuple[int, int]]:
    """(offset, length) ranges to send, clipped to the snapshot's size."""
    if base is None:
        runs = snap.data_extents()
    else:
        runs = [(e["offset"], e["length"]) for e in vol.diff(base.name, snap.name)]
    out = []
    for off, length in runs:
        length = min(length, snap.size - off)
        if length > 0:
            out.append((off, length))
    return out


def snapshot_records(pool, ref: str, base_ref: str | None = None, progress: Progress = None,
                     start: int = 0) -> tuple[dict[str, Any], Iterator[Record]]:
    """A stream's header and its DATA and ZERO records, before any encoding: `send`
    writes them as a stream, and a backup in the pool's own process takes them as they
    are (no pipe, no compression and parsing between two threads of one process).
    Bad arguments raise here; the records come as they are read. A DATA record's data
    is a view of one reused buffer: it holds until the next record is taken.

    With `start`, only the records from that byte on (a backup resuming where a run
    cut short left off; such a stream says so in its header, and receive refuses it)."""
    vname, sname, bname = split_snapshot_pair(ref, base_ref, "send between")
    vol = pool.volume(vname)
    snap = vol.get_snapshot(sname)
    base = vol.get_snapshot(bname) if bname is not None else None
    if base is not None:
        if base.seq >= snap.seq:
            raise InvalidArgument(f"the base {base_ref} must be older than {ref}")
    if start < 0 or start % vol.block_size:
        raise InvalidArgument(f"a stream starts at a whole block, not at byte {start}")
    extents = [(max(off, start), off + n - max(off, start)) for off, n in _extents(vol, snap, base)
               if off + n > start]
    total = sum(n for _, n in extents)
    header = {
        "kind": "incremental" if base else "full",
        "source": snapshot_id(snap), "base": snapshot_id(base) if base else None,
        "size": snap.size, "block_size": vol.block_size,
        "labels": snap.labels, "consistency": snap.consistency, "scan_bytes": total,
    }
    if start:
        header["start"] = start

    def records() -> Iterator[Record]:
        bs = vol.block_size
        step = max(bs, CHUNK // bs * bs)
        done = 0
        buf = bytearray(step)   # one buffer for every chunk: fresh memory is slow to touch on a VM
        view = memoryview(buf)
        for off, length in extents:
            for at in range(off, off + length, step):
                n = min(step, off + length - at)
                snap.read_into(at, view[:n])
                whole = -(-n // bs) * bs
                view[n:whole] = bytes(whole - n)   # the snapshot's last block may be cut short
                nz = nonzero_blocks(view[:whole], whole // bs, bs)
                if base is not None:   # zero runs must be zeroed on the other side
                    for s, c in mask_runs(~nz):
                        yield Record(ZERO, at + s * bs, min(c * bs, n - s * bs))
                for s, c in mask_runs(nz):
                    lo, hi = s * bs, min((s + c) * bs, n)
                    yield Record(DATA, at + lo, hi - lo, view[lo:hi])
                done += n
                if progress:
                    progress(done, total)
    return header, records()


def send(pool, ref: str, out: BinaryIO, base_ref: str | None = None, progress: Progress = None,
         start: int = 0) -> dict[str, Any]:
    """The snapshot (or its changes since `base_ref`) written to `out` as a stream."""
    header, records = snapshot_records(pool, ref, base_ref, progress, start)
    w = StreamWriter(out, header)
    for rec in records:
        if rec.kind == DATA:
            w.data(rec.offset, rec.data)
        else:
            w.zero(rec.offset, rec.length)
    w.end()
    return {"snapshot": ref, "base": base_ref, "kind": header["kind"], "records": w.records,
            "data_bytes": w.data_bytes, "stream_bytes": w.written}
