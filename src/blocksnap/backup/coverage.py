"""Verification with coverage: every pack read back once per cycle, a slice a day.

`verify --read-data` downloads everything; on a large or remote repository that
is too much to do often. A policy sets a cycle (say 30 days) and a budget of
bytes per run (say 20G a day), and each run reads back, up to the budget:

1. packs whose last read found damage (so the alert stays true until mended),
2. packs never read (new ones: read by the next day's run),
3. then the packs read longest ago.

So with a budget of at least the stored bytes / the cycle's days (and a pack
more, as a run stops short of its budget by less than a pack), every pack,
hence every chunk, is read at least once per cycle, and a flipped byte anywhere
is found within one cycle. What was read when is kept in the repository, so
every host (and `status --repo`) sees it:

    verified/<32 hex>   sealed: magic "bsvr", u32 version, f64 written, u32 N;
                        N pack names (16 bytes), N u64 sizes, N f64 read times
                        (0: never), N u8 results (1: every chunk good)

A run writes one object with the whole record (what it read, and every pack
it knows, read or not), then deletes the objects it started from: the new one
is stored before the old ones go, and two runs at once lose nothing (a reader
takes each pack's latest entry over all objects). Reading a pack means
downloading it, authenticating and decompressing every chunk and checking its
ID, as `verify --read-data` does.
"""
from __future__ import annotations

import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import BlocksnapError, InvalidArgument, NotFound
from .repo import Repository

Progress = Callable[[int, int], None] | None
PREFIX = "verified"
DAY = 86400.0
DEFAULT_CYCLE = 30 * DAY
READERS = 4              # packs downloaded and checked at once
_HEAD = struct.Struct("<4sIdI")
_MAGIC, _VERSION = b"bsvr", 1


@dataclass
class Entry:
    size: int
    time: float          # when it was last read back (0: never)
    ok: bool             # that read found every chunk good


def _encode(entries: dict[str, Entry], written: float) -> bytes:
    names = sorted(entries)
    return b"".join([_HEAD.pack(_MAGIC, _VERSION, written, len(names)),
                     b"".join(bytes.fromhex(n) for n in names),
                     np.array([entries[n].size for n in names], "<u8").tobytes(),
                     np.array([entries[n].time for n in names], "<f8").tobytes(),
                     np.array([entries[n].ok for n in names], np.uint8).tobytes()])


def _decode(raw: bytes) -> tuple[float, dict[str, Entry]]:
    magic, version, written, n = _HEAD.unpack_from(raw)
    if magic != _MAGIC or version != _VERSION or len(raw) != _HEAD.size + n * 33:
        raise ValueError("not a verification record")
    at = _HEAD.size
    names = np.frombuffer(raw, np.uint8, 16 * n, at).reshape(n, 16)
    sizes = np.frombuffer(raw, "<u8", n, at + 16 * n).tolist()
    times = np.frombuffer(raw, "<f8", n, at + 24 * n).tolist()
    oks = np.frombuffer(raw, np.uint8, n, at + 32 * n).tolist()
    return written, {bytes(r).hex(): Entry(s, t, bool(k)) for r, s, t, k in zip(names, sizes, times, oks)}


def read_record(repo: Repository) -> tuple[list[str], dict[str, Entry], float | None]:
    """(object keys, each pack's latest entry, when the newest object was written).
    An object deleted between the listing and its GET was replaced by a newer
    one, written first: list again. A damaged one is left out (its packs are
    then read again, as if never read)."""
    seen: set[str] = set()
    keys: list[str] = []
    entries: dict[str, Entry] = {}
    as_of: float | None = None
    while True:
        todo = [k for k in sorted(repo.backend.list(PREFIX)) if k not in seen]
        vanished = False
        for key in todo:
            seen.add(key)
            try:
                written, got = _decode(repo.keys.open(repo.backend.get(key), key.encode(), f"{repo.url}: {key}"))
            except NotFound:
                vanished = True
                continue
            except (BlocksnapError, ValueError, struct.error):
                keys.append(key)        # replaced by the next run all the same
                continue
            keys.append(key)
            as_of = written if as_of is None else max(as_of, written)
            for name, e in got.items():
                have = entries.get(name)
                if have is None or e.time > have.time:
                    entries[name] = e
        if not vanished:
            return keys, entries, as_of


def write_record(repo: Repository, entries: dict[str, Entry], now: float, replaced: list[str]) -> str:
    """The whole record in one new object, then the objects it replaces deleted."""
    key = f"{PREFIX}/{os.urandom(16).hex()}"
    repo.backend.put(key, repo.keys.seal(_encode(entries, now), key.encode()))
    for old in replaced:
        repo.backend.delete(old)
    return key


def summary(entries: dict[str, Entry], cycle_seconds: float, now: float,
            budget_bytes: int | None = None) -> dict[str, Any]:
    """Coverage: the share of stored bytes read back (and good) within the cycle,
    how old the oldest read is, and whether a budget a day is enough for the cycle."""
    total = sum(e.size for e in entries.values())
    fresh = sum(e.size for e in entries.values() if e.ok and e.time > 0 and now - e.time < cycle_seconds)
    read = [now - e.time for e in entries.values() if e.time > 0]
    never = [e for e in entries.values() if e.time <= 0]
    per_day = total * DAY / cycle_seconds
    out = {"packs": len(entries), "stored_bytes": total, "covered_bytes": fresh,
           "coverage_ratio": fresh / total if total else 1.0,
           "oldest_verified_age": max(read) if read else None,
           "never_verified_packs": len(never), "never_verified_bytes": sum(e.size for e in never),
           "damaged_packs": sorted(n for n, e in entries.items() if e.time > 0 and not e.ok),
           "cycle_seconds": cycle_seconds, "bytes_per_day_needed": int(-(-total * DAY // cycle_seconds)) if total
           else 0}
    largest = max((e.size for e in entries.values()), default=0)
    out["largest_pack_bytes"] = largest
    if budget_bytes is not None:
        # a run stops short of its budget by less than a pack: one more pack of room
        out["budget_bytes"] = budget_bytes
        out["budget_enough"] = budget_bytes >= per_day + largest
    return out


def coverage(repo: Repository, cycle_seconds: float, now: float | None = None,
             budget_bytes: int | None = None) -> dict[str, Any]:
    """Coverage from the record alone (no pack is listed or read): as the last
    run saw the repository (`as_of`); packs written since are not counted yet."""
    _check(cycle_seconds, budget_bytes)
    now = time.time() if now is None else now
    _, entries, as_of = read_record(repo)
    return dict(summary(entries, cycle_seconds, now, budget_bytes), repository=repo.url, as_of=as_of)


def _check(cycle_seconds: float, budget_bytes: int | None) -> None:
    if not cycle_seconds or cycle_seconds <= 0:
        raise InvalidArgument("the verify cycle must be longer than 0 seconds")
    if budget_bytes is not None and budget_bytes < 0:
        raise InvalidArgument("the verify budget must not be negative")


def choose(entries: dict[str, Entry], sizes: dict[str, int], budget_bytes: int) -> list[str]:
    """The packs to read this run, in order: damaged last time, never read, read
    longest ago; as many as fit the budget (stopping at the first that does not,
    so a large pack is not passed over for ever). A pack larger than the whole
    budget can never be read: it is passed over (and `budget_enough` says no)."""
    def rank(name: str) -> tuple:
        e = entries.get(name)
        if e is None or e.time <= 0:
            return (1, 0.0, name)
        return (0 if not e.ok else 2, e.time, name)
    out, used = [], 0
    for name in sorted((n for n in sizes if sizes[n] <= budget_bytes), key=rank):
        if used + sizes[name] > budget_bytes:
            break
        out.append(name)
        used += sizes[name]
    return out


def read_packs(repo: Repository, names: list[str], contents: dict, problems: list[str],
               progress: Progress = None) -> tuple[dict[str, bool], int, int]:
    """Download each pack and check every chunk its index names: (pack -> all good,
    chunks checked, bytes read). Damage goes to `problems`, with pack and chunk."""
    def one(pack: str) -> tuple[str, bool, int, int, list[str]]:
        ids, offs, lens = contents[pack]
        found: list[str] = []
        try:
            blob = memoryview(repo.backend.get(f"data/{pack}"))
        except NotFound as e:
            return pack, False, 0, 0, [str(e)]
        checked = 0
        for cid, o, n in zip(map(bytes, ids), offs.tolist(), lens.tolist()):
            try:
                repo.open_chunk(cid, blob[o:o + n], f"chunk {cid.hex()} in pack {pack}")
                checked += 1
            except BlocksnapError as e:
                found.append(str(e))
        return pack, not found, checked, len(blob), found

    results: dict[str, bool] = {}
    chunks = nbytes = 0
    total = sum(int(contents[p][2].sum()) for p in names)
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="verify") as pool:
        for pack, ok, checked, got, found in pool.map(one, names):
            results[pack] = ok
            chunks += checked
            nbytes += got
            problems.extend(found)
            if progress:
                progress(min(nbytes, total), total)
    return results, chunks, nbytes


def record_reads(repo: Repository, sizes: dict[str, int], results: dict[str, bool],
                 now: float) -> dict[str, Entry]:
    """Note what was read now, and every pack there is (`sizes`), in the record:
    the record as written (packs gone since are dropped from it)."""
    keys, entries, _ = read_record(repo)
    new = {name: entries.get(name, Entry(size, 0.0, True)) for name, size in sizes.items()}
    for name, ok in results.items():
        new[name] = Entry(sizes.get(name, 0), now, ok)
    for name in new:
        new[name].size = sizes[name]
    write_record(repo, new, now, keys)
    return new


def verify_slice(repo: Repository, budget_bytes: int, cycle_seconds: float, now: float | None = None,
                 progress: Progress = None) -> dict[str, Any]:
    """Read back up to `budget_bytes` of packs, those never read or read longest ago
    first, record it, and report coverage over `cycle_seconds`. The packs and their
    sizes are the indexes' (nothing is listed); a pack missing or cut short is found
    when its turn comes. Index objects are checked as `verify` does; manifests are not
    read (`verify` does that)."""
    from .maintain import pack_checks  # (maintain uses this module for verify --read-data)
    _check(cycle_seconds, budget_bytes)
    now = time.time() if now is None else now
    with repo.lock("verify"):
        problems: list[str] = []
        packs, contents, good = pack_checks(repo, problems)
        sizes = {p: packs[p] for p, *_ in good}
        _, entries, _ = read_record(repo)
        chosen = choose(entries, sizes, budget_bytes)
        results, chunks, nbytes = read_packs(repo, chosen, contents, problems, progress)
        entries = record_reads(repo, sizes, results, now)
    cov = summary(entries, cycle_seconds, now, budget_bytes)
    return dict(cov, repository=repo.url, packs_read=len(chosen), bytes_read=nbytes, chunks_read=chunks,
                damaged=sorted(p for p, ok in results.items() if not ok), problems=problems)
