"""Which chunks a repository holds, and where: sorted numpy arrays, not a dict.

A dict of 16-byte IDs to (pack, offset, length) tuples costs about 215 bytes a
chunk in Python objects (measured), 3.6 GB for a TiB of 64 KiB blocks. Here an entry is 32
bytes (the ID, a pack number, an offset, a length), lookups are binary searches
(`np.searchsorted`, one call for a whole manifest), and a chunk stored in several
packs resolves to the lowest pack number: the first pack in name order, as
`load_index` numbers them (whichever index objects name them).

Chunks added after the build (the packs this process writes) go into a small
dict beside the arrays, merged into them whenever it grows past a quarter of
their size (at least MERGE_AT entries), so a first backup of a large volume
does not hold all its chunks in Python objects either.
"""
from __future__ import annotations

import threading

import numpy as np

from .crypto import ID_BYTES

KEY = np.dtype(f"V{ID_BYTES}")   # an ID as one opaque value: sorts and compares bytewise
MERGE_AT = 1 << 16               # added chunks kept in a dict before a merge, at least


def keys_of(ids: np.ndarray) -> np.ndarray:
    """(n, ID_BYTES) uint8 rows as n sortable keys."""
    return np.ascontiguousarray(ids, np.uint8).reshape(-1, ID_BYTES).view(KEY).ravel()


def _find(keys: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `keys` is in `sorted_keys` (sorted, unique), and whether it is."""
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return at, sorted_keys[at] == keys


def member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of `keys` found in `sorted_keys` (sorted, unique)."""
    return _find(keys, sorted_keys)[1]


class ChunkIndex:
    def __init__(self) -> None:
        self.packs: list[str] = []                 # pack number -> name
        # sorted unique keys, pack numbers, offsets, lengths: replaced whole by a
        # merge, so a reader that took the tuple once sees one consistent state
        self._arrays = (np.empty(0, KEY), np.empty(0, np.uint32), np.empty(0, np.uint64), np.empty(0, np.uint32))
        self._new: dict[bytes, tuple[int, int, int]] = {}   # added since the last merge
        self._lock = threading.Lock()

    @classmethod
    def build(cls, parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> "ChunkIndex":
        """From each pack's index (name, ids, offsets, lengths), in name order."""
        ix = cls()
        ix.packs = [p for p, *_ in parts]
        if parts:
            ix._arrays = _sorted_unique(
                np.concatenate([keys_of(ids) for _, ids, _, _ in parts]),
                np.concatenate([np.full(len(o), i, np.uint32) for i, (_, _, o, _) in enumerate(parts)]),
                np.concatenate([o for _, _, o, _ in parts]).astype(np.uint64),
                np.concatenate([n for _, _, _, n in parts]).astype(np.uint32))
        return ix

    @classmethod
    def from_arrays(cls, packs: list[str], ids: list[np.ndarray], pack_no: np.ndarray, offs: list[np.ndarray],
                    lens: list[np.ndarray]) -> "ChunkIndex":
        """From every entry at once, in any order (index objects naming many packs):
        pieces of (n, ID_BYTES) ids, offsets and lengths, and each entry's number
        in `packs`. The pieces are joined in the call, so that the unsorted copy
        is freed as soon as it is sorted, as in `build`."""
        ix = cls()
        ix.packs = list(packs)
        if len(pack_no):
            ix._arrays = _sorted_unique(keys_of(np.concatenate(ids)), pack_no.astype(np.uint32, copy=False),
                                        np.concatenate(offs).astype(np.uint64, copy=False),
                                        np.concatenate(lens).astype(np.uint32, copy=False))
        return ix

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    def __len__(self) -> int:
        return len(self._arrays[0]) + len(self._new)

    def __contains__(self, cid: bytes) -> bool:
        return self.get(cid) is not None

    def get(self, cid: bytes) -> tuple[str, int, int] | None:
        """(pack, offset, length) of one chunk, or None."""
        no, off, ln = (int(a[0]) for a in self.lookup(np.frombuffer(cid, np.uint8)))
        return None if no < 0 else (self.packs[no], off, ln)

    def add(self, pack: str, cids: list[bytes], offs: list[int], lens: list[int]) -> None:
        """A pack this process wrote; chunks already indexed keep their place."""
        with self._lock:
            self.packs.append(pack)
            no = len(self.packs) - 1
            known = self.lookup(np.frombuffer(b"".join(cids), np.uint8))[0] >= 0
            for cid, off, ln, k in zip(cids, offs, lens, known.tolist()):
                if not k:
                    self._new.setdefault(cid, (no, off, ln))
            if len(self._new) >= max(MERGE_AT, len(self._arrays[0]) // 4):
                self._merge()

    def _merge(self) -> None:
        """Fold the added chunks into the arrays (under the lock)."""
        keys, pack_no, offs, lens = self._arrays
        added = self._new
        vals = np.array(list(added.values()), np.uint64).reshape(-1, 3)
        self._arrays = _sorted_unique(
            np.concatenate([keys, np.frombuffer(b"".join(added), KEY)]),
            np.concatenate([pack_no, vals[:, 0].astype(np.uint32)]),
            np.concatenate([offs, vals[:, 1]]),
            np.concatenate([lens, vals[:, 2].astype(np.uint32)]))
        self._new = {}                   # (after the arrays: readers take the dict first)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack numbers (-1: not stored), offsets and lengths of (n, ID_BYTES) ids."""
        new = self._new
        skeys, spack, soffs, slens = self._arrays
        keys = keys_of(ids)
        pack_no = np.full(len(keys), -1, np.int64)
        offs = np.zeros(len(keys), np.uint64)
        lens = np.zeros(len(keys), np.uint32)
        at, hit = _find(keys, skeys)
        pack_no[hit] = spack[at[hit]]
        offs[hit], lens[hit] = soffs[at[hit]], slens[at[hit]]
        if new:
            for i in np.flatnonzero(pack_no < 0).tolist():
                got = new.get(keys[i].tobytes())
                if got is not None:
                    pack_no[i], offs[i], lens[i] = got
        return pack_no, offs, lens


def _sorted_unique(keys, pack_no, offs, lens) -> tuple[np.ndarray, ...]:
    """Sorted by key; of equal keys, the one of the lowest pack number is kept
    (then the first given: the sorts are stable)."""
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    if not first.all():     # chunks in several packs: only their runs of equal keys are reordered
        dup = ~first
        dup[:-1] |= ~first[1:]
        at = np.flatnonzero(dup)
        order[at] = order[at[np.lexsort((pack_no[order[at]], np.cumsum(first[at])))]]
    take = order[first]
    return keys[first], pack_no[take], offs[take], lens[take]


def missing_chunks(index: ChunkIndex, ids: np.ndarray) -> int:
    """How many distinct chunks of a manifest's ids (zero rows: holes) are not stored."""
    named = ids[ids.any(axis=1)]
    gone = named[index.lookup(named)[0] < 0]
    return len(np.unique(keys_of(gone))) if len(gone) else 0
