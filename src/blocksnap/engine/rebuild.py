"""Rebuild page and block refcounts from the roots alone, checking every pointer.

Refcounts are never stored: they are derived on open by walking all trees (each
shared page once), which is what makes leaked space after a crash impossible to
keep: whatever no committed map reaches is free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layout import HEADER_UNITS, KIND_INTERIOR, KIND_LEAF
from .pages import PagePool
from .space import Space


@dataclass
class RebuildReport:
    errors: list[str] = field(default_factory=list)
    unreachable_pages: list[int] = field(default_factory=list)
    bad_pointers: list[tuple[int, int]] = field(default_factory=list)   # (page, index)
    reclaimed: dict[str, int] = field(default_factory=dict)


def rebuild_refcounts(pp: PagePool, space: Space, roots: list[tuple[int, int]]) -> RebuildReport:
    rep = RebuildReport()
    n = pp.next_id
    pp.ref[:] = 0
    exists = pp.kind[:n] != 0
    visited = np.zeros(n, bool)
    by_height: dict[int, list[int]] = {}
    for root, levels in roots:
        if root:
            by_height.setdefault(levels - 1, []).append(root)
    leaves: list[np.ndarray] = []
    top = max(by_height, default=-1)
    carry = np.zeros(0, np.int64)
    for h in range(top, -1, -1):
        ids = np.concatenate([carry, np.array(by_height.get(h, []), np.int64)])
        if not len(ids):
            carry = ids
            continue
        bad = (ids <= 0) | (ids >= n)
        ok_ids = ids[~bad]
        missing = ok_ids[~exists[ok_ids]]
        if bad.any() or len(missing):
            rep.errors.append(f"{int(bad.sum()) + len(missing)} pointer(s) to missing map pages at height {h}")
        ok_ids = ok_ids[exists[ok_ids]]
        _add_counts(pp.ref, ok_ids)
        uniq = np.unique(ok_ids)
        new = uniq[~visited[uniq]]
        visited[new] = True
        want = KIND_INTERIOR if h > 0 else KIND_LEAF
        wrong = new[pp.kind[new] != want]
        if len(wrong):
            rep.errors.append(f"{len(wrong)} map page(s) of the wrong kind at height {h}: {wrong[:5].tolist()}")
            new = new[pp.kind[new] == want]
        if h > 0:
            kids = pp.ptr[new]
            dangling = (kids >= n) | ((kids != 0) & ~exists[np.minimum(kids, n - 1).astype(np.int64)])
            for row_i, col_i in zip(*np.nonzero(dangling)):
                rep.bad_pointers.append((int(new[row_i]), int(col_i)))
            flat = kids.ravel()
            carry = flat[flat != 0].astype(np.int64)
        else:
            leaves.append(new)
    _count_blocks(pp, space, np.concatenate(leaves) if leaves else np.zeros(0, np.int64), rep)
    live = np.flatnonzero(visited)
    rep.unreachable_pages = [int(i) for i in np.flatnonzero(exists & ~visited) if i != 0]
    pp.finish_load(live)
    rep.reclaimed["pages"] = len(rep.unreachable_pages)
    return rep


def _add_counts(target: np.ndarray, idx: np.ndarray) -> None:
    """`np.add.at(target, idx, 1)` for the whole-pool counts of an open: bincount is
    about 12x faster than ufunc.at there (0.02 s of every command on a 2 GiB pool)."""
    if len(idx):
        target += np.bincount(idx, minlength=len(target))[:len(target)].astype(target.dtype)


def _count_blocks(pp: PagePool, space: Space, leaves: np.ndarray, rep: RebuildReport) -> None:
    space.bref[:] = 0
    space.used[:] = False
    space.used[:HEADER_UNITS] = True
    cover = np.zeros(space.total, np.uint8)
    for units in np.unique(pp.units[leaves]) if len(leaves) else []:
        group = leaves[pp.units[leaves] == units]
        entries = pp.ptr[group]
        rows, cols = np.nonzero(entries >= 2)
        starts = entries[rows, cols].astype(np.int64)
        bad = (starts < HEADER_UNITS) | (starts + int(units) > space.total) | (starts % int(units) != 0)
        if bad.any():
            rep.errors.append(f"{int(bad.sum())} block pointer(s) outside the data store or misaligned")
            rep.bad_pointers.extend((int(group[r]), int(c)) for r, c in zip(rows[bad], cols[bad]))
            starts = starts[~bad]
        _add_counts(space.bref, starts)
        uniq = np.unique(starts)
        idx = (uniq[:, None] + np.arange(int(units))).ravel()
        cover += np.minimum(np.bincount(idx, minlength=len(cover))[:len(cover)], 2).astype(np.uint8)
    space.used |= cover > 0
    space.recount()
    overlap = int((cover > 1).sum())
    if overlap:
        rep.errors.append(f"{overlap} data unit(s) claimed by two different blocks")
