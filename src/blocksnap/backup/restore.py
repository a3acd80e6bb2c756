"""`restore`: a backup back into a raw image file or onto a block device.

Every chunk is checked twice on the way (its AES-GCM tag, then its keyed ID over
the decompressed bytes), so a damaged or swapped object stops the restore with the
chunk named, never writes wrong data silently. A new image file stays sparse
(zero chunks are holes); on a device they are written as zeros. `--verify` reads
the target back after it is synced and checks every chunk again. Only the parts
of a pack the backup needs are fetched (ranged GETs on S3), so restoring an
incremental backup does not download the whole of every old pack it touches.
"""
from __future__ import annotations

import contextlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..errors import AlreadyExists, CorruptionError, InvalidArgument
from ..store.filestore import device_size
from .chunk_index import keys_of
from .manifest import Manifest
from .repo import Repository

Progress = Callable[[int, int], None] | None
WORKERS = min(4, max(2, os.cpu_count() or 2))   # packs in flight: ~16 MiB each, twice over
FETCH_GAP = 512 << 10   # chunks closer than this in a pack are fetched with one request


def _open_target(target: str, size: int) -> tuple[int, bool]:
    """(fd, is a device). A regular file is never written over: restores make new files."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)     # EFBIG on a filesystem too small for the image
        except BaseException:
            os.close(fd)
            os.unlink(target)
            raise
        return fd, False
    if stat.S_ISBLK(st.st_mode):
        have = device_size(target)
        if have < size:
            raise InvalidArgument(f"{target}: the device holds {have} bytes, the backup needs {size}")
        return os.open(target, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL), True
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{target}: is a directory (give a new file's path or a block device)")
    raise AlreadyExists(f"{target}: exists (a restore never writes over a file; give a new path or a device)")


def restore(repo: Repository, ident: str, target: str, verify: bool = False,
            progress: Progress = None) -> dict[str, Any]:
    with repo.lock("restore"):    # a prune must not rewrite the packs under it
        return _restore(repo, ident, target, verify, progress)


def _restore(repo: Repository, ident: str, target: str, verify: bool, progress: Progress) -> dict[str, Any]:
    m = repo.manifest(ident)
    repo.load_index()
    bs, size = m.info["chunk_size"], m.info["size"]
    stored = m.chunk_numbers()
    plan = Plan(repo, m, stored)
    fd, is_dev = _open_target(target, size)
    done = fetched = 0

    def one_pack(pack: str) -> tuple[int, int]:
        """Fetch the parts of a pack this backup needs, check and write its chunks:
        (bytes written, bytes fetched). Packs go in parallel: decrypting,
        decompressing and hashing release the GIL."""
        n = fetched = 0
        for start, end, items in fetch_spans(plan.entries(pack)):
            blob = memoryview(repo.backend.get_range(f"data/{pack}", start, end - start))
            fetched += len(blob)
            for cid, off, ln, where in items:
                data = repo.open_chunk(cid, blob[off - start:off - start + ln],
                                       f"{repo.url}: chunk {cid.hex()} in pack {pack}")
                for i in where:
                    _pwrite_all(fd, data[:max(0, min(bs, size - i * bs))], i * bs)
                    n += len(data)
        return n, fetched

    try:
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="restore") as pool:
            futures = [pool.submit(one_pack, p) for p in sorted(plan.packs)]
            try:
                for f in futures:
                    written, got = f.result()
                    done += written
                    fetched += got
                    if progress:
                        progress(min(done, size), size)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        if is_dev:
            _zero_holes(fd, m, bs, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if not is_dev:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)   # half a restored image is no image
        raise
    os.close(fd)
    checked = _verify(repo, m, target) if verify else None
    return {"backup": m.id, "target": target, "size": size, "chunks": int(len(stored)),
            "bytes_written": done, "bytes_fetched": fetched, "verified": checked}


class Plan:
    """Which distinct chunks a backup needs from each pack, and the blocks each
    fills: numpy arrays (about 50 bytes a chunk), turned into Python tuples one
    pack at a time, as the pack is restored."""

    def __init__(self, repo: Repository, m: Manifest, stored: np.ndarray):
        named = m.ids                                  # row i fills chunk stored[i]
        uniq, first, inverse = np.unique(keys_of(named), return_index=True, return_inverse=True)
        pack_no, self.offs, self.lens = repo.index.lookup(named[first])
        if (pack_no < 0).any():
            raise CorruptionError(f"backup {m.id}: {int(np.count_nonzero(pack_no < 0))} of its chunks are not "
                                  f"in the repository (run `blocksnap verify --repo {repo.url}`)")
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")
        self.uniq, self.blocks = uniq, stored[order]
        self.bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        by = np.lexsort((self.offs, pack_no))          # each pack's chunks in offset order
        cuts = np.flatnonzero(np.diff(pack_no[by])) + 1
        self.packs = {repo.index.packs[int(pack_no[g[0]])]: g for g in np.split(by, cuts) if len(g)}

    def entries(self, pack: str) -> list[tuple[bytes, int, int, list[int]]]:
        """(chunk ID, offset, length, blocks) of each chunk needed from `pack`."""
        return [(self.uniq[u].tobytes(), int(self.offs[u]), int(self.lens[u]),
                 self.blocks[self.bounds[u]:self.bounds[u + 1]].tolist()) for u in self.packs[pack].tolist()]


def fetch_spans(entries: list, gap: int = FETCH_GAP) -> list[tuple[int, int, list]]:
    """Byte ranges of a pack to fetch for `entries` (cid, offset, length, where):
    chunks closer than `gap` share a request, so a whole-pack restore is one GET
    and a backup that needs a few chunks of an old pack fetches only those."""
    spans: list[tuple[int, int, list]] = []
    for e in sorted(entries, key=lambda e: e[1]):
        off, ln = e[1], e[2]
        if spans and off - spans[-1][1] <= gap:
            start, end, items = spans[-1]
            items.append(e)
            spans[-1] = (start, max(end, off + ln), items)
        else:
            spans.append((off, off + ln, [e]))
    return spans


def _zero_holes(fd: int, m: Manifest, bs: int, size: int) -> None:
    zero = bytes(1 << 20)
    for s, c in m.holes():
        at, end = s * bs, min((s + c) * bs, size)
        while at < end:
            n = min(len(zero), end - at)
            _pwrite_all(fd, zero[:n], at)
            at += n


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _verify(repo: Repository, m: Manifest, target: str) -> int:
    """Read the target back and check it against the manifest: every stored chunk
    against its ID, and the rest reads as zeros (on a sparse file only its data
    extents are read: a hole is zeros). Returns the chunks checked."""
    bs, size = m.info["chunk_size"], m.info["size"]
    with open(target, "rb", buffering=0) as f:
        fd = f.fileno()
        for i, want in zip(m.chunk_numbers().tolist(), m.ids):
            data = os.pread(fd, min(bs, size - i * bs), i * bs)
            if repo.keys.chunk_id(data) != want.tobytes():
                raise CorruptionError(f"{target}: block {i} does not match backup {m.id} after the restore")
        sparse = stat.S_ISREG(os.fstat(fd).st_mode)
        for s, c in m.holes():
            for at, n in (_data_in(fd, s * bs, min((s + c) * bs, size)) if sparse
                          else [(s * bs, min((s + c) * bs, size) - s * bs)]):
                for off in range(at, at + n, 1 << 20):
                    piece = os.pread(fd, min(1 << 20, at + n - off), off)
                    if piece.count(0) != len(piece):
                        raise CorruptionError(f"{target}: block {off // bs} should read as zeros after "
                                              f"the restore of backup {m.id}")
    return int(m.info["chunks"])


def _data_in(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of [start, end) of a file that are not holes."""
    out = []
    at = start
    while at < end:
        try:
            a = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:          # ENXIO: no data past `at`
            break
        if a >= end:
            break
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        out.append((a, b - a))
        at = b
    return out
