"""Sparse manifests (runs of stored chunks) against dense ones (one ID per chunk of
the volume) as the model: encoding, decoding of the old format, and an incremental's
overlay of changed ranges on its base."""
from __future__ import annotations

import json
import struct

import numpy as np
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap.backup.crypto import ID_BYTES
from blocksnap.backup.manifest import Manifest, expand_runs, overlay, runs_of

# IDs from a few values, many zero rows (zeros of the volume)
ROW = st.integers(0, 5)


def dense_of(values: list[int]) -> np.ndarray:
    out = np.zeros((len(values), ID_BYTES), np.uint8)
    for i, v in enumerate(values):
        if v:
            out[i, :] = v
            out[i, 0] = i % 251 + 1      # distinct-ish IDs, never an all-zero row
    return out


def info(chunks: int) -> dict:
    return {"id": "x", "source": {"volume": "v", "snapshot": "s", "created": 1.0}, "chunks": chunks,
            "chunk_size": 4096, "size": chunks * 4096}


@settings(max_examples=200, deadline=None)
@given(st.lists(ROW, max_size=300))
def test_sparse_equals_dense_and_survives_encoding(values):
    dense = dense_of(values)
    m = Manifest.from_dense(info(len(values)), dense)
    assert np.array_equal(m.to_dense(), dense)
    assert m.stored == int(dense.any(axis=1).sum())
    back = Manifest.decode(m.encode(), "m")
    assert np.array_equal(back.to_dense(), dense)
    assert np.array_equal(back.chunk_numbers(), np.flatnonzero(dense.any(axis=1)))
    holes = np.zeros(len(values), bool)
    for s, c in back.holes():
        holes[s:s + c] = True
    assert np.array_equal(holes, ~dense.any(axis=1))


def test_format_1_manifests_are_still_read():
    dense = dense_of([0, 1, 1, 0, 0, 3, 0])
    body = json.dumps(info(7)).encode()
    raw = zstandard.ZstdCompressor().compress(struct.pack("<I", len(body)) + body + dense.tobytes())
    m = Manifest.decode(raw, "old")
    assert np.array_equal(m.to_dense(), dense)
    assert m.starts.tolist() == [1, 5] and m.counts.tolist() == [2, 1]


@st.composite
def base_and_changes(draw):
    n_base = draw(st.integers(0, 200))
    base = draw(st.lists(ROW, min_size=n_base, max_size=n_base))
    n = draw(st.integers(1, 220))          # the new snapshot may be larger or smaller
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=20))) | {0, n})
    changes = []
    for a, b in zip(cuts, cuts[1:]):
        kind = draw(st.sampled_from(["keep", "zero", "data"]))
        if kind == "zero":
            changes.append((a, b - a, None))
        elif kind == "data":
            ids = np.full((b - a, ID_BYTES), draw(st.integers(6, 250)), np.uint8)
            changes.append((a, b - a, ids))
    return base, n, changes


@settings(max_examples=300, deadline=None)
@given(base_and_changes())
def test_overlay_is_the_dense_model(case):
    base_values, n, changes = case
    base_dense = dense_of(base_values)
    model = np.zeros((n, ID_BYTES), np.uint8)
    keep = min(n, len(base_dense))
    model[:keep] = base_dense[:keep]
    for s, c, ids in changes:
        model[s:s + c] = 0 if ids is None else ids
    base = Manifest.from_dense(info(len(base_values)), base_dense) if base_values else None
    starts, counts, ids = overlay(base, n, list(reversed(changes)))   # order does not matter
    got = Manifest(info(n), starts, counts, ids)
    assert np.array_equal(got.to_dense(), model)
    # runs are maximal and in order
    assert (counts > 0).all() and (starts[1:] > starts[:-1] + counts[:-1]).all()


def test_expand_and_runs_of():
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], bool)
    s, c = runs_of(mask)
    assert np.array_equal(expand_runs(s, c), np.flatnonzero(mask))
    assert expand_runs(np.empty(0, np.uint64), np.empty(0, np.uint64)).size == 0


def test_a_large_sparse_volume_costs_its_runs():
    """A 64 TiB volume of 64 KiB chunks holding 1 GiB: 16,384 IDs, not 2**30."""
    chunks = (64 << 40) // (64 << 10)
    ids = np.ones((16384, ID_BYTES), np.uint8)
    m = Manifest(info(chunks), np.array([0, chunks // 2], np.uint64), np.array([8192, 8192], np.uint64), ids)
    raw = m.encode()
    assert len(raw) < 1 << 20
    back = Manifest.decode(raw, "big")
    assert back.stored == 16384 and len(list(back.holes())) == 2
