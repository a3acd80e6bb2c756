"""`read_into` (the FUSE read path) and reads through the pooled scratch buffers.

Reads fill a buffer that is reused from request to request (a pooled scratch
buffer, or the caller's own buffer for block-aligned reads), so holes must be
zeroed explicitly: a buffer that held data a moment ago must never leak it into
a read of a hole. Every read here goes into a buffer full of garbage, and the
reads alternate between data and holes, aligned and unaligned, against a model,
through the compiled read path (unaligned reads straight into the caller's
buffer) and through the Python one (unaligned reads through a scratch buffer).
"""
from __future__ import annotations

import os
import random

import pytest

import blocksnap

BS = 16384
SIZE = 64 * BS


def _volume(tmp_path, mode: str, compiled: bool = True):
    pool = blocksnap.Pool.create(str(tmp_path / "pool"), size=32 << 20)
    if compiled:
        assert pool.store.read_mapped is not None, "the compiled read path was not built"
    else:
        pool.store.read_mapped = None
    if mode == "cow":
        origin = tmp_path / "origin.img"
        with open(origin, "wb") as f:
            f.truncate(SIZE)
        return pool, pool.create_volume("v", mode="cow", origin=str(origin), block_size=BS)
    return pool, pool.create_volume("v", size=SIZE, block_size=BS)


def _check(obj, model: bytearray, rng: random.Random) -> None:
    for _ in range(40):
        if rng.random() < 0.5:  # block-aligned: straight into the caller's buffer
            b0 = rng.randrange(0, SIZE // BS)
            off, length = b0 * BS, rng.randrange(1, SIZE // BS - b0 + 1) * BS
        else:                   # unaligned: through the scratch buffer
            off = rng.randrange(0, SIZE - 1)
            length = rng.randrange(1, min(SIZE - off, 5 * BS) + 1)
        out = bytearray(b"\xa5" * length)
        obj.read_into(off, memoryview(out))
        assert out == model[off:off + length], (off, length)
        assert obj.read(off, length) == model[off:off + length], (off, length)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("mode", ["row", "cow"])
def test_read_into_matches_model_and_zeroes_holes(tmp_path, mode, compiled):
    pool, vol = _volume(tmp_path, mode, compiled)
    rng = random.Random(7)
    live = bytearray(SIZE)
    snaps: list[tuple[object, bytes]] = []
    with pool:
        for gen in range(6):
            for _ in range(12):
                off = rng.randrange(0, SIZE - 1)
                n = rng.randrange(1, min(SIZE - off, 3 * BS) + 1)
                data = os.urandom(n)
                vol.write(off, data)
                live[off:off + n] = data
            if gen % 2:  # discard: whole blocks become holes again
                b = rng.randrange(0, SIZE // BS - 4)
                vol.discard(b * BS, 3 * BS)
                live[b * BS:(b + 3) * BS] = bytes(3 * BS)
            _check(vol, live, rng)
            snaps.append((vol.snapshot(f"s{gen}"), bytes(live)))
            for snap, held in snaps:
                _check(snap, bytearray(held), rng)


def test_read_into_bounds(tmp_path):
    pool, vol = _volume(tmp_path, "row")
    with pool:
        with pytest.raises(blocksnap.BlocksnapError):
            vol.read_into(SIZE - 10, memoryview(bytearray(20)))
        vol.read_into(SIZE, memoryview(bytearray(0)))


def _count_scratch(monkeypatch, module) -> list:
    """Count the scratch buffers `module` takes for reads into a caller's buffer."""
    from blocksnap.engine import blockio
    taken = []

    def counting(out, *a):
        if out is None or a[0] or a[1] != a[2]:   # a scratch buffer, not the caller's
            taken.append(a)
        return blockio.read_buffer(out, *a)
    monkeypatch.setattr(module, "read_buffer", counting)
    return taken


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_cow_snapshot_unaligned_reads_from_origin_store_and_both(tmp_path, compiled, monkeypatch):
    """A COW snapshot's blocks come from the origin (unchanged since), from the store
    (preserved before an overwrite), or from both: unaligned reads of each kind.
    Only the mixed kind takes a scratch buffer here (the Python path takes its own
    in blockio for store blocks)."""
    from blocksnap.engine import cow
    pool, vol = _volume(tmp_path, "cow", compiled)
    with pool:
        old = os.urandom(SIZE)
        vol.write(0, old)
        snap = vol.snapshot("s")
        vol.write(8 * BS, os.urandom(8 * BS))          # blocks 8-15 preserved in the store
        taken = _count_scratch(monkeypatch, cow)
        for off, n, scratch in [(BS + 100, 2 * BS, 0),                      # origin only
                                (8 * BS + 5, 3 * BS + 7, 0),                # store only
                                (6 * BS + 9, 4 * BS, 1)]:                   # both
            out = bytearray(b"\xa5" * n)
            before = len(taken)
            snap.read_into(off, memoryview(out))
            assert out == old[off:off + n], (off, n)
            assert len(taken) - before == scratch, (off, n)


def test_unaligned_row_reads_need_no_scratch_buffer(tmp_path, monkeypatch):
    """Through the compiled path, a ROW read cut inside a block (as a loop device
    cuts them) goes straight into the caller's buffer."""
    from blocksnap.engine import blockio, row
    pool, vol = _volume(tmp_path, "row")
    with pool:
        data = os.urandom(SIZE)
        vol.write(0, data)
        snap = vol.snapshot("s")
        taken = _count_scratch(monkeypatch, row)
        monkeypatch.setattr(blockio, "read_buffer", lambda *a: pytest.fail("scratch buffer in blockio"))
        for obj in (vol, snap):
            for off, n in [(BS + 100, 5 * BS), (3 * BS, 2 * BS + 9), (7, 10)]:
                out = bytearray(b"\xa5" * n)
                obj.read_into(off, memoryview(out))
                assert out == data[off:off + n]
        assert taken == []
