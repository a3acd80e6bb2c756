"""`backup`: a snapshot into a repository, read as a send stream.

The pool's owner (this process, or the daemon while the pool is served) writes a
send stream into a pipe; this side cuts it into chunks of the volume's block
size, stores the chunks the repository lacks, and writes the manifest last. An
incremental or differential backup asks for the stream `--from` the snapshot of
its base backup, so only the blocks the snapshot maps say changed are read; the
manifest is the base's runs with those ranges replaced (manifest.overlay), at a
cost of the runs and the changes, not of the volume's size.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np

from ..errors import BlocksnapError, CorruptionError, InvalidArgument, NotFound
from ..streams.format import DATA, Record, StreamError, StreamReader, StreamTruncated
from ..units import split_snapshot_ref
from . import index_files, resume
from .chunk_index import missing_chunks
from .chunker import Chunker
from .manifest import Manifest, Piece, chunk_count, new_backup_id, overlay
from .repo import Repository

MODES = ("full", "incremental", "differential")
# (write end of a pipe, base snapshot or None, first byte) -> the send's report; runs in a thread
Producer = Callable[[int, str | None, int], dict]
# (base snapshot or None, first byte) -> a context giving the stream's header and its records
Source = Callable[[str | None, int], ContextManager[tuple[dict, Iterable[Record]]]]
Created = Callable[[str], float | None]      # a snapshot's creation time, None if gone
Progress = Callable[[int, int], None] | None


def choose_base(repo: Repository, origin: dict[str, str], vname: str, sname: str, mode: str,
                created: Created) -> tuple[Manifest | None, str | None]:
    """The backup to build on for this mode, or None (then a full one), with a note why.
    Only backups of this volume of this pool on this host count (`origin`)."""
    if mode not in MODES:
        raise InvalidArgument(f"invalid mode {mode!r}: use {', '.join(MODES)}")
    if mode == "full":
        return None, None
    mine = [m for m in repo.manifests() if m.group == (origin["host"], origin["pool"], vname)]
    if mode == "differential":
        mine = [m for m in mine if m.info["mode"] == "full"]
    if not mine:
        return None, f"no earlier {'full ' if mode == 'differential' else ''}backup of {vname}: making a full one"
    base = mine[-1]
    src = base.info["source"]
    this = created(f"{vname}@{sname}")
    if src["snapshot"] == sname and this == src["created"]:
        raise InvalidArgument(f"{vname}@{sname} is already backed up, as {base.id}")
    if created(f"{vname}@{src['snapshot']}") != src["created"]:
        return None, (f"{vname}@{src['snapshot']}, the snapshot of backup {base.id}, is gone or was "
                      f"made again: reading the whole snapshot (a full backup)")
    if this is not None and src["created"] >= this:
        return None, (f"the last backup ({base.id}) is of a newer snapshot, {vname}@{src['snapshot']}: "
                      f"reading the whole snapshot (a full backup)")
    return base, None


def make_backup(repo: Repository, origin: dict[str, str], ref: str, mode: str, source: Source,
                created: Created, progress: Progress = None) -> dict[str, Any]:
    """Back `ref` up; `source` gives its records: `piped(produce)` from a send stream
    (the daemon's), or `direct(pool, ref)` in the pool's own process."""
    vname, sname = split_snapshot_ref(ref)
    when = created(ref)
    if when is None:
        raise NotFound(f"no snapshot {ref}")
    # under the lock from the first look: a prune must not delete, between our
    # reading of the indexes and our manifest, chunks we count as stored
    with repo.lock("backup"):
        base, note = choose_base(repo, origin, vname, sname, mode, created)
        repo.load_index()
        what = {"volume": vname, "snapshot": sname, "created": when}
        key = resume.checkpoint_key(origin, what, base.id if base else None, mode)
        info, (starts, counts, ids), stats = _run(repo, source, base, vname, sname, key, progress)
        lost = missing_chunks(repo.index, ids)
        if lost:   # never write a manifest that names a chunk the repository lacks
            resume.drop(repo, key)   # (a checkpoint whose chunks were pruned: start afresh next time)
            raise CorruptionError(f"{repo.url}: {lost} chunks of {ref} are not stored; no backup made "
                                  f"(was the repository pruned or unlocked under a running backup?)")
        m = Manifest(dict(info, id=new_backup_id(), time=time.time(), mode="full" if base is None else mode,
                          requested_mode=mode, base=base.id if base else None, stats=stats, **origin),
                     starts, counts, ids)
        repo.write_manifest(m)
        resume.drop(repo, key)
        try:
            index_files.merge_own(repo, repo.written)
        except BlocksnapError as e:    # the backup is whole without it: say so, do not fail it
            note = "; ".join(filter(None, [note, f"the backup is stored, but merging its indexes failed: {e}"]))
    return dict(m.info, note=note)


Runs = tuple[np.ndarray, np.ndarray, np.ndarray]   # a manifest's starts, counts, ids
PIPE_BYTES = 1 << 20    # the stream's pipe: 16 times Linux's default


def _widen(fd: int) -> None:
    """A 1 MiB pipe (the default maximum for anyone): with 64 KiB the sender and the
    reader woke each other for every 64 KiB of the stream. A full 2 GiB backup
    went from 4.06-4.21 s to 3.73-3.83 s (docs/performance.md, "Backups")."""
    with contextlib.suppress(OSError):   # (a lower pipe-max-size: the default stays)
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def piped(produce: Producer) -> Source:
    """Records from a send stream that `produce` writes into a pipe on a thread: how a
    backup reads a pool its daemon serves."""
    @contextlib.contextmanager
    def source(base: str | None, start: int) -> Iterator[tuple[dict, Iterable[Record]]]:
        r, w = os.pipe()
        _widen(w)
        failure: list[BaseException] = []

        def sender() -> None:
            try:
                produce(w, base, start)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer's side
                failure.append(e)
            finally:
                os.close(w)

        t = threading.Thread(target=sender, name="backup-send", daemon=True)
        t.start()
        src = os.fdopen(r, "rb", buffering=1 << 20)
        try:
            try:
                reader = StreamReader(src)
                yield reader.header, reader.records()
            finally:
                src.close()            # a sender still writing gets EPIPE instead of waiting
                t.join()
        except StreamTruncated:
            if failure:                # the stream ended because its sender failed: say why
                raise failure[0].with_traceback(None) from None
            raise
    return source


def direct(pool, ref: str) -> Source:
    """Records read from the pool's maps by this thread, in the pool's own process:
    no pipe, no stream compressed by one thread and parsed by another. On a 2 GiB
    volume with 1 % changed that took 0.17 s of a 0.6 s incremental backup
    (docs/performance.md, "Backups"). Each DATA record is copied out of the reader's
    buffer, as the chunker works on it while the next one is read."""
    from ..streams.send import snapshot_records

    @contextlib.contextmanager
    def source(base: str | None, start: int) -> Iterator[tuple[dict, Iterable[Record]]]:
        header, records = snapshot_records(pool, ref, base, None, start)
        yield header, (Record(r.kind, r.offset, r.length, bytes(r.data)) if r.kind == DATA else r for r in records)
    return source


def _run(repo: Repository, source: Source, base: Manifest | None, vname: str, sname: str, key: str,
         progress: Progress) -> tuple[dict, Runs, dict]:
    cp = resume.load(repo, key)
    start = cp.position if cp else 0
    with source(f"{vname}@{base.info['source']['snapshot']}" if base else None, start) as (header, records):
        return _consume(header, records, repo, base, vname, sname, cp or resume.Checkpoint(key), progress)


def _consume(hdr: dict, records: Iterable[Record], repo: Repository, base: Manifest | None, vname: str,
             sname: str, cp: resume.Checkpoint, progress: Progress) -> tuple[dict, Runs, dict]:
    """Records to chunks; `cp` holds what an earlier run stored (the stream starts
    at its position) and takes what this one stores, a checkpoint every few seconds."""
    if (hdr["source"]["volume"], hdr["source"]["snapshot"]) != (vname, sname):
        raise StreamError(f"the stream is of {hdr['source']['volume']}@{hdr['source']['snapshot']}")
    if base is not None and hdr.get("base") != base.info["source"]:
        raise StreamError(f"the stream's base is not the snapshot of backup {base.id}")
    bs, size = int(hdr["block_size"]), int(hdr["size"])
    if int(hdr.get("start") or 0) != cp.position or (cp.position and (cp.chunk_size, cp.size) != (bs, size)):
        resume.drop(repo, cp.key)
        raise StreamError("the stream does not continue the checkpoint of an earlier run of this backup; "
                          "the checkpoint was removed: run the backup again")
    cp.chunk_size, cp.size = bs, size
    n = chunk_count(size, bs)
    resumed, earlier = cp.position, list(cp.pieces)
    zeros: list[Piece] = []
    read = 0
    total = int(hdr.get("scan_bytes") or size)
    chunker = Chunker(repo, bs)
    pacer = resume.Pacer()

    def durable(npieces: int, position: int) -> None:
        """Every record below `position` is stored: note it, now and then."""
        if not pacer.due():
            return
        cp.position = position
        cp.pieces = earlier + [z for z in zeros if z[0] * bs < position] + \
            [(first, len(ids), ids) for first, ids in chunker.pieces[:npieces]]
        pacer.done(resume.save(repo, cp))

    chunker.on_durable = durable
    try:
        for rec in records:
            if rec.offset % bs or rec.offset < resumed or rec.offset + rec.length > size:
                raise StreamError(f"damaged stream: a record at {rec.offset}+{rec.length} does not fit "
                                  f"chunks of {bs} in {size} bytes")
            first = rec.offset // bs
            if rec.kind != DATA:
                zeros.append((first, chunk_count(rec.length, bs), None))
                continue
            chunker.add(first, rec.data)
            read += rec.length
            if progress:
                progress(min(resumed + read, total), total)
        chunker.finish()
    finally:
        chunker.close()
    st = dict(chunker.stats, read_bytes=read, resumed_from=resumed)
    info = {"source": hdr["source"], "size": size, "chunk_size": bs, "chunks": n,
            "labels": hdr.get("labels") or {}, "consistency": hdr.get("consistency")}
    changes = earlier + zeros + [(first, len(ids), ids) for first, ids in chunker.pieces]
    return info, overlay(base, n, changes), st
