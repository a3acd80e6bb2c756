"""Which chunks a repository holds, and where: sorted numpy arrays, not a dict.

A dict of 16-byte IDs to (pack, offset, length) tuples costs about 150 bytes a
chunk in Python objects, 2.4 GB for a TiB of 64 KiB blocks. Here an entry is 32
bytes (the ID, a pack number, an offset, a length), lookups are binary searches
(`np.searchsorted`, one call for a whole manifest), and a chunk stored in several
packs resolves to the first pack in name order, as `load_index` reads them.

Chunks added after the build (the packs this process writes) go into a small
dict beside the arrays: a backup adds only its new chunks.
"""
from __future__ import annotations

import threading

import numpy as np

from .crypto import ID_BYTES

KEY = np.dtype(f"V{ID_BYTES}")   # an ID as one opaque value: sorts and compares bytewise


def keys_of(ids: np.ndarray) -> np.ndarray:
    """(n, ID_BYTES) uint8 rows as n sortable keys."""
    return np.ascontiguousarray(ids, np.uint8).reshape(-1, ID_BYTES).view(KEY).ravel()


def member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of `keys` found in `sorted_keys` (sorted, unique)."""
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


class ChunkIndex:
    def __init__(self) -> None:
        self.packs: list[str] = []                 # pack number -> name
        self.keys = np.empty(0, KEY)               # sorted, unique
        self.pack_no = np.empty(0, np.uint32)
        self.offs = np.empty(0, np.uint64)
        self.lens = np.empty(0, np.uint32)
        self._new: dict[bytes, tuple[int, int, int]] = {}   # added since the build
        self._lock = threading.Lock()

    @classmethod
    def build(cls, parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> "ChunkIndex":
        """From each pack's index (name, ids, offsets, lengths), in name order."""
        ix = cls()
        ix.packs = [p for p, *_ in parts]
        if not parts:
            return ix
        keys = np.concatenate([keys_of(ids) for _, ids, _, _ in parts])
        pack_no = np.concatenate([np.full(len(o), i, np.uint32) for i, (_, _, o, _) in enumerate(parts)])
        offs = np.concatenate([o for _, _, o, _ in parts]).astype(np.uint64)
        lens = np.concatenate([n for _, _, _, n in parts]).astype(np.uint32)
        order = np.argsort(keys, kind="stable")    # stable: the first pack comes first
        keys = keys[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        take = order[first]
        ix.keys, ix.pack_no, ix.offs, ix.lens = keys[first], pack_no[take], offs[take], lens[take]
        return ix

    def __len__(self) -> int:
        return len(self.keys) + len(self._new)

    def __contains__(self, cid: bytes) -> bool:
        return self.get(cid) is not None

    def get(self, cid: bytes) -> tuple[str, int, int] | None:
        """(pack, offset, length) of one chunk, or None."""
        if len(self.keys):
            key = np.frombuffer(cid, KEY)
            i = int(np.searchsorted(self.keys, key)[0])
            if i < len(self.keys) and self.keys[i] == key[0]:
                return self.packs[int(self.pack_no[i])], int(self.offs[i]), int(self.lens[i])
        hit = self._new.get(cid)
        return None if hit is None else (self.packs[hit[0]], hit[1], hit[2])

    def add(self, pack: str, cids: list[bytes], offs: list[int], lens: list[int]) -> None:
        """A pack this process wrote; chunks already indexed keep their place."""
        with self._lock:
            self.packs.append(pack)
            no = len(self.packs) - 1
            for cid, off, ln in zip(cids, offs, lens):
                if cid not in self:
                    self._new[cid] = (no, off, ln)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack numbers (-1: not stored), offsets and lengths of (n, ID_BYTES) ids."""
        keys = keys_of(ids)
        pack_no = np.full(len(keys), -1, np.int64)
        offs = np.zeros(len(keys), np.uint64)
        lens = np.zeros(len(keys), np.uint32)
        if len(self.keys) and len(keys):
            at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = self.keys[at] == keys
            pack_no[hit] = self.pack_no[at[hit]]
            offs[hit], lens[hit] = self.offs[at[hit]], self.lens[at[hit]]
        if self._new:
            for i in np.flatnonzero(pack_no < 0).tolist():
                got = self._new.get(keys[i].tobytes())
                if got is not None:
                    pack_no[i], offs[i], lens[i] = got
        return pack_no, offs, lens


def missing_chunks(index: ChunkIndex, ids: np.ndarray) -> int:
    """How many distinct chunks of a manifest's ids (zero rows: holes) are not stored."""
    named = ids[ids.any(axis=1)]
    gone = named[index.lookup(named)[0] < 0]
    return len(np.unique(keys_of(gone))) if len(gone) else 0
