"""Model-based tests: hypothesis drives random operations on a real pool (real files,
real SQLite catalog) and every read is compared with a bytearray model.

One state machine, instantiated for ROW and COW volumes (COW over an image file origin
with random content, partly sparse), block sizes 4K, 16K and 64K, small volumes and
volumes that span several map leaf pages (PAGE_ENTRIES blocks per leaf); every pool
also holds a ROW volume of another block size, so allocations of different sizes mix.
Operations: writes (whole blocks, several blocks, unaligned, partial, across leaf
boundaries, all-zero data, one range written as two requests cut at any byte),
discards, flushes, snapshots, deletes of any snapshot, rollbacks, clones (then
written independently of their origin), deletes of clones, resizes of ROW volumes
(grow and shrink, block-aligned or not), diffs, and close + reopen of the pool.
`pool.check()` must be clean at random points and at the end; the
end also deletes everything and expects every byte of space and every map page back.
Two more instances run in a 16 MiB pool that fills up: ENOSPC may then happen, and
must leave each operation whole or undone (byte for byte old or new), every snapshot
intact and the pool clean.

Runs are derandomized (the same examples every run) unless BLOCKSNAP_TEST_RANDOM=1.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import blocksnap
from blocksnap.engine.layout import PAGE_ENTRIES

from ..conftest import FAST_TMP
from .workload import gen_data

POOL_SIZE = 128 << 20
DERANDOMIZE = os.environ.get("BLOCKSNAP_TEST_RANDOM") != "1"

SHAPES = ["block", "blocks", "unaligned", "sector", "small", "boundary", "whole"]
KINDS = ["random", "random", "zero", "fill"]


def pick_range(size: int, bs: int, shape: str, r1: int, r2: int) -> tuple[int, int]:
    """(offset, length) inside [0, size), length >= 1, of the given shape."""
    nb = -(-size // bs)
    if shape == "block":
        off = (r1 % nb) * bs
        return off, min(bs, size - off)
    if shape == "blocks":
        off = (r1 % nb) * bs
        return off, min((1 + r2 % 6) * bs, size - off)
    if shape == "sector":
        off = (r1 % (size // 512)) * 512
        return off, min(512 * (1 + r2 % (3 * bs // 512)), size - off)
    if shape == "small":
        off = r1 % size
        return off, 1 + r2 % min(size - off, 64)
    if shape == "boundary":
        # straddle a leaf-page boundary when the volume has one, else the middle
        edge = PAGE_ENTRIES * bs if size > PAGE_ENTRIES * bs else (nb // 2) * bs
        off = max(0, edge - 1 - r1 % (2 * bs))
        return off, min(1 + r2 % (4 * bs), size - off)
    if shape == "whole":
        return 0, size
    off = r1 % size  # unaligned
    return off, 1 + r2 % min(size - off, 4 * bs)


class VolModel:
    def __init__(self, mode: str, bs: int, data: bytes):
        self.mode = mode
        self.bs = bs
        self.data = bytearray(data)
        self.snaps: dict[str, bytes] = {}  # creation order


def old_or_new(got: bytes, old: bytes, new: bytes) -> bool:
    """Every byte of `got` is the old or the new value (a write that failed half way)."""
    g, o, n = (np.frombuffer(x, np.uint8) for x in (got, old, new))
    return bool(((g == o) | (g == n)).all())


class EngineMachine(RuleBasedStateMachine):
    MODE = "row"
    BS = 4096
    MIN_BLOCKS = 8
    MAX_BLOCKS = 64
    MAX_VOLUMES = 5
    MAX_SNAPS = 6
    POOL = POOL_SIZE
    FULL = False  # a pool small enough to run out of space: ENOSPC is expected
    SHAPES = SHAPES
    KINDS = KINDS

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="blocksnap-model-", dir=FAST_TMP)
        self.path = os.path.join(self.dir, "pool")
        self.pool = blocksnap.Pool.create(self.path, size=self.POOL)
        self.vols: dict[str, VolModel] = {}
        self.counter = 0
        self.max_size = self.MAX_BLOCKS * self.BS

    # -- helpers ---------------------------------------------------------------
    def _new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _pick(self, names, i: int) -> str:
        names = sorted(names)
        return names[i % len(names)]

    def _with_snaps(self) -> list[str]:
        return [n for n, m in self.vols.items() if m.snaps]

    def _out_of_space(self, name: str, off: int, old: bytes, new: bytes) -> None:
        """ENOSPC: allowed only in a FULL pool; what was done of the operation must be
        whole parts of it (each byte old or new); the model takes what is there."""
        assert self.FULL, "out of space in a pool that is far from full"
        m = self.vols[name]
        got = self.pool.volume(name).read(off, len(old))
        assert old_or_new(got, old, new), f"{name}: a failed operation left bytes that are neither old nor new"
        m.data[off:off + len(old)] = got

    def _compare_volume(self, name: str) -> None:
        m = self.vols[name]
        vol = self.pool.volume(name)
        assert vol.size == len(m.data)
        got = vol.read(0, vol.size)
        if got != bytes(m.data):
            bad = next(i for i in range(len(got)) if got[i] != m.data[i])
            raise AssertionError(f"volume {name} differs from the model at byte {bad} "
                                 f"(block {bad // m.bs})")
        if m.mode == "row":
            # thin: exactly the blocks holding a non-zero byte are stored
            bs = m.bs
            nb = -(-len(m.data) // bs)
            padded = bytes(m.data) + bytes(nb * bs - len(m.data))
            nz = int(np.frombuffer(padded, np.uint8).reshape(nb, bs).any(axis=1).sum())
            assert vol.info()["allocated"] == nz * bs, (name, vol.info()["allocated"], nz * bs)
        assert [s.name for s in vol.snapshots()] == list(m.snaps)
        for sname, want in m.snaps.items():
            snap = vol.get_snapshot(sname)
            assert snap.size == len(want)
            got = snap.read(0, len(want))
            if got != want:
                bad = next(i for i in range(len(got)) if got[i] != want[i])
                raise AssertionError(f"snapshot {name}@{sname} differs from the model at byte {bad} "
                                     f"(block {bad // m.bs})")

    def _compare_all(self) -> None:
        assert sorted(v.name for v in self.pool.volumes()) == sorted(self.vols)
        for name in self.vols:
            self._compare_volume(name)

    # -- setup -----------------------------------------------------------------
    @initialize(nblocks=st.data(), tail=st.sampled_from([0, 0, 512, 1]), seed=st.integers(0, 2**32 - 1))
    def setup(self, nblocks, tail, seed):
        bs = self.BS
        nb = nblocks.draw(st.integers(self.MIN_BLOCKS, self.MAX_BLOCKS), label="nblocks")
        if tail == 1:
            tail = bs // 2
        size = nb * bs - tail
        # a second ROW volume of another block size shares the pool (and its allocator)
        alt = 16 << 10 if bs != 16 << 10 else 4 << 10
        xsize = (8 + seed % 9) * alt - (seed % 2) * 512
        if self.FULL:
            xsize = size - size % alt  # as big as v0: together they can fill the pool
        self.pool.create_volume("x0", size=xsize, mode="row", block_size=alt)
        self.vols["x0"] = VolModel("row", alt, bytes(xsize))
        if self.MODE == "row":
            self.pool.create_volume("v0", size=size, mode="row", block_size=bs)
            self.vols["v0"] = VolModel("row", bs, bytes(size))
        else:
            r = random.Random(seed)
            content = bytearray(size)
            for b in range(nb):
                k = r.random()
                n = min(bs, size - b * bs)
                if k < 0.35:
                    content[b * bs:b * bs + n] = r.randbytes(n)
                elif k < 0.45:
                    content[b * bs:b * bs + n] = bytes([r.randrange(1, 256)]) * n
            origin = os.path.join(self.dir, "origin.img")
            with open(origin, "wb") as f:
                f.truncate(size)
                # leave zero blocks as holes in the image file
                for b in range(nb):
                    chunk = content[b * bs:(b + 1) * bs]
                    if any(chunk):
                        f.seek(b * bs)
                        f.write(chunk)
            self.pool.create_volume("v0", mode="cow", origin=origin, block_size=bs)
            self.vols["v0"] = VolModel("cow", bs, bytes(content))

    # -- data path -------------------------------------------------------------
    def _write(self, i, shape, r1, r2, kind, seed):
        name = self._pick(self.vols, i)
        m = self.vols[name]
        off, length = pick_range(len(m.data), m.bs, self.SHAPES[shape % len(self.SHAPES)], r1, r2)
        data = gen_data(self.KINDS[kind % len(self.KINDS)], seed, length)
        try:
            self.pool.volume(name).write(off, data)
        except blocksnap.OutOfSpace:
            self._out_of_space(name, off, bytes(m.data[off:off + length]), data)
            return
        m.data[off:off + length] = data

    # writes are the bulk of the work: two rules give them twice the weight
    write = rule(i=st.integers(0, 99), shape=st.integers(0, 999), r1=st.integers(0, 2**31),
                 r2=st.integers(0, 2**31), kind=st.integers(0, 999),
                 seed=st.integers(0, 2**32 - 1))(_write)
    write_more = rule(i=st.integers(0, 99), shape=st.integers(0, 999), r1=st.integers(0, 2**31),
                      r2=st.integers(0, 2**31), kind=st.integers(0, 999),
                      seed=st.integers(0, 2**32 - 1))(_write)

    @rule(i=st.integers(0, 99), shape=st.integers(0, 999), r1=st.integers(0, 2**31),
          r2=st.integers(0, 2**31), cut=st.integers(0, 2**31), backwards=st.booleans(),
          seed=st.integers(0, 2**32 - 1))
    def split_write(self, i, shape, r1, r2, cut, backwards, seed):
        """One range written as two requests cut at any byte, as the loop device
        cuts a 1 MiB write: the block holding the cut is written twice in one
        transaction (the second half in place, from cached content)."""
        name = self._pick(self.vols, i)
        m = self.vols[name]
        off, length = pick_range(len(m.data), m.bs, ["blocks", "unaligned", "boundary"][shape % 3], r1, r2)
        if length < 2:
            return
        data = gen_data("random", seed, length)
        at = 1 + cut % (length - 1)
        halves = [(off, data[:at]), (off + at, data[at:])]
        for o, d in (halves[::-1] if backwards else halves):
            try:
                self.pool.volume(name).write(o, d)
            except blocksnap.OutOfSpace:
                self._out_of_space(name, o, bytes(m.data[o:o + len(d)]), d)
                return
            m.data[o:o + len(d)] = d

    @precondition(lambda self: self.FULL)
    @rule(i=st.integers(0, 99), seed=st.integers(0, 2**32 - 1))
    def fill(self, i, seed):
        """Only for FULL pools: rewrite a whole volume with random data."""
        name = self._pick(self.vols, i)
        m = self.vols[name]
        data = gen_data("random", seed, len(m.data))
        try:
            self.pool.volume(name).write(0, data)
        except blocksnap.OutOfSpace:
            self._out_of_space(name, 0, bytes(m.data), data)
            return
        m.data[:] = data

    @rule(i=st.integers(0, 99), shape=st.integers(0, 999), r1=st.integers(0, 2**31),
          r2=st.integers(0, 2**31))
    def discard(self, i, shape, r1, r2):
        name = self._pick(self.vols, i)
        m = self.vols[name]
        off, length = pick_range(len(m.data), m.bs, self.SHAPES[shape % len(self.SHAPES)], r1, r2)
        try:
            self.pool.volume(name).discard(off, length)
        except blocksnap.OutOfSpace:  # zeroing partial blocks may need space
            self._out_of_space(name, off, bytes(m.data[off:off + length]), bytes(length))
            return
        m.data[off:off + length] = bytes(length)

    @rule(i=st.integers(0, 99), j=st.integers(0, 99), shape=st.integers(0, 999),
          r1=st.integers(0, 2**31), r2=st.integers(0, 2**31))
    def read(self, i, j, shape, r1, r2):
        """A random range of the live volume or of one of its snapshots."""
        name = self._pick(self.vols, i)
        m = self.vols[name]
        vol = self.pool.volume(name)
        targets = [(None, bytes(m.data))] + list(m.snaps.items())
        sname, want = targets[j % len(targets)]
        off, length = pick_range(len(want), m.bs, self.SHAPES[shape % len(self.SHAPES)], r1, r2)
        src = vol if sname is None else vol.get_snapshot(sname)
        assert src.read(off, length) == want[off:off + length], (name, sname, off, length)

    @rule(i=st.integers(0, 99))
    def flush(self, i):
        self.pool.volume(self._pick(self.vols, i)).flush()

    # -- snapshots ---------------------------------------------------------------
    @rule(i=st.integers(0, 99), labelled=st.booleans())
    def snapshot(self, i, labelled):
        name = self._pick(self.vols, i)
        m = self.vols[name]
        if len(m.snaps) >= self.MAX_SNAPS:
            return
        sname = self._new_name("s")
        labels = {"n": str(self.counter)} if labelled else None
        snap = self.pool.volume(name).snapshot(sname, labels=labels)
        assert snap.name == sname and snap.labels == (labels or {})
        m.snaps[sname] = bytes(m.data)

    @precondition(lambda self: self._with_snaps())
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def delete_snapshot(self, i, j):
        name = self._pick(self._with_snaps(), i)
        m = self.vols[name]
        sname = list(m.snaps)[j % len(m.snaps)]
        self.pool.volume(name).get_snapshot(sname).delete()
        del m.snaps[sname]

    @precondition(lambda self: self._with_snaps())
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def rollback(self, i, j):
        name = self._pick(self._with_snaps(), i)
        m = self.vols[name]
        sname = list(m.snaps)[j % len(m.snaps)]
        try:
            self.pool.volume(name).rollback(sname)
        except blocksnap.OutOfSpace:  # a COW rollback writes the origin (copying first)
            assert m.mode == "cow"
            self._out_of_space(name, 0, bytes(m.data), m.snaps[sname])
            return
        m.data = bytearray(m.snaps[sname])

    @precondition(lambda self: self._with_snaps() and len(self.vols) < self.MAX_VOLUMES)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def clone(self, i, j):
        name = self._pick(self._with_snaps(), i)
        m = self.vols[name]
        sname = list(m.snaps)[j % len(m.snaps)]
        cname = self._new_name("c")
        try:
            c = self.pool.volume(name).get_snapshot(sname).clone(cname)
        except blocksnap.OutOfSpace:  # a COW clone copies the origin's blocks
            assert self.FULL and m.mode == "cow"
            assert cname not in [v.name for v in self.pool.volumes()]
            return
        assert c.mode == "row" and c.block_size == m.bs
        self.vols[cname] = VolModel("row", m.bs, m.snaps[sname])

    @precondition(lambda self: len(self.vols) > 2)
    @rule(i=st.integers(0, 99))
    def delete_clone(self, i):
        name = self._pick([n for n in self.vols if n not in ("v0", "x0")], i)
        vol = self.pool.volume(name)
        if self.vols[name].snaps:
            with pytest.raises(blocksnap.Busy):
                vol.delete()
        vol.delete(recursive=True)
        del self.vols[name]

    @precondition(lambda self: self._with_snaps())
    @rule(i=st.integers(0, 99), j=st.integers(0, 99), k=st.integers(0, 99))
    def diff(self, i, j, k):
        """Extents from the maps cover every byte that differs (never miss a change)."""
        name = self._pick(self._with_snaps(), i)
        m = self.vols[name]
        names = list(m.snaps)
        a = names[j % len(names)]
        b = None if k % 3 == 0 else names[k % len(names)]
        extents = self.pool.volume(name).diff(a, b)
        da = m.snaps[a]
        db = bytes(m.data) if b is None else m.snaps[b]
        covered = np.zeros(max(len(da), len(db)), bool)
        for e in extents:
            assert e["length"] > 0
            covered[e["offset"]:e["offset"] + e["length"]] = True
        n = min(len(da), len(db))
        differ = np.frombuffer(da[:n], np.uint8) != np.frombuffer(db[:n], np.uint8)
        missed = np.flatnonzero(differ & ~covered[:n])
        assert not len(missed), f"diff {name}@{a}..{b} misses changed byte {missed[0]}"
        assert covered[n:].all()
        if a == b:
            assert extents == []

    # -- volume size and pool life cycle -------------------------------------------
    @rule(i=st.integers(0, 99), r=st.integers(0, 2**31))
    def resize(self, i, r):
        rows = [n for n, m in self.vols.items() if m.mode == "row"]
        if not rows:
            name = self._pick(self.vols, i)
            with pytest.raises(blocksnap.InvalidArgument):
                self.pool.volume(name).resize(len(self.vols[name].data) + 512)
            return
        name = self._pick(rows, i)
        m = self.vols[name]
        new = 512 * (1 + r % (self.max_size // 512))
        if r % 4 == 0:
            new = -(-new // m.bs) * m.bs
        try:
            self.pool.volume(name).resize(new, shrink=True)
        except blocksnap.OutOfSpace:  # shrinking zeroes the rest of the last block
            assert self.FULL and new < len(m.data)
            assert self.pool.volume(name).size == len(m.data)  # nothing changed
            return
        if new < len(m.data):
            del m.data[new:]
        else:
            m.data.extend(bytes(new - len(m.data)))

    @rule(action=st.sampled_from(["check", "reopen", "compare"]))
    def lifecycle(self, action):
        """Close + reopen the pool, check it (which also commits), or compare everything."""
        if action == "reopen":
            self.pool.close()
            self.pool = blocksnap.Pool.open(self.path)
            self._compare_all()
        elif action == "check":
            rep = self.pool.check()
            assert rep["clean"], rep["errors"]
        else:
            self._compare_all()

    def teardown(self):
        try:
            if getattr(self, "pool", None) is not None and not self.pool.closed and self.vols:
                self._compare_all()
                rep = self.pool.check()
                assert rep["clean"], rep["errors"]
                # everything deleted: every block and every map page comes back
                for name in sorted(self.vols, key=lambda n: n in ("v0", "x0")):
                    self.pool.volume(name).delete(recursive=True)
                self.pool.close()
                self.pool = blocksnap.Pool.open(self.path)
                st_ = self.pool.status()
                assert st_["used"] == 0 and st_["metadata_pages"] == 0, st_
                assert self.pool.check()["clean"]
        finally:
            try:
                if getattr(self, "pool", None) is not None and not self.pool.closed:
                    self.pool.close()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)


def machine(mode: str, bs: int, lo: int, hi: int, examples: int, steps: int, pool_size: int = POOL_SIZE):
    name = f"{mode.upper()}{bs >> 10}K_{lo}_{hi}_{pool_size >> 20}M"
    attrs = {"MODE": mode, "BS": bs, "MIN_BLOCKS": lo, "MAX_BLOCKS": hi, "POOL": pool_size,
             "FULL": pool_size < POOL_SIZE}
    if attrs["FULL"]:  # big random writes, to fill the pool
        attrs["SHAPES"] = SHAPES + ["whole"] * 4 + ["blocks"] * 2
        attrs["KINDS"] = ["random"] * 6 + ["zero"]
    cls = type(name, (EngineMachine,), attrs)
    case = cls.TestCase
    case.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                             derandomize=DERANDOMIZE, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return case


TestRow4K = machine("row", 4 << 10, 8, 64, 60, 50)
TestRow16K = machine("row", 16 << 10, 8, 48, 50, 50)
TestRow64K = machine("row", 64 << 10, 8, 32, 50, 50)
TestCow4K = machine("cow", 4 << 10, 8, 64, 60, 50)
TestCow16K = machine("cow", 16 << 10, 8, 48, 50, 50)
TestCow64K = machine("cow", 64 << 10, 8, 32, 50, 50)
# more than one leaf page of the map (1024 entries per leaf)
TestRowMultiLeaf = machine("row", 4 << 10, PAGE_ENTRIES + 8, 2 * PAGE_ENTRIES + 200, 20, 40)
TestCowMultiLeaf = machine("cow", 4 << 10, PAGE_ENTRIES + 8, 2 * PAGE_ENTRIES + 200, 20, 40)
# a 16 MiB pool (15 MiB usable) that snapshots, clones and rewrites fill up: ENOSPC
# must leave every snapshot intact, the pool clean, and operations whole or undone
TestRowFullPool = machine("row", 64 << 10, 48, 128, 30, 50, pool_size=16 << 20)
TestCowFullPool = machine("cow", 64 << 10, 48, 128, 50, 60, pool_size=16 << 20)
