"""`backup copy`: backups from one repository into another, for the 3-2-1 rule.

Each repository has its own master key, so its own chunk IDs (keyed BLAKE2b):
a chunk is downloaded from the source, authenticated and checked there, hashed
again with the destination's ID key, and sealed anew for the destination. Only
chunks the destination's indexes lack are uploaded; the manifest is the
source's with its IDs translated, and keeps the backup's identity (ID, volume,
snapshot and its creation time, host, pool, time, mode), so both repositories
list one recovery point.

Which source ID is which destination ID is remembered in the destination, so a
later copy (the next day's incremental, or a run after a kill) does not
download again what is already there:

    copies/<source repository id>/<32 hex>   sealed: u32 magic "bscm", u32 version,
                                             u32 N, N source IDs, N destination IDs

An entry is a fact about content (both IDs are keyed hashes of the same bytes),
true for ever; it is used only when the destination's index still holds the
chunk, so a prune of the destination never makes it wrong. One map object is
written after each pack is durable, and a copy that finds more than MAP_MAX of
them folds them into one (written before the old ones are deleted).

Order of writes at the destination, as for a backup: packs, their indexes, map
objects, then the manifest, under a shared lock on both sides (a prune on
either side waits). Killed at any point, a copy leaves no manifest naming a
missing chunk, and run again it skips the backups already copied and sends
only the chunks not yet indexed.
"""
from __future__ import annotations

import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..errors import BlocksnapError, CorruptionError, InvalidArgument
from .chunk_index import KEY, keys_of, missing_chunks
from .chunker import Chunker
from .crypto import ID_BYTES
from .manifest import Manifest
from .repo import Repository
from .restore import fetch_spans

Progress = Callable[[int, int], None] | None
PREFIX = "copies"
MAP_MAX = 64           # map objects of one source before a copy folds them into one
FETCHERS = 4           # source packs fetched and opened at once
_HEAD = struct.Struct("<4sII")
_MAGIC, _VERSION = b"bscm", 1


def same_repository(src: Repository, dst: Repository) -> bool:
    return src.config.get("id") == dst.config.get("id") or src.url.rstrip("/") == dst.url.rstrip("/")


class IdMap:
    """Source chunk ID -> destination chunk ID: sorted arrays, and what this run added."""

    def __init__(self, dst: Repository, source_id: str):
        self.dst, self.prefix = dst, f"{PREFIX}/{source_id}"
        self.objects: list[str] = []
        self.keys = np.empty(0, KEY)                       # sorted source keys
        self.values = np.empty((0, ID_BYTES), np.uint8)    # destination IDs, in the same order

    def load(self) -> "IdMap":
        """Every map object of this source. One damaged or gone meanwhile is skipped:
        the map only saves downloads, the destination's index decides what is stored."""
        names = sorted(self.dst.backend.list(self.prefix))
        srcs, dsts = [], []
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="copymap") as pool:
            for name, got in zip(names, pool.map(self._read, names)):
                if got is not None:
                    self.objects.append(name)
                    srcs.append(got[0])
                    dsts.append(got[1])
        if srcs:
            self._set(np.concatenate(srcs), np.concatenate(dsts))
        return self

    def _read(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            raw = self.dst.keys.open(self.dst.backend.get(key), key.encode(), f"{self.dst.url}: {key}")
            magic, version, n = _HEAD.unpack_from(raw)
            if magic != _MAGIC or version != _VERSION or len(raw) != _HEAD.size + 2 * n * ID_BYTES:
                return None
            ids = np.frombuffer(raw, np.uint8, 2 * n * ID_BYTES, _HEAD.size).reshape(2, n, ID_BYTES)
            return ids[0], ids[1]
        except (BlocksnapError, struct.error, ValueError):
            return None

    def _set(self, src: np.ndarray, dst: np.ndarray) -> None:
        k = keys_of(src)
        k, first = np.unique(k, return_index=True)
        self.keys, self.values = k, np.ascontiguousarray(dst[first])

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(destination IDs, known mask) of source keys."""
        out = np.zeros((len(keys), ID_BYTES), np.uint8)
        if not len(self.keys) or not len(keys):
            return out, np.zeros(len(keys), bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[at] == keys
        out[hit] = self.values[at[hit]]
        return out, hit

    def add(self, src: np.ndarray, dst: np.ndarray) -> None:
        self._set(np.concatenate([self.keys.view(np.uint8).reshape(-1, ID_BYTES), src]),
                  np.concatenate([self.values, dst]))

    def write(self, src: np.ndarray, dst: np.ndarray) -> str:
        """One map object for these pairs (written after their chunks are durable)."""
        key = f"{self.prefix}/{os.urandom(16).hex()}"
        body = _HEAD.pack(_MAGIC, _VERSION, len(src)) + np.ascontiguousarray(src, np.uint8).tobytes() \
            + np.ascontiguousarray(dst, np.uint8).tobytes()
        self.dst.backend.put(key, self.dst.keys.seal(body, key.encode()))
        return key

    def fold(self) -> None:
        """More than MAP_MAX objects: one object with the pairs whose chunk the
        destination still holds, written before the objects it replaces go."""
        if len(self.objects) <= MAP_MAX:
            return
        dst_ids = self.values
        live = self.dst.index.lookup(dst_ids)[0] >= 0 if len(dst_ids) else np.zeros(0, bool)
        self.write(self.keys.view(np.uint8).reshape(-1, ID_BYTES)[live], dst_ids[live])
        for key in self.objects:
            self.dst.backend.delete(key)
        self.objects = []


def select(src: Repository, ids: list[str] | None, have: set[str]) -> tuple[list[Manifest], list[str]]:
    """(the backups named to copy, oldest first, so that a base is copied before the
    backups made on it; the IDs among them already in `have`, in ID order). `ids` are IDs or
    unique prefixes (None: all); an unknown one fails before anything is copied.
    Only the manifests to copy are read (the agent names every backup of a volume
    each time)."""
    listed = src.backup_ids()
    named = listed if ids is None else list(dict.fromkeys(src.resolve(i, listed) for i in ids))
    todo = sorted((src.read_manifest(i) for i in named if i not in have), key=lambda m: (m.info["time"], m.id))
    return todo, sorted(i for i in named if i in have)


def copy_backups(src: Repository, dst: Repository, ids: list[str] | None,
                 progress: Progress = None) -> dict[str, Any]:
    """Copy the backups `ids` (None: every backup) from `src` into `dst`. Backups
    already in `dst` (same ID) are skipped. Returns the IDs copied and skipped and
    what it cost: chunks and bytes fetched from the source, sent to the destination
    (sealed bytes of new chunks), and found already there."""
    if same_repository(src, dst):
        raise InvalidArgument(f"--from and --to are the same repository ({src.url}, id {src.config.get('id')})")
    with src.lock("copy-from"), dst.lock("copy-to"):   # a prune on either side would pull chunks away
        have = set(dst.backup_ids())
        todo, skipped = select(src, ids, have)
        stats: dict[str, Any] = {"from": src.url, "to": dst.url, "copied": [], "skipped": skipped,
                                 "chunks_fetched": 0, "bytes_fetched": 0, "chunks_sent": 0, "bytes_sent": 0,
                                 "chunks_present": 0, "packs_written": 0}
        if not todo:
            return stats
        src.load_index()
        dst.load_index()
        idmap = IdMap(dst, src.config["id"]).load()
        total = [0, 0]     # progress over all backups: bytes fetched so far, bytes to fetch (grows)
        for m in todo:
            dst_ids = _transfer(src, dst, m, idmap, stats, progress, total)
            lost = missing_chunks(dst.index, dst_ids)
            if lost:      # never a manifest naming what is not stored (a prune under us)
                raise CorruptionError(f"{dst.url}: {lost} chunks of backup {m.id} are not stored there; "
                                      f"nothing of it was copied")
            info = dict(m.info, copy={"from": src.url, "from_repository": src.config.get("id"),
                                      "time": time.time(), "base": m.info.get("base")})
            if info.get("base") not in have:   # the base is not there: this copy stands alone
                info["base"] = None
            dst.write_manifest(Manifest(info, m.starts, m.counts, dst_ids))
            have.add(m.id)
            stats["copied"].append(m.id)
        idmap.fold()
        return stats


def _transfer(src: Repository, dst: Repository, m: Manifest, idmap: IdMap, stats: dict, progress: Progress,
              total: list[int]) -> np.ndarray:
    """Make every chunk of `m` present in `dst`; return its IDs there (row for row)."""
    keys = keys_of(m.ids)
    uniq, inverse = np.unique(keys, return_inverse=True)
    mapped, known = idmap.lookup(uniq)
    present = known.copy()
    if known.any():
        present[known] = dst.index.lookup(mapped[known])[0] >= 0
    stats["chunks_present"] += int(present.sum())
    need = uniq[~present].view(np.uint8).reshape(-1, ID_BYTES)
    if len(need):
        src_ids, dst_got = _send(src, dst, m, need, stats, progress, total, idmap)
        idmap.add(src_ids, dst_got)
        mapped, known = idmap.lookup(uniq)
    if not known.all():
        raise CorruptionError(f"{dst.url}: copying backup {m.id}: {int((~known).sum())} chunks went missing")
    return np.ascontiguousarray(mapped[inverse.ravel()])


def _send(src: Repository, dst: Repository, m: Manifest, need: np.ndarray, stats: dict, progress: Progress,
          total: list[int], idmap: IdMap) -> tuple[np.ndarray, np.ndarray]:
    """Fetch the chunks `need` from the source, pack them for the destination (it skips
    those its index holds): (source IDs, destination IDs), in the same order."""
    pack_no, offs, lens = src.index.lookup(need)
    if (pack_no < 0).any():
        raise CorruptionError(f"{src.url}: backup {m.id}: {int((pack_no < 0).sum())} of its chunks are not in "
                              f"the repository (run `blocksnap verify --repo {src.url}`)")
    total[1] += int(lens.sum())
    by_pack: dict[int, list[tuple[bytes, int, int, None]]] = {}
    for i, (p, o, n) in enumerate(zip(pack_no.tolist(), offs.tolist(), lens.tolist())):
        by_pack.setdefault(p, []).append((need[i].tobytes(), o, n, None))
    order: list[bytes] = []          # source IDs in the order they went into the chunker
    mapped_upto = [0]
    chunker = Chunker(dst, int(m.info["chunk_size"]))

    def durable(npieces: int, _position: int) -> None:
        """Chunks up to `npieces` are stored at the destination: remember their IDs there."""
        a, b = mapped_upto[0], npieces
        if b > a:
            idmap.objects.append(idmap.write(_rows(order[a:b]), _dst_rows(chunker, a, b)))
            mapped_upto[0] = b

    chunker.on_durable = durable

    def fetch(pack: int) -> tuple[list[tuple[bytes, bytes]], int]:
        name = src.index.packs[pack]
        out, got = [], 0
        for start, end, items in fetch_spans(by_pack[pack]):
            blob = memoryview(src.backend.get_range(f"data/{name}", start, end - start))
            got += len(blob)
            for cid, off, ln, _ in items:
                out.append((cid, src.open_chunk(cid, blob[off - start:off - start + ln],
                                                f"{src.url}: chunk {cid.hex()} in pack {name}")))
        return out, got

    try:
        with ThreadPoolExecutor(max_workers=FETCHERS, thread_name_prefix="copy-fetch") as pool:
            packs = sorted(by_pack)
            window: list[Future] = []
            for i in range(len(packs) + FETCHERS):
                if i < len(packs):
                    window.append(pool.submit(fetch, packs[i]))
                if len(window) > FETCHERS or (i >= len(packs) and window):
                    chunks, got = window.pop(0).result()
                    for cid, data in chunks:
                        chunker.add(len(order), data)
                        order.append(cid)
                    stats["chunks_fetched"] += len(chunks)
                    stats["bytes_fetched"] += got
                    total[0] += got
                    if progress:
                        progress(min(total[0], total[1]), total[1])
            chunker.finish()
        durable(len(chunker.pieces), 0)
    finally:
        chunker.close()
    stats["chunks_sent"] += chunker.stats["new_chunks"]
    stats["bytes_sent"] += chunker.stats["new_bytes"]
    stats["packs_written"] += chunker.stats["packs"]
    return _rows(order), _dst_rows(chunker, 0, len(order))


def _rows(ids: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(ids), np.uint8).reshape(-1, ID_BYTES)


def _dst_rows(chunker: Chunker, a: int, b: int) -> np.ndarray:
    """The destination IDs of pieces a..b (one chunk each)."""
    parts = [ids for _, ids in chunker.pieces[a:b]]
    return np.concatenate(parts) if parts else np.empty((0, ID_BYTES), np.uint8)
