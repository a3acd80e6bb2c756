"""One backup: what it is (JSON) and which chunk of the volume holds what.

Every manifest is whole: restore needs this one object and the packs it names,
never an earlier backup. It is sparse: the volume's stored chunks are runs
(`starts`, `counts`: first chunk and length of each), with the chunk IDs of those
runs one after another in `ids`; what no run covers is zeros. So it costs what the
volume holds, not its size: a 64 TiB volume holding 1 GiB in 64 KiB chunks is
16,384 IDs, not a billion.

Layout before sealing (format 2): u32 JSON length, JSON (with "manifest_format": 2
and "runs"), `runs` u64 starts, `runs` u64 counts, then the IDs, ID_BYTES each,
zstd-compressed. Format 1 (before 2026-12) held one ID per chunk of the volume,
ZERO_ID for zeros; it is still read, and becomes runs as it is decoded.
"""
from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import zstandard

from ..errors import CorruptionError
from .crypto import ID_BYTES

_LEN = struct.Struct("<I")
FORMAT = 2


@dataclass
class Manifest:
    info: dict[str, Any]
    starts: np.ndarray = field(repr=False)   # (runs,) uint64: first chunk of each run
    counts: np.ndarray = field(repr=False)   # (runs,) uint64: chunks in each run
    ids: np.ndarray = field(repr=False)      # (sum(counts), ID_BYTES) uint8, run by run

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def volume(self) -> str:
        return self.info["source"]["volume"]

    @property
    def group(self) -> tuple[str, str, str]:
        """Whose backup this is: host, pool path, volume. Incremental bases and
        retention never mix two pools' volumes that share a name."""
        return (self.info.get("host", ""), self.info.get("pool", ""), self.volume)

    @property
    def stored(self) -> int:
        """Chunks that hold data (the rest of the volume is zeros)."""
        return len(self.ids)

    def chunk_numbers(self) -> np.ndarray:
        """The chunk number of each row of `ids` (int64; as long as ids, never the volume)."""
        return expand_runs(self.starts, self.counts)

    def holes(self) -> Iterator[tuple[int, int]]:
        """(first chunk, count) of each run of zeros, up to the volume's end."""
        at = 0
        for s, c in zip(self.starts.tolist(), self.counts.tolist()):
            if s > at:
                yield at, s - at
            at = s + c
        if self.info["chunks"] > at:
            yield at, self.info["chunks"] - at

    def encode(self) -> bytes:
        info = dict(self.info, manifest_format=FORMAT, runs=len(self.starts))
        body = json.dumps(info, sort_keys=True).encode()
        return zstandard.ZstdCompressor(level=3).compress(
            _LEN.pack(len(body)) + body + self.starts.astype("<u8").tobytes()
            + self.counts.astype("<u8").tobytes() + np.ascontiguousarray(self.ids, np.uint8).tobytes())

    @classmethod
    def decode(cls, raw: bytes, what: str) -> "Manifest":
        try:
            plain = zstandard.ZstdDecompressor().decompress(raw)
            (n,) = _LEN.unpack_from(plain)
            info = json.loads(plain[4:4 + n])
            at = 4 + n
            if info.get("manifest_format", 1) == 1:
                dense = np.frombuffer(plain, np.uint8, offset=at).reshape(-1, ID_BYTES)
                if len(dense) != info.get("chunks"):
                    raise CorruptionError(f"{what} is damaged (chunk count)")
                return cls.from_dense(info, dense)
            runs = int(info["runs"])
            starts = np.frombuffer(plain, "<u8", runs, at).astype(np.uint64)
            counts = np.frombuffer(plain, "<u8", runs, at + 8 * runs).astype(np.uint64)
            ids = np.frombuffer(plain, np.uint8, offset=at + 16 * runs).reshape(-1, ID_BYTES)
        except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError):
            raise CorruptionError(f"{what} is damaged") from None
        ends = starts + counts
        if (len(ids) != int(counts.sum()) or (counts == 0).any() or (runs and int(ends[-1]) > info.get("chunks", -1))
                or (starts[1:] < ends[:-1]).any()):
            raise CorruptionError(f"{what} is damaged (chunk runs)")
        return cls(info, starts, counts, ids)

    @classmethod
    def from_dense(cls, info: dict[str, Any], dense: np.ndarray) -> "Manifest":
        """From one ID per chunk of the volume (all-zero rows: zeros), as format 1 held."""
        present = dense.any(axis=1)
        starts, counts = runs_of(present)
        return cls(info, starts, counts, np.ascontiguousarray(dense[present]))

    def to_dense(self) -> np.ndarray:
        """One ID per chunk of the volume (tests compare with it; never on a large volume)."""
        out = np.zeros((self.info["chunks"], ID_BYTES), np.uint8)
        out[self.chunk_numbers()] = self.ids
        return out


def runs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, counts) as uint64 of the runs of True in a boolean mask."""
    m = np.concatenate(([False], mask.astype(bool), [False])).astype(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    return starts.astype(np.uint64), (np.flatnonzero(d == -1) - starts).astype(np.uint64)


def expand_runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every index the runs cover, in order (int64)."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if not total:
        return np.empty(0, np.int64)
    # each position: its run's start + its offset within the run
    run_of = np.repeat(np.arange(len(counts)), counts)
    first_pos = np.cumsum(counts) - counts
    return starts.astype(np.int64)[run_of] + (np.arange(total) - first_pos[run_of])


Piece = tuple[int, int, "np.ndarray | None"]   # (first chunk, count, IDs or None for zeros)


def overlay(base: Manifest | None, chunks: int, changes: list[Piece]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of `base` (cut to `chunks`) with the changed ranges replaced: each
    change is new IDs, or None for zeros. Changes must not overlap one another.
    Costs the runs and the changes, never the volume's size."""
    changes = sorted(changes, key=lambda p: p[0])
    pieces: list[tuple[int, np.ndarray]] = [(s, ids) for s, _, ids in changes if ids is not None]
    if base is not None and len(base.starts):
        cut = [(s, s + c) for s, c, _ in changes]
        ci = 0
        off = 0
        for s, c in zip(base.starts.tolist(), base.counts.tolist()):
            run_ids = base.ids[off:off + c]
            off += c
            lo, hi = s, min(s + c, chunks)
            while ci < len(cut) and cut[ci][1] <= lo:
                ci += 1
            j = ci
            while lo < hi:
                if j >= len(cut) or cut[j][0] >= hi:
                    pieces.append((lo, run_ids[lo - s:hi - s]))
                    break
                a, b = cut[j]
                if a > lo:
                    pieces.append((lo, run_ids[lo - s:a - s]))
                lo = max(lo, b)
                j += 1
    pieces.sort(key=lambda p: p[0])
    starts: list[int] = []
    counts: list[int] = []
    for s, ids in pieces:
        n = len(ids)
        if not n:
            continue
        if starts and starts[-1] + counts[-1] == s:
            counts[-1] += n
        else:
            starts.append(s)
            counts.append(n)
    ids = (np.concatenate([p[1] for p in pieces]) if pieces else np.empty((0, ID_BYTES), np.uint8))
    return np.array(starts, np.uint64), np.array(counts, np.uint64), np.ascontiguousarray(ids, np.uint8)


def new_backup_id(now: float | None = None) -> str:
    """Sortable by time, unique without coordination: 20261126T054200Z-3fa9c1."""
    t = time.gmtime(now if now is not None else time.time())
    return time.strftime("%Y%m%dT%H%M%SZ", t) + "-" + os.urandom(3).hex()


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)
