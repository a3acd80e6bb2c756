"""`verify` and `prune`: is every backup restorable, and which backups and packs go.

Prune deletes in the order that keeps every remaining backup whole at every
instant: manifests first; then, for the packs no remaining manifest needs, every
index object naming them, and only then the packs (a pack without an index is
garbage the next prune removes; an index without its pack would make a later
backup skip chunks it thinks are stored). Packs that are mostly garbage are
rewritten: their live chunks go to a new pack first. The index objects that
named the packs going are replaced by merged ones (backup/index_files.py),
written before they are deleted, which also take in the new packs and fold the
small index objects together.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from ..errors import BlocksnapError, InvalidArgument
from ..retention import Policy, decide
from . import coverage, index_files, resume
from .chunk_index import KEY, ChunkIndex, keys_of, member, missing_chunks
from .repo import Repository

Progress = Callable[[int, int], None] | None
REPACK_BELOW = 0.5    # rewrite a pack whose live share of bytes is below this


def verify(repo: Repository, read_data: bool = False, progress: Progress = None, budget: int | None = None,
           cycle: float | None = None, now: float | None = None, list_packs: bool = False) -> dict[str, Any]:
    """Every index object and manifest checked, and every chunk a manifest names
    indexed; with `list_packs` (or `read_data`) also every indexed pack there and
    long enough, from a listing of data/ (on S3 one request per 1,000 packs, the
    slow part of a verify of a large repository); with `read_data` every pack read
    back; with `budget` (bytes) a slice of the packs read back, those never read or
    read longest ago first, and coverage over `cycle` seconds (backup/coverage.py).
    What is read is noted in the repository's verification record either way."""
    if read_data and budget is not None:
        raise InvalidArgument("read every pack (--read-data) or a budget of them (--budget), not both")
    with repo.lock("verify"):     # a prune rewriting packs meanwhile would look like damage
        return _verify(repo, read_data, progress, budget, cycle, now, list_packs or read_data)


def pack_checks(repo: Repository, problems: list[str],
                list_packs: bool = False) -> tuple[dict[str, int], dict, list[index_files.Part]]:
    """(pack -> size, each indexed pack's (ids, offsets, lengths), the indexed packs
    that count as stored). With `list_packs` the sizes are the listing's, and every
    pack an index names must be there, whole; without, the indexes are taken at
    their word (a pack's size is the end of its last chunk) and a missing or short
    pack shows when it is read."""
    packs = {k.split("/", 1)[1]: n for k, n in repo.backend.list_hex("data").items()} if list_packs else {}
    contents: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    good = []   # packs whose chunks count as stored: present and long enough
    for pack, ids, offs, lens in _index_parts(index_files.read_all(repo, problems), problems):
        contents[pack] = (ids, offs, lens)
        end = int((offs.astype(np.int64) + lens).max()) if len(lens) else 0
        if not list_packs:
            packs[pack] = end
        elif pack not in packs:
            problems.append(f"pack {pack} is missing (its index names {len(lens)} chunks)")
            continue
        if packs[pack] < end:
            problems.append(f"pack {pack} is cut short: {packs[pack]} bytes, its index needs {end}")
            continue
        good.append((pack, ids, offs, lens))
    return packs, contents, good


def _verify(repo: Repository, read_data: bool, progress: Progress, budget: int | None, cycle: float | None,
            now: float | None, list_packs: bool) -> dict[str, Any]:
    problems: list[str] = []
    packs, contents, good = pack_checks(repo, problems, list_packs)
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
    out: dict[str, Any] = {"repository": repo.url, "backups": backups, "packs": len(packs), "chunks": len(index),
                           "chunks_read": 0, "read_data": read_data, "listed_packs": list_packs,
                           "unindexed_packs": sorted(set(packs) - set(contents)), "problems": problems}
    if read_data or budget is not None:
        now = time.time() if now is None else now
        sizes = {p: packs[p] for p, *_ in good}
        if read_data:
            chosen = sorted(sizes)
        else:
            chosen = coverage.choose(coverage.read_record(repo)[1], sizes, budget)
        results, out["chunks_read"], out["bytes_read"] = coverage.read_packs(repo, chosen, contents, problems,
                                                                             progress)
        out["packs_read"] = len(chosen)
        entries = coverage.record_reads(repo, sizes, results, now)
        out["coverage"] = coverage.summary(entries, cycle or coverage.DEFAULT_CYCLE, now, budget)
    return out


def _index_parts(objects: list[index_files.IndexObject], problems: list[str]):
    """Each pack's index once (a pack may be named by a merged and a loose index
    for a while); two that disagree are a problem."""
    seen: dict[str, tuple[str, tuple]] = {}
    for o in objects:
        for pack, ids, offs, lens in o.parts():
            if pack in seen:
                first, (ids0, offs0, lens0) = seen[pack]
                if not (np.array_equal(ids, ids0) and np.array_equal(offs, offs0) and np.array_equal(lens, lens0)):
                    problems.append(f"pack {pack}: the indexes {first} and {o.name} disagree")
                continue
            seen[pack] = (o.name, (ids, offs, lens))
            yield pack, ids, offs, lens


def prune(repo: Repository, policy: Policy, dry_run: bool = False, now: float | None = None,
          groups: set[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """`groups` (host, pool, volume): apply the policy to these only (the agent prunes
    per volume, each by its own rules); the others' backups are all kept."""
    with repo.lock("prune", exclusive=not dry_run):
        manifests = repo.manifests()
        by_volume: dict[tuple, list] = defaultdict(list)
        for m in manifests:
            if groups is None or m.group in groups:
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
        named = [keys_of(m.ids) for m in manifests if m.id not in remove]
        kept, stale = resume.live_ids(repo, now)    # what cut-short backups stored, to go on with
        named += [keys_of(ids) for ids in kept]
        for key in stale:
            resume.drop(repo, key)
        live = np.unique(np.concatenate(named)) if named else np.empty(0, KEY)
        report.update(_collect(repo, live))
        repo.backend.sweep()
        return report


def _collect(repo: Repository, live: np.ndarray) -> dict[str, int]:
    """Delete or rewrite the packs whose chunks are not all in `live` (sorted keys).
    In this order: the new packs of the rewritten ones; merged indexes naming the
    packs that stay, in place of every index object that names a pack going (and
    of the small ones, when there are several); the replaced objects; the packs."""
    packs = {k.split("/", 1)[1]: n for k, n in repo.backend.list_hex("data").items()}
    objects = index_files.read_all(repo)
    contents = index_files.pack_contents(objects)
    deleted = rewritten = freed = 0
    drop: set[str] = set()
    new: list[index_files.Part] = []
    for pack in sorted(contents):
        ids, offs, lens = contents[pack]
        alive = member(keys_of(ids), live)
        kept_bytes = int(lens[alive].sum())
        size = packs.get(pack, 0)
        if alive.any() and kept_bytes >= REPACK_BELOW * int(lens.sum()):
            continue
        if alive.any():
            blob = memoryview(repo.backend.get(f"data/{pack}"))
            new.append(repo.put_pack([(bytes(c), bytes(blob[o:o + n]))
                                      for c, o, n in zip(ids[alive], offs[alive].tolist(), lens[alive].tolist())]))
            rewritten += 1
            freed += size - kept_bytes
        else:
            deleted += 1
            freed += size
        drop.add(pack)
    replace = {o.name for o in objects if not drop.isdisjoint(o.packs)}
    fold = {o.name for o in objects if index_files.small(o)}
    if len(fold | replace) > 1 or new:    # one small object alone would only be copied
        replace |= fold
    if replace or new:
        index_files.merge(repo, objects, replace, drop, new)
    orphans = set(packs) - set(contents)      # left by a backup that was cut short
    # no index names any of them any more (DeleteObjects, 1,000 a request, on S3)
    repo.backend.delete_many(f"data/{pack}" for pack in sorted(drop | orphans))
    deleted += len(orphans)
    freed += sum(packs[p] for p in orphans)
    return {"packs_deleted": deleted, "packs_rewritten": rewritten, "bytes_freed": freed}
