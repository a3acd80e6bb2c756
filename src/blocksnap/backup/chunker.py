"""Stream records to stored chunks, in parallel and in a pipeline.

Hashing, compressing and encrypting a record's chunks runs on worker threads
(the ID hash, zstd and AES-GCM all release the GIL) while the caller reads the next
records, and finished packs are written by two more threads while the workers go
on: on S3 an upload takes as long as the work that filled it. At most WINDOW
records and UPLOADS packs are in flight, so memory stays bounded.
"""
from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .crypto import ID_BYTES
from .repo import PACK_TARGET, Repository

WINDOW = 8       # records being worked on
UPLOADS = 2      # packs being written


class Chunker:
    """Records in, (first chunk, IDs) pieces out, in the order they were added."""

    def __init__(self, repo: Repository, chunk_size: int):
        self.repo, self.bs = repo, chunk_size
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.stats = {"chunks_read": 0, "new_chunks": 0, "new_bytes": 0, "packs": 0}
        self._seen: set[bytes] = set()         # IDs this backup stores (queued or written)
        self._lock = threading.Lock()
        self._work = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="chunk")
        # both packs in flight are written at once: on S3 (moto) a full backup of 2 GiB
        # took 8.8-10.9 s with one writer, 6.9-7.8 s with two; the oldest is still
        # waited for first, so what is durable is told in order
        self._upload = ThreadPoolExecutor(max_workers=UPLOADS, thread_name_prefix="pack")
        self._window: collections.deque[tuple[int, int, Future]] = collections.deque()
        self._uploads: collections.deque[tuple[Future, tuple[int, int]]] = collections.deque()
        self.done_pos = 0       # stream offset where the records finished so far end
        self.on_durable: Callable[[int, int], None] | None = None   # (pieces, position) stored
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0

    def add(self, first: int, data: bytes) -> None:
        """The record whose first chunk is chunk `first` (data may end mid-chunk)."""
        self._window.append((first, len(data), self._work.submit(self._record, data)))
        while len(self._window) > WINDOW:
            self._finish_oldest()

    def _record(self, data: bytes) -> list[tuple[bytes, bytes | None]]:
        """(ID, sealed blob or None when already stored) for each chunk of a record."""
        mv = memoryview(data)
        pieces = [mv[i:i + self.bs] for i in range(0, len(mv), self.bs)]
        cids = [self.repo.keys.chunk_id(p) for p in pieces]
        stored = self.repo.index.lookup(np.frombuffer(b"".join(cids), np.uint8))[0] >= 0   # one search
        fresh = []
        with self._lock:
            for cid, known in zip(cids, stored.tolist()):
                new = not known and cid not in self._seen
                if new:
                    self._seen.add(cid)
                fresh.append(new)
        return [(cid, self.repo.chunk_blob(cid, p) if new else None) for cid, p, new in zip(cids, pieces, fresh)]

    def _finish_oldest(self) -> None:
        first, nbytes, fut = self._window.popleft()
        done = fut.result()
        self.done_pos = first * self.bs + nbytes
        self.pieces.append((first, np.frombuffer(b"".join(c for c, _ in done), np.uint8).reshape(-1, ID_BYTES)))
        self.stats["chunks_read"] += len(done)
        for cid, blob in done:
            if blob is not None:
                self._pending.append((cid, blob))
                self._pending_bytes += len(blob)
                self.stats["new_chunks"] += 1
                self.stats["new_bytes"] += len(blob)
        if self._pending_bytes >= PACK_TARGET:
            self._send_pack()

    def _send_pack(self) -> None:
        # once this pack is written, every record finished so far is stored
        mark = (len(self.pieces), self.done_pos)
        self._uploads.append((self._upload.submit(self.repo.write_pack, self._pending), mark))
        self.stats["packs"] += 1
        self._pending, self._pending_bytes = [], 0
        while len(self._uploads) > UPLOADS:
            self._uploaded()

    def _uploaded(self) -> None:
        """Wait for the oldest pack in flight; then tell what is durable (uploads go in order)."""
        fut, mark = self._uploads.popleft()
        fut.result()
        if self.on_durable is not None:
            self.on_durable(*mark)

    def finish(self) -> None:
        """Everything added is stored (or raised)."""
        while self._window:
            self._finish_oldest()
        if self._pending:
            self._send_pack()
        while self._uploads:
            self._uploaded()

    def close(self) -> None:
        """Stop the threads; after an error, work not started is dropped, and work
        running is waited for, so nothing is written once the caller moves on (and
        releases the repository's lock)."""
        for _, _, f in self._window:
            f.cancel()
        for f, _ in self._uploads:
            f.cancel()
        self._work.shutdown(wait=True, cancel_futures=True)
        self._upload.shutdown(wait=True, cancel_futures=True)
