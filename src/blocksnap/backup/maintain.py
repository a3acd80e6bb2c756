"""`verify` and `prune`: is every backup restorable, and which backups and packs go.

Prune deletes in the order that keeps every remaining backup whole at every
instant: manifests first, then for each pack no remaining manifest needs its
index, then the pack (a pack without an index is garbage the next prune removes;
an index without its pack would make a later backup skip chunks it thinks are
stored). Packs that are mostly garbage are rewritten: their live chunks go to a
new pack and index before the old index and pack are deleted.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np

from ..errors import BlocksnapError, NotFound
from ..retention import Policy, decide
from .chunk_index import KEY, ChunkIndex, keys_of, member, missing_chunks
from .repo import Repository

Progress = Callable[[int, int], None] | None
REPACK_BELOW = 0.5    # rewrite a pack whose live share of bytes is below this


def verify(repo: Repository, read_data: bool = False, progress: Progress = None) -> dict[str, Any]:
    with repo.lock("verify"):     # a prune rewriting packs meanwhile would look like damage
        return _verify(repo, read_data, progress)


def _verify(repo: Repository, read_data: bool, progress: Progress) -> dict[str, Any]:
    problems: list[str] = []
    packs = {k.split("/", 1)[1]: n for k, n in repo.backend.list("data").items()}
    indexes = [k.split("/", 1)[1] for k in repo.backend.list("index")]
    contents: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    good = []   # packs whose chunks count as stored: present and long enough
    for pack in sorted(indexes):
        try:
            ids, offs, lens = repo.read_index(pack)
        except BlocksnapError as e:
            problems.append(str(e))
            continue
        contents[pack] = (ids, offs, lens)
        end = int((offs.astype(np.int64) + lens).max()) if len(lens) else 0
        if pack not in packs:
            problems.append(f"pack {pack} is missing (its index names {len(lens)} chunks)")
            continue
        if packs[pack] < end:
            problems.append(f"pack {pack} is cut short: {packs[pack]} bytes, its index needs {end}")
            continue
        good.append((pack, ids, offs, lens))
    index = ChunkIndex.build(good)
    backups = 0
    for bid in repo.backup_ids():
        try:
            m = repo.read_manifest(bid)
        except BlocksnapError as e:
            problems.append(str(e))
            continue
        backups += 1
        lost = missing_chunks(index, m.ids)
        if lost:
            problems.append(f"backup {bid}: {lost} of its chunks are not stored")
    checked = 0
    if read_data:
        total = sum(packs.get(p, 0) for p in contents)
        done = 0
        for pack, (ids, offs, lens) in sorted(contents.items()):
            if pack not in packs:
                continue
            try:
                blob = memoryview(repo.backend.get(f"data/{pack}"))
            except NotFound as e:
                problems.append(str(e))
                continue
            for cid, o, n in zip(map(bytes, ids), offs.tolist(), lens.tolist()):
                try:
                    repo.open_chunk(cid, blob[o:o + n], f"chunk {cid.hex()} in pack {pack}")
                    checked += 1
                except BlocksnapError as e:
                    problems.append(str(e))
            done += packs[pack]
            if progress:
                progress(done, total)
    return {"repository": repo.url, "backups": backups, "packs": len(packs), "chunks": len(index),
            "chunks_read": checked, "read_data": read_data,
            "unindexed_packs": sorted(set(packs) - set(contents)), "problems": problems}


def prune(repo: Repository, policy: Policy, dry_run: bool = False, now: float | None = None) -> dict[str, Any]:
    with repo.lock("prune", exclusive=not dry_run):
        manifests = repo.manifests()
        by_volume: dict[tuple, list] = defaultdict(list)
        for m in manifests:
            by_volume[m.group].append(m)
        keep: dict[str, list[str]] = {}
        remove: list[str] = []
        for ms in by_volume.values():
            d = decide([(m.id, m.info["time"]) for m in ms], policy, now)
            keep.update(d.keep)
            remove += d.remove
        report: dict[str, Any] = {"kept": keep, "removed": sorted(remove), "dry_run": dry_run,
                                  "packs_deleted": 0, "packs_rewritten": 0, "bytes_freed": 0}
        if dry_run:
            return report
        for bid in remove:
            repo.delete_manifest(bid)
        named = [keys_of(m.ids[m.ids.any(axis=1)]) for m in manifests if m.id not in remove]
        live = np.unique(np.concatenate(named)) if named else np.empty(0, KEY)
        report.update(_collect(repo, live))
        repo.backend.sweep()
        return report


def _collect(repo: Repository, live: np.ndarray) -> dict[str, int]:
    """Delete or rewrite the packs whose chunks are not all in `live` (sorted keys)."""
    packs = {k.split("/", 1)[1]: n for k, n in repo.backend.list("data").items()}
    deleted = rewritten = freed = 0
    indexed = set()
    for key in sorted(repo.backend.list("index")):
        pack = key.split("/", 1)[1]
        indexed.add(pack)
        ids, offs, lens = repo.read_index(pack)
        alive = member(keys_of(ids), live)
        kept_bytes = int(lens[alive].sum())
        size = packs.get(pack, 0)
        if alive.any() and kept_bytes >= REPACK_BELOW * int(lens.sum()):
            continue
        if alive.any():
            blob = memoryview(repo.backend.get(f"data/{pack}"))
            repo.write_pack([(bytes(c), bytes(blob[o:o + n]))
                             for c, o, n in zip(ids[alive], offs[alive].tolist(), lens[alive].tolist())])
            rewritten += 1
            freed += size - kept_bytes
        else:
            deleted += 1
            freed += size
        repo.backend.delete(f"index/{pack}")
        repo.backend.delete(f"data/{pack}")
    for pack in set(packs) - indexed:   # left by a backup that was cut short
        repo.backend.delete(f"data/{pack}")
        deleted += 1
        freed += packs[pack]
    return {"packs_deleted": deleted, "packs_rewritten": rewritten, "bytes_freed": freed}
