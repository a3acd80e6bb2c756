"""`check` (metadata) and `scrub` (data checksums) of a pool."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .blockio import block_sums
from .layout import PAGE_ENTRIES, UNIT
from .pages import PagePool
from .radix import Tree
from .rebuild import rebuild_refcounts
from .space import Space

E = PAGE_ENTRIES


def _all_roots(pool) -> list[tuple[str, int, int]]:
    out = []
    for v in pool.volumes():
        if v.mode == "row":
            out.append((v.name, v.tree.root, v.tree.levels))
        for s in v.snapshot_rows:
            out.append((f"{v.name}@{s.name}", s.root, s.levels))
    return out


def check_pool(pool, repair: bool = False) -> dict[str, Any]:
    """Re-read the committed catalog, rebuild everything from it and compare."""
    with pool.lock:
        pool.commit()
        fresh_pages = PagePool()
        fresh_space = Space(pool.space.total)
        fresh_pages.on_blocks_released = fresh_space.decref
        fresh_pages.on_blocks_shared = fresh_space.incref
        for pid, kind, units, blob in pool.catalog.pages():
            ptr, csum = PagePool.deserialize(kind, blob)
            fresh_pages.load(pid, kind, units, ptr, csum)
        roots = [(r, lv) for _, r, lv in _all_roots(pool)]
        rep = rebuild_refcounts(fresh_pages, fresh_space, roots)
        errors = list(rep.errors)
        if rep.unreachable_pages:
            errors.append(f"{len(rep.unreachable_pages)} map page(s) in the catalog that nothing references")
        if not errors:
            if not np.array_equal(fresh_space.bref, pool.space.bref):
                errors.append("block refcounts in memory differ from the catalog")
            if pool.space.nused != int(np.count_nonzero(pool.space.used)):
                errors.append("used-unit count in memory differs from the space map")
            used = pool.space.used.copy()
            for starts, units in pool.quarantined():  # waiting for a reader or a write
                idx = (starts.astype(np.int64)[:, None] + np.arange(units)).ravel()
                used[idx] = False
            if not np.array_equal(fresh_space.used, used):
                errors.append("space map in memory differs from the catalog")
        for v in pool.volumes():
            seqs = [s.seq for s in v.snapshot_rows]
            if seqs != sorted(set(seqs)):
                errors.append(f"volume {v.name}: snapshot order is inconsistent")
            for s in v.snapshot_rows:
                if v.mode == "row" and s.size % 512:
                    errors.append(f"snapshot {v.name}@{s.name}: bad size {s.size}")
        repaired: list[str] = []
        if repair and (rep.bad_pointers or rep.unreachable_pages or _missing_roots(pool)):
            repaired = _repair(pool, rep)
        return {
            "clean": not errors, "errors": errors, "repaired": repaired,
            "volumes": len(pool.volumes()),
            "snapshots": sum(len(v.snapshot_rows) for v in pool.volumes()),
            "map_pages": len(np.flatnonzero(fresh_pages.kind[:fresh_pages.next_id])),
            "used_bytes": pool.space.used_units() * UNIT,
        }


def _repair(pool, rep) -> list[str]:
    """Cut dangling pointers (the blocks they named are lost) and drop orphan pages."""
    done = []
    pp = pool.pages
    for pid, col in rep.bad_pointers:
        if pid < len(pp.ref) and pp.kind[pid]:
            pp.ptr[pid, col] = 0
            pp.csum[pid, col] = 0
            pp.dirty.add(pid)
            done.append(f"cleared bad pointer in map page {pid} slot {col}")
    for owner, obj in _missing_roots(pool):
        # the whole map is gone: the volume or snapshot reads as zeros from now on
        if hasattr(obj, "tree"):
            obj.tree.root = 0
            pool.mark_dirty(obj.name)
        else:
            obj.root = 0
            if hasattr(owner, "trees"):
                owner.trees[obj.name].root = 0
            pool.catalog.commit(snapshots=[obj])
        done.append(f"dropped the missing map of {owner.name}"
                    + (f"@{obj.name}" if obj is not owner else ""))
    if rep.unreachable_pages:
        pool.catalog.commit(freed_pages=rep.unreachable_pages)
        done.append(f"deleted {len(rep.unreachable_pages)} orphan map page(s)")
    pool.commit()
    # start again from what is now committed, so refcounts match it exactly
    rebuild_refcounts(pp, pool.space, [(r, lv) for _, r, lv in _all_roots(pool)])
    return done


def _missing_roots(pool) -> list[tuple[Any, Any]]:
    """(volume, volume-or-snapshot-row) whose root page does not exist."""
    pp = pool.pages
    out = []

    def gone(root: int) -> bool:
        return bool(root) and (root >= pp.next_id or not pp.kind[root])
    for v in pool.volumes():
        if v.mode == "row" and gone(v.tree.root):
            out.append((v, v))
        for s in v.snapshot_rows:
            root = v.trees[s.name].root if v.mode == "cow" else s.root
            if gone(root):
                out.append((v, s))
    return out


def scrub(pool, volume: str, snapshot: str | None = None,
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read every stored block of the volume (or one snapshot) and verify its xxh3."""
    with pool.lock:
        vol = pool.volume(volume)
        targets: list[tuple[str, Tree]] = []
        if snapshot is None:
            if vol.mode == "row":
                targets.append((volume, vol.tree))
            rows = vol.snapshot_rows
        else:
            rows = [vol._srow(snapshot)]
        for s in rows:
            tree = vol.trees[s.name] if vol.mode == "cow" else Tree(s.root, s.levels, vol.units)
            targets.append((f"{volume}@{s.name}", tree))
        ptrs, sums, owners, blocks = [], [], [], []
        for label, tree in targets:
            for li, p in pool.maps.iter_leaves(tree):
                row = pool.pages.ptr[p]
                idx = np.flatnonzero(row >= 2)
                ptrs.append(row[idx])
                sums.append(pool.pages.csum[p, idx])
                blocks.append(idx + li * E)
                owners.extend([label] * len(idx))
        if not ptrs:
            return {"checked_blocks": 0, "bad": [], "clean": True}
        allp = np.concatenate(ptrs)
        alls = np.concatenate(sums)
        allb = np.concatenate(blocks)
        uniq, first = np.unique(allp, return_index=True)
        bs, units = vol.block_size, vol.units
        bad_ptrs: set[int] = set()
        step = max(1, (8 << 20) // bs)
        for i in range(0, len(uniq), step):
            chunk = uniq[i:i + step]
            want = alls[first[i:i + step]]
            buf = bytearray(len(chunk) * bs)
            mv = memoryview(buf)
            for j, p in enumerate(chunk):
                pool.store.preadinto(mv[j * bs:(j + 1) * bs], int(p) * UNIT)
            got = block_sums(buf, np.arange(len(chunk)), bs)
            bad_ptrs.update(int(x) for x in chunk[got != want])
            if progress:
                progress(min(i + step, len(uniq)) * bs, len(uniq) * bs)
        # a pointer shared by several maps with different checksums is also corrupt
        bad = []
        for k in np.flatnonzero(np.isin(allp, list(bad_ptrs))) if bad_ptrs else []:
            bad.append({"where": owners[k], "block": int(allb[k]), "offset": int(allb[k]) * bs,
                        "store_offset": int(allp[k]) * UNIT})
        return {"checked_blocks": int(len(uniq)), "bad": bad, "clean": not bad,
                "checked_bytes": int(len(uniq)) * bs, "units_per_block": units}
