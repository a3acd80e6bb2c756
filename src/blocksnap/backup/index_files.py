"""Index objects: which chunks the packs hold, one pack per object or many.

    index/<pack>               a pack's own index ("loose"), written right after the pack
    index/-merged-<32 hex>     a merged index: the indexes of many packs in one object

A command starts by reading every index object. With one object per pack, a
repository of 20,000 packs costs 20,000 GETs (on S3, round trips). So a backup
that finds more than LOOSE_MAX loose indexes merges them, with the merged
indexes under MERGED_CHUNKS / 2 chunks, into merged ones of at most
MERGED_CHUNKS chunks, and prune does the same while it rewrites the index
objects that name packs it deletes. A start then reads a few merged objects and
at most about LOOSE_MAX loose ones.

Crash safety, in the repository's order (a pack, then an index naming it, then
a manifest naming its chunks):

* a merged object is written (whole, durable) before any object it replaces is
  deleted, so at every instant every pack that had an index still has one; in
  between, a pack is named by two objects, which readers accept (they describe
  the same pack, and the first in name order is used);
* prune writes the merged objects that leave out the packs it deletes, deletes
  every object that names such a pack, and only then deletes the packs: no index
  ever names a pack that is gone;
* a reader whose listed object vanishes (a backup merged it meanwhile; backups,
  restores and verify share the lock) lists again: the merged object that
  replaced it was written before the delete, so it is in the new listing.

Merged layout before sealing (sealed like every object, with its name
`index/-merged-<hex>` as associated data), little-endian:

    magic b"bsmi", u32 version (1), u32 packs P, u32 chunks N,
    P pack names (16 bytes each, the 32 hex digits as bytes), P u32 chunk counts,
    N chunk IDs (16 bytes each), N u64 offsets, N u32 lengths, pack by pack

A loose index is u32 N, N IDs, N u64 offsets, N u32 lengths. The name starts
with "-" so that it sorts before every pack name, and its first four bytes,
read as a loose index's count, need gigabytes: a blocksnap from before merged
indexes fails on it ("damaged") before a prune deletes anything, instead of
misreading it or deleting a pack only a merged index names.
"""
from __future__ import annotations

import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from ..errors import BlocksnapError, CorruptionError, NotFound
from .chunk_index import ChunkIndex
from .crypto import ID_BYTES

if TYPE_CHECKING:
    from .repo import Repository

MERGED = "-merged-"          # a merged index's name: MERGED + 32 hex digits
LOOSE_MAX = 64               # a backup merges the loose indexes when it finds more
OWN_MAX = 8                  # a backup that wrote more packs merges their indexes at its end
MERGED_CHUNKS = 1 << 20      # chunks in one merged index at most (28 MiB before sealing)
READERS = 8                  # index objects fetched at once
_MAGIC, _VERSION = b"bsmi", 1
_HEAD = struct.Struct("<4sIII")
_N = struct.Struct("<I")
_PACK = re.compile(r"[0-9a-f]{32}")

Part = tuple[str, np.ndarray, np.ndarray, np.ndarray]   # pack, ids, offsets, lengths


def is_merged(name: str) -> bool:
    return name.startswith(MERGED)


def mergeable(pack: str) -> bool:
    """Packs this blocksnap names (32 hex digits) fit a merged index."""
    return _PACK.fullmatch(pack) is not None


@dataclass
class IndexObject:
    name: str                  # the key without "index/"
    packs: list[str]           # the packs it names, in order
    counts: np.ndarray         # int64: chunks of each pack
    ids: np.ndarray            # (n, ID_BYTES) uint8, pack by pack
    offs: np.ndarray           # uint64
    lens: np.ndarray           # uint32

    @property
    def key(self) -> str:
        return f"index/{self.name}"

    @property
    def merged(self) -> bool:
        return is_merged(self.name)

    def __len__(self) -> int:
        return len(self.lens)

    def parts(self) -> Iterator[Part]:
        if len(self.packs) == 1:
            yield self.packs[0], self.ids, self.offs, self.lens
            return
        ends = np.cumsum(self.counts)
        for pack, a, b in zip(self.packs, (ends - self.counts).tolist(), ends.tolist()):
            yield pack, self.ids[a:b], self.offs[a:b], self.lens[a:b]


def encode_loose(ids: bytes, offs: np.ndarray, lens: np.ndarray) -> bytes:
    return _N.pack(len(lens)) + ids + offs.astype("<u8").tobytes() + lens.astype("<u4").tobytes()


def decode_loose(raw: bytes, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        (n,) = _N.unpack_from(raw)
        ids = np.frombuffer(raw, np.uint8, n * ID_BYTES, 4).reshape(n, ID_BYTES)
        offs = np.frombuffer(raw, "<u8", n, 4 + n * ID_BYTES).astype(np.uint64, copy=False)
        lens = np.frombuffer(raw, "<u4", n, 4 + n * (ID_BYTES + 8)).astype(np.uint32, copy=False)
    except (struct.error, ValueError):
        raise CorruptionError(f"{what} is damaged") from None
    return ids, offs, lens


def encode_merged(parts: list[Part]) -> bytes:
    counts = np.array([len(p[3]) for p in parts], "<u4")
    return b"".join([_HEAD.pack(_MAGIC, _VERSION, len(parts), int(counts.sum())),
                     b"".join(bytes.fromhex(p[0]) for p in parts), counts.tobytes(),
                     *(np.ascontiguousarray(p[1], np.uint8).tobytes() for p in parts),
                     *(p[2].astype("<u8").tobytes() for p in parts),
                     *(p[3].astype("<u4").tobytes() for p in parts)])


def decode_merged(name: str, raw: bytes, what: str) -> IndexObject:
    try:
        magic, version, p, n = _HEAD.unpack_from(raw)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError
        at = _HEAD.size
        names = np.frombuffer(raw, np.uint8, p * 16, at).reshape(p, 16)
        at += p * 16
        counts = np.frombuffer(raw, "<u4", p, at).astype(np.int64)
        at += p * 4
        ids = np.frombuffer(raw, np.uint8, n * ID_BYTES, at).reshape(n, ID_BYTES)
        at += n * ID_BYTES
        offs = np.frombuffer(raw, "<u8", n, at).astype(np.uint64, copy=False)
        lens = np.frombuffer(raw, "<u4", n, at + n * 8).astype(np.uint32, copy=False)
        if at + n * 12 != len(raw) or int(counts.sum()) != n:
            raise ValueError
    except (struct.error, ValueError):
        raise CorruptionError(f"{what} is damaged") from None
    return IndexObject(name, [bytes(r).hex() for r in names], counts, ids, offs, lens)


def read_object(repo: Repository, name: str) -> IndexObject:
    key = f"index/{name}"
    what = f"{repo.url}: {'merged index ' + name if is_merged(name) else 'index of pack ' + name}"
    raw = repo.keys.open(repo.backend.get(key), key.encode(), what)
    if is_merged(name):
        return decode_merged(name, raw, what)
    ids, offs, lens = decode_loose(raw, what)
    return IndexObject(name, [name], np.array([len(lens)], np.int64), ids, offs, lens)


def read_all(repo: Repository, problems: list[str] | None = None) -> list[IndexObject]:
    """Every index object, in name order. A damaged one raises, or with `problems`
    is reported there and left out. One that vanishes between the listing and its
    GET was merged by a backup meanwhile: the listing is taken again, and the
    objects not read yet are read, until none vanished (names are never used
    twice, so one that vanished is not asked for again)."""
    done: dict[str, IndexObject] = {}
    bad: set[str] = set()
    gone: set[str] = set()

    def some(names: list[str]) -> list[IndexObject | BaseException]:
        out: list[IndexObject | BaseException] = []
        for name in names:
            try:
                out.append(read_object(repo, name))
            except BlocksnapError as e:     # NotFound among them: merged meanwhile
                out.append(e)
        return out

    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="index") as pool:
        while True:
            todo = [k.split("/", 1)[1] for k in sorted(repo.backend.list("index"))]
            todo = [n for n in todo if n not in done and n not in bad and n not in gone]
            vanished = False
            results = (got for batch in pool.map(some, batches(todo, READERS)) for got in batch)
            for name, got in zip(todo, results):
                if isinstance(got, NotFound):
                    vanished = True
                    gone.add(name)
                elif isinstance(got, BaseException):
                    if problems is None:
                        raise got
                    problems.append(str(got))
                    bad.add(name)
                else:
                    done[name] = got
            if not vanished:
                return [done[n] for n in sorted(done)]


def batches(items: list, workers: int) -> list[list]:
    """`items` in runs for `workers` threads: a few runs each (so a slow one does
    not hold up the rest), not one task per item (20,000 futures cost more than
    the local reads they wait for)."""
    n = max(1, min(256, -(-len(items) // (workers * 4))))
    return [items[i:i + n] for i in range(0, len(items), n)]


def chunk_index(objects: list[IndexObject]) -> ChunkIndex:
    """The chunk index of these objects. A pack named twice counts once, and a
    chunk stored in several packs resolves to the first pack in name order."""
    names = sorted({p for o in objects for p in o.packs})
    number = {p: i for i, p in enumerate(names)}
    live = [o for o in objects if len(o)]
    if not live:
        return ChunkIndex.from_arrays(names, [], np.empty(0, np.uint32), [], [])
    pack_no = np.repeat(np.fromiter((number[p] for o in live for p in o.packs), np.uint32),
                        np.concatenate([o.counts for o in live]))
    return ChunkIndex.from_arrays(names, [o.ids for o in live], pack_no, [o.offs for o in live],
                                  [o.lens for o in live])


def pack_contents(objects: list[IndexObject]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each pack's (ids, offsets, lengths), from the first object in name order naming it."""
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for o in objects:
        for pack, ids, offs, lens in o.parts():
            out.setdefault(pack, (ids, offs, lens))
    return out


def small(o: IndexObject) -> bool:
    """Worth merging again: a loose index, or a merged one under half the limit."""
    return (o.merged and len(o) < MERGED_CHUNKS // 2) or (not o.merged and mergeable(o.name))


def to_merge(objects: list[IndexObject]) -> set[str]:
    """What a backup merges: nothing while there are LOOSE_MAX loose indexes or
    fewer, else the loose ones and the small merged ones."""
    if sum(1 for o in objects if not o.merged and mergeable(o.name)) <= LOOSE_MAX:
        return set()
    return {o.name for o in objects if small(o)}


def write_merged(repo: Repository, parts: Iterable[Part]) -> list[str]:
    """Merged objects holding these packs' indexes, whole packs of at most
    MERGED_CHUNKS chunks each (a larger pack gets an object of its own): their
    names. One object's plaintext and sealed copy are held at a time."""
    out: list[str] = []
    batch: list[Part] = []
    n = 0

    def flush() -> None:
        name = MERGED + os.urandom(16).hex()
        plain = encode_merged(batch)
        repo.backend.put(f"index/{name}", repo.keys.seal(plain, f"index/{name}".encode()))
        out.append(name)

    for part in parts:
        if not mergeable(part[0]):
            raise ValueError(f"pack name {part[0]!r} does not fit a merged index")
        if batch and n + len(part[3]) > MERGED_CHUNKS:
            flush()
            batch, n = [], 0
        batch.append(part)
        n += len(part[3])
    if batch:
        flush()
    return out


def merge(repo: Repository, objects: list[IndexObject], replace: set[str], drop: set[str] = frozenset(),
          extra: Iterable[Part] = ()) -> list[str]:
    """Write merged objects with the packs of the `replace` objects, less the packs
    in `drop` and those the kept objects name, and with `extra`; then delete the
    replaced objects. Returns the new objects' names. Without `drop` and `extra`,
    the objects there are now name the same packs as `objects` did."""
    kept = [o for o in objects if o.name not in replace]
    covered = {p for o in kept for p in o.packs}
    parts: dict[str, Part] = {}
    for o in objects:
        if o.name in replace:
            for part in o.parts():
                if part[0] not in drop and part[0] not in covered:
                    parts.setdefault(part[0], part)
    for part in extra:
        parts[part[0]] = part
    new = write_merged(repo, (parts[p] for p in sorted(parts)))
    gone = [o.key for o in objects if o.name in replace]
    repo.backend.delete_many(gone)      # only after every merged object is stored (S3: 1,000 a request)
    return new


def merge_own(repo: Repository, parts: list[Part]) -> list[str]:
    """The loose indexes of the packs one backup wrote, merged at its end when there
    are more than OWN_MAX: the next command reads one object instead of one per pack
    (a first backup of 1 GiB writes 64; on S3 each is a GET, 0.3 s of every later
    command on moto). The same order as `merge`: the merged object is stored before
    the loose ones are deleted. Returns the new objects' names."""
    if len(parts) <= OWN_MAX:
        return []
    new = write_merged(repo, sorted(parts, key=lambda p: p[0]))
    repo.backend.delete_many([f"index/{p[0]}" for p in parts])
    return new
