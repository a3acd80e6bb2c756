"""Random reads of a backup's image by offset, fetching only the chunks asked for.

A `BlockSource` resolves, once, where each stored chunk of a manifest lives (pack,
offset, length: numpy arrays as long as what the backup holds, never the volume's
size). A read turns into the chunks it covers: holes are zeros, the others come
from the cache or from ranged reads of their packs (one GET per run of chunks
adjacent in a pack, the chunks a request needs fetched in parallel). Every chunk
fetched is checked as a restore checks it (its AES-GCM tag, then its keyed ID over
the decompressed bytes); a damaged one raises CorruptionError naming the chunk,
its pack and the image offset, and is never cached or returned.

The source knows nothing of FUSE: `chunks(rows)` hands out stored chunks pack by
pack without caching, which is what hydrating a volume from a backup needs.
"""
from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ..backup.manifest import Manifest
from ..backup.repo import Repository
from ..backup.restore import fetch_spans
from ..errors import CorruptionError

DEFAULT_CACHE = 512 << 20
READAHEAD = 8            # chunks after a missed one, adjacent in its pack, fetched in the same GET
                         # when reads go forward (a sequential scan: one request per 8 chunks)
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


class ChunkCache:
    """Decrypted chunks by ID, least recently used first out, at most `capacity` bytes.

    In memory when `directory` is None; else in an unnamed file there (O_TMPFILE,
    0600: it has no name, so it is gone when the process ends, even on kill -9),
    one slot per chunk, so a large cache costs disk and page cache, not the
    process's memory. Keyed by chunk ID: equal blocks anywhere share one entry.
    """

    def __init__(self, capacity: int, slot: int, directory: str | None = None):
        self.slot = slot
        self.slots = max(4, capacity // slot)
        self.capacity = self.slots * slot
        self._lru: collections.OrderedDict[bytes, tuple[int, int] | bytes] = collections.OrderedDict()
        self._free = list(range(self.slots - 1, -1, -1))
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.fd: int | None = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self.fd = os.open(directory, O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.capacity)

    def get(self, cid: bytes) -> bytes | None:
        with self._lock:
            e = self._lru.get(cid)
            if e is None:
                self.misses += 1
                return None
            self._lru.move_to_end(cid)
            self.hits += 1
            if isinstance(e, bytes):
                return e
            slot, n = e
            return os.pread(self.fd, n, slot * self.slot)   # under the lock: the slot cannot be reused meanwhile

    def put(self, cid: bytes, data: bytes) -> None:
        with self._lock:
            if cid in self._lru:
                self._lru.move_to_end(cid)
                return
            if self.fd is None:
                if len(self._lru) >= self.slots:
                    self._lru.popitem(last=False)
                self._lru[cid] = data
                return
            if not self._free:
                _, (slot, _) = self._lru.popitem(last=False)
                self._free.append(slot)
            slot = self._free.pop()
            os.pwrite(self.fd, data, slot * self.slot)
            self._lru[cid] = (slot, len(data))

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, cid: bytes) -> bool:
        """Whether it is cached, without counting a hit or touching its age."""
        with self._lock:
            return cid in self._lru

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Pending:
    """A chunk one thread is fetching; others that want it wait for the result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class BlockSource:
    """One backup's image, read by offset. The repository's index must be loaded."""

    def __init__(self, repo: Repository, manifest: Manifest, cache: ChunkCache | None = None,
                 workers: int = 8, readahead: int = READAHEAD,
                 on_damage: Callable[[str], None] | None = None):
        self.repo, self.manifest, self.cache = repo, manifest, cache
        self.id = manifest.id
        self.size = int(manifest.info["size"])
        self.chunk_size = int(manifest.info["chunk_size"])
        self.readahead = readahead if cache is not None else 0
        self.on_damage = on_damage
        self.starts = manifest.starts.astype(np.int64)
        counts = manifest.counts.astype(np.int64)
        self.ends = self.starts + counts
        self.first_row = np.cumsum(counts) - counts      # row of `ids` where each run begins
        self.ids = manifest.ids
        self.pack_no, self.offs, self.lens = repo.index.lookup(manifest.ids)
        gone = np.flatnonzero(self.pack_no < 0)
        if len(gone):
            n = self.chunk_of(int(gone[0]))
            raise CorruptionError(f"backup {self.id}: {len(gone)} of its chunks are not in {repo.url} "
                                  f"(the first: chunk {self.ids[gone[0]].tobytes().hex()} at image offset "
                                  f"{n * self.chunk_size}); run `blocksnap verify`")
        self._pending: dict[int, _Pending] = {}
        self._last = -2                 # the last row read: readahead follows sequential reads only
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        self.fetched_bytes = 0
        self.requests = 0

    # -- where things are -----------------------------------------------------------
    def row_of(self, chunk: int) -> int:
        """The row of `ids` holding chunk number `chunk`, or -1 for a hole."""
        r = int(np.searchsorted(self.starts, chunk, side="right")) - 1
        if r < 0 or chunk >= self.ends[r]:
            return -1
        return int(self.first_row[r] + chunk - self.starts[r])

    def chunk_of(self, row: int) -> int:
        """The chunk number a row of `ids` fills."""
        r = int(np.searchsorted(self.first_row, row, side="right")) - 1
        return int(self.starts[r] + row - self.first_row[r])

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(first chunk, count) of each run of stored chunks; the rest is zeros."""
        return self.starts, self.ends - self.starts

    def pack(self, row: int) -> str:
        return self.repo.index.packs[int(self.pack_no[row])]

    # -- reads ------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, out: memoryview) -> int:
        """Fill `out` from the image at `offset` (cut at the image's end): bytes filled."""
        end = min(offset + len(out), self.size)
        if offset >= end:
            return 0
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        rows = [self.row_of(c) for c in range(first, last + 1)]
        data = self._rows([r for r in rows if r >= 0])
        for c, r in zip(range(first, last + 1), rows):
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            dst = out[lo - offset:hi - offset]
            if r < 0:
                dst[:] = bytes(hi - lo)
            else:
                piece = data[r][lo - c * cs:hi - c * cs]
                dst[:len(piece)] = piece
                if len(piece) < hi - lo:      # a short last chunk: the rest of the image is zeros
                    dst[len(piece):] = bytes(hi - lo - len(piece))
        return end - offset

    def _rows(self, rows: list[int]) -> dict[int, bytes]:
        """The data of these rows: from the cache, from another thread's fetch, or fetched."""
        out: dict[int, bytes] = {}
        mine: list[int] = []
        waits: list[tuple[int, _Pending]] = []
        with self._lock:
            for r in dict.fromkeys(rows):
                hit = self.cache.get(self.ids[r].tobytes()) if self.cache is not None else None
                if hit is not None:
                    out[r] = hit
                elif r in self._pending:
                    waits.append((r, self._pending[r]))
                else:
                    self._pending[r] = _Pending()
                    mine.append(r)
            # read ahead only when reads go forward: a random read fetches its chunk alone
            sequential = bool(rows) and (rows[0] - 1 == self._last or rows[0] == self._last)
            self._last = rows[-1] if rows else self._last
            extra = self._readahead(mine) if sequential else []
            for r in extra:
                self._pending[r] = _Pending()
        got: dict[int, bytes | CorruptionError] = {}
        failure: BaseException | None = None
        try:
            if mine or extra:
                got = self._fetch(mine + extra)
        except BaseException as e:       # the repository unreachable: waiters get the same error
            failure = e
            raise
        finally:
            with self._lock:
                for r in mine + extra:
                    p = self._pending.pop(r, None)
                    if p is not None and not p.done.is_set():
                        p.error = failure or CorruptionError(f"backup {self.id}: block {self.chunk_of(r)} "
                                                             "was not fetched")
                        p.done.set()
        for r in mine:
            d = got[r]
            if isinstance(d, CorruptionError):
                raise d
            out[r] = d
        for r, p in waits:
            p.done.wait()
            if p.error is not None:
                raise p.error
            out[r] = p.data
        return out

    def _readahead(self, rows: list[int]) -> list[int]:
        """Rows after each missed one whose chunks follow it in the same pack (so the
        same GET brings them), not cached or on the way: sequential reads then cost
        one request per READAHEAD chunks. Called under the lock."""
        extra: list[int] = []
        want = set(rows)
        for r in rows:
            for n in range(r + 1, min(r + 1 + self.readahead, len(self.ids))):
                if (n in want or n in self._pending or self.pack_no[n] != self.pack_no[n - 1]
                        or int(self.offs[n]) != int(self.offs[n - 1]) + int(self.lens[n - 1])):
                    break
                if self.cache is not None and self.ids[n].tobytes() in self.cache:
                    break
                want.add(n)
                extra.append(n)
        return extra

    def _fetch(self, rows: list[int]) -> dict[int, bytes | CorruptionError]:
        """Fetch, check and cache rows (registered as pending by this thread)."""
        by_pack: dict[int, list] = {}
        for r in rows:
            by_pack.setdefault(int(self.pack_no[r]), []).append(
                (self.ids[r].tobytes(), int(self.offs[r]), int(self.lens[r]), r))
        jobs = [(p, s) for p, entries in by_pack.items() for s in fetch_spans(entries, gap=0)]
        if len(jobs) == 1:
            results = [self._span(*jobs[0])]
        else:
            results = list(self._pool.map(lambda j: self._span(*j), jobs))
        out: dict[int, bytes | CorruptionError] = {}
        for part in results:
            out.update(part)
        return out

    def _span(self, pack_no: int, span: tuple[int, int, list]) -> dict[int, bytes | CorruptionError]:
        """One ranged read; each chunk in it checked on its own (a damaged one fails
        only the reads that need it, never its neighbours fetched alongside)."""
        start, end, items = span
        pack = self.repo.index.packs[pack_no]
        blob = memoryview(self.repo.backend.get_range(f"data/{pack}", start, end - start))
        with self._lock:
            self.fetched_bytes += len(blob)
            self.requests += 1
        out: dict[int, bytes | CorruptionError] = {}
        for cid, off, ln, r in items:
            p = self._pending.get(r)
            try:
                data = self.repo.open_chunk(cid, blob[off - start:off - start + ln], self._what(r, cid, pack))
            except CorruptionError as e:
                if self.on_damage is not None:
                    self.on_damage(str(e))
                out[r] = e
                if p is not None:
                    p.error = e
                    p.done.set()
                continue
            if self.cache is not None:
                self.cache.put(cid, data)
            out[r] = data
            if p is not None:
                p.data = data
                p.done.set()
        return out

    def _what(self, row: int, cid: bytes, pack: str) -> str:
        n = self.chunk_of(row)
        return (f"{self.repo.url}: backup {self.id}: chunk {cid.hex()} in pack {pack} "
                f"(image offset {n * self.chunk_size}, block {n})")

    # -- for bulk copies (hydration, tests) ----------------------------------------------
    def chunks(self, rows: np.ndarray | None = None) -> Iterator[tuple[int, bytes]]:
        """(chunk number, data) of the given rows (default: every stored chunk), pack by
        pack in offset order, each pack range fetched once; checked, not cached."""
        rows = np.arange(len(self.ids)) if rows is None else np.asarray(rows, np.int64)
        order = rows[np.lexsort((self.offs[rows], self.pack_no[rows]))]
        cuts = np.flatnonzero(np.diff(self.pack_no[order])) + 1
        for group in np.split(order, cuts):
            if not len(group):
                continue
            pack_no = int(self.pack_no[group[0]])
            pack = self.repo.index.packs[pack_no]
            entries = [(self.ids[r].tobytes(), int(self.offs[r]), int(self.lens[r]), int(r)) for r in group]
            for start, end, items in fetch_spans(entries):
                blob = memoryview(self.repo.backend.get_range(f"data/{pack}", start, end - start))
                for cid, off, ln, r in items:
                    yield self.chunk_of(r), self.repo.open_chunk(
                        cid, blob[off - start:off - start + ln], self._what(r, cid, pack))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()
