"""Resumable backups: what a backup cut short had already stored, and from where to go on.

While a backup runs, each time a pack is durable (its upload, then its index,
done) it may write a checkpoint: the chunk IDs of every record of the stream up to
a byte position P, all of whose chunks are then stored (in that pack, an earlier
one, or before the backup began). A backup of the same snapshot, on the same base,
in the same mode, that finds the checkpoint asks for the stream from P only and
builds its manifest from the checkpoint's pieces and the new ones: after a kill -9,
a lost network or a backup window that closed, the second run reads and stores
only what the first had not. The checkpoint is deleted once the manifest is
written. It is never a backup: `backups` and `restore` do not see it, and a
checkpoint whose chunks a prune deleted would be caught by the manifest check (a
backup never names a chunk that is not stored) before it could be used; prune
counts the chunks of checkpoints younger than MAX_AGE as live, and deletes older
checkpoints.

    checkpoints/<key>   sealed: u32 JSON length, JSON, then the data pieces as a
                        manifest's runs (u64 starts, u64 counts, IDs)
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BlocksnapError, NotFound
from .crypto import ID_BYTES
from .manifest import Piece
from .repo import Repository

PREFIX = "checkpoints"
MAX_AGE = 7 * 86400        # seconds a checkpoint keeps its chunks from prune
MIN_EVERY = 2.0            # seconds between checkpoints at least ...
COST_SHARE = 0.05          # ... and so long that writing them takes at most this share of the time
_LEN = struct.Struct("<I")


def checkpoint_key(origin: dict[str, str], source: dict[str, Any], base_id: str | None, mode: str) -> str:
    """One name per (host, pool, snapshot with its creation time, base, mode)."""
    ident = json.dumps([origin.get("host"), origin.get("pool"), source, base_id, mode], sort_keys=True)
    return f"{PREFIX}/{hashlib.sha256(ident.encode()).hexdigest()[:32]}"


@dataclass
class Checkpoint:
    key: str
    position: int = 0                   # stream bytes below this are all stored
    chunk_size: int = 0
    size: int = 0
    pieces: list[Piece] = field(default_factory=list)   # data (IDs) and zero (None) ranges below position
    time: float = 0.0

    def encode(self) -> bytes:
        data = [(s, ids) for s, _, ids in self.pieces if ids is not None]
        zeros = [[s, c] for s, c, ids in self.pieces if ids is None]
        starts = np.array([s for s, _ in data], np.uint64)
        counts = np.array([len(ids) for _, ids in data], np.uint64)
        ids = np.concatenate([i for _, i in data]) if data else np.empty((0, ID_BYTES), np.uint8)
        body = json.dumps({"position": self.position, "chunk_size": self.chunk_size, "size": self.size,
                           "zeros": zeros, "pieces": len(data), "time": self.time}).encode()
        return (_LEN.pack(len(body)) + body + starts.astype("<u8").tobytes() + counts.astype("<u8").tobytes()
                + np.ascontiguousarray(ids, np.uint8).tobytes())

    @classmethod
    def decode(cls, key: str, raw: bytes) -> "Checkpoint":
        (n,) = _LEN.unpack_from(raw)
        info = json.loads(raw[4:4 + n])
        k = int(info["pieces"])
        at = 4 + n
        starts = np.frombuffer(raw, "<u8", k, at).astype(np.int64)
        counts = np.frombuffer(raw, "<u8", k, at + 8 * k).astype(np.int64)
        ids = np.frombuffer(raw, np.uint8, offset=at + 16 * k).reshape(-1, ID_BYTES)
        if len(ids) != int(counts.sum()):
            raise ValueError("piece lengths")
        ends = np.cumsum(counts)
        pieces: list[Piece] = [(int(s), int(c), ids[e - c:e]) for s, c, e in zip(starts, counts, ends)]
        pieces += [(int(s), int(c), None) for s, c in info["zeros"]]
        return cls(key, int(info["position"]), int(info["chunk_size"]), int(info["size"]), pieces,
                   float(info.get("time", 0.0)))

    def ids(self) -> np.ndarray:
        """Every chunk ID it names (prune keeps them)."""
        parts = [ids for _, _, ids in self.pieces if ids is not None]
        return np.concatenate(parts) if parts else np.empty((0, ID_BYTES), np.uint8)


def load(repo: Repository, key: str) -> Checkpoint | None:
    """The checkpoint under `key`, or None (none, or damaged: start over)."""
    try:
        raw = repo.keys.open(repo.backend.get(key), key.encode(), f"{repo.url}: {key}")
        cp = Checkpoint.decode(key, raw)
    except NotFound:
        return None
    except (BlocksnapError, ValueError, KeyError, TypeError, struct.error):
        return None      # damaged: not worth failing a backup for; it is written anew
    if cp.position < 0 or not cp.chunk_size or cp.position % cp.chunk_size:
        return None
    return cp


def save(repo: Repository, cp: Checkpoint) -> float:
    """Write the checkpoint (it replaces the last one); returns how long that took."""
    t0 = time.monotonic()
    cp.time = time.time()
    repo.backend.put(cp.key, repo.keys.seal(cp.encode(), cp.key.encode()))
    return time.monotonic() - t0


class Pacer:
    """When to write the next checkpoint: MIN_EVERY seconds after the last, or later
    when the last took long (a checkpoint holds every ID so far: on a large backup it
    grows, and rewriting it must stay a small share of the backup's time)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.took = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= max(MIN_EVERY, self.took / COST_SHARE)

    def done(self, took: float) -> None:
        self.last, self.took = time.monotonic(), took


def drop(repo: Repository, key: str) -> None:
    try:
        repo.backend.delete(key)
    except NotFound:
        pass


def live_ids(repo: Repository, now: float | None = None) -> tuple[list[np.ndarray], list[str]]:
    """(chunk IDs of the checkpoints prune must keep, keys of those it may delete)."""
    now = time.time() if now is None else now
    keep, old = [], []
    for key in sorted(repo.backend.list(PREFIX)):
        try:
            cp = Checkpoint.decode(key, repo.keys.open(repo.backend.get(key), key.encode(), key))
        except (BlocksnapError, ValueError, KeyError, TypeError, struct.error):
            old.append(key)
            continue
        if now - cp.time > MAX_AGE:
            old.append(key)
        else:
            keep.append(cp.ids())
    return keep, old

