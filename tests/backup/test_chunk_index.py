"""ChunkIndex (numpy) against the dict it replaced, as a model."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap.backup.chunk_index import ChunkIndex, keys_of, member, missing_chunks
from blocksnap.backup.crypto import ID_BYTES

# few IDs: many repeats (all-zero is a hole)
ID = st.integers(1, 40).map(lambda i: i.to_bytes(2, "big") * (ID_BYTES // 2))


@settings(max_examples=150, deadline=None)
@given(packs=st.lists(st.lists(st.tuples(ID, st.integers(0, 1 << 40), st.integers(1, 1 << 20)), max_size=12),
                      max_size=6),
       added=st.lists(st.tuples(ID, st.integers(0, 99), st.integers(1, 99)), max_size=8),
       queries=st.lists(ID, max_size=20))
def test_index_answers_like_the_dict_first_pack_wins(packs, added, queries):
    model: dict[bytes, tuple[str, int, int]] = {}
    parts = []
    for i, rows in enumerate(packs):
        name = f"p{i:02d}"
        ids = np.frombuffer(b"".join(c for c, _, _ in rows), np.uint8).reshape(-1, ID_BYTES)
        parts.append((name, ids, np.array([o for _, o, _ in rows], np.uint64),
                      np.array([n for _, _, n in rows], np.uint32)))
        for c, o, n in rows:
            model.setdefault(c, (name, o, n))
    ix = ChunkIndex.build(parts)
    ix.add("new", [c for c, _, _ in added], [o for _, o, _ in added], [n for _, _, n in added])
    for c, o, n in added:
        model.setdefault(c, ("new", o, n))
    assert len(ix) == len(model)
    for q in queries:
        assert ix.get(q) == model.get(q)
        assert (q in ix) == (q in model)
    qa = np.frombuffer(b"".join(queries), np.uint8).reshape(-1, ID_BYTES)
    pack_no, offs, lens = ix.lookup(qa)
    for q, p, o, n in zip(queries, pack_no.tolist(), offs.tolist(), lens.tolist()):
        assert ((ix.packs[p], o, n) if p >= 0 else None) == model.get(q)
    manifest = np.concatenate([qa, np.zeros((2, ID_BYTES), np.uint8)])   # zero rows are holes
    assert missing_chunks(ix, manifest) == len({q for q in queries if q not in model})
    live = np.unique(keys_of(qa))
    assert member(keys_of(qa), live).all()
    if len(model):
        probe = np.frombuffer(b"".join(model), np.uint8).reshape(-1, ID_BYTES)
        assert member(keys_of(probe), live).tolist() == [c in set(queries) for c in model]


def test_an_entry_costs_32_bytes_and_added_chunks_are_merged_in(monkeypatch):
    from blocksnap.backup import chunk_index
    monkeypatch.setattr(chunk_index, "MERGE_AT", 100)
    n = 1000
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 256, (n, ID_BYTES), np.uint8)
    ix = ChunkIndex.build([("p", ids, np.arange(n, dtype=np.uint64), np.ones(n, np.uint32))])
    assert ix.nbytes() == 32 * n
    more = rng.integers(1, 256, (600, ID_BYTES), np.uint8)
    for k in range(0, 600, 50):     # packs of 50, as a backup writes them
        rows = more[k:k + 50]
        ix.add(f"q{k}", [bytes(r) for r in rows], list(range(k, k + 50)), [7] * 50)
    assert len(ix._new) < 250 and ix.nbytes() > 32 * n        # merged: not all in the dict
    assert len(ix) == 1600
    assert ix.get(bytes(more[0])) == ("q0", 0, 7) and ix.get(bytes(more[599])) == ("q550", 599, 7)
    assert ix.get(bytes(ids[5])) == ("p", 5, 1)
    assert (ix.lookup(np.concatenate([ids, more]))[0] >= 0).all()
