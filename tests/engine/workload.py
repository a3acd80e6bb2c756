"""A seeded random workload for crash tests, and the model that judges what survives.

The parent generates the operations (plain dicts, JSON-friendly), the writer (a child
process, or the test itself for the power-cut tests) applies them to a real pool with
`apply`, and the parent replays them on a `CrashModel`: ops before the crash are
complete, at most one op was in flight. After the crash the pool must hold:

- every snapshot whose creation completed (and was not deleted), byte for byte; the
  snapshot being created or deleted at the crash may or may not exist, and if it
  exists it is exact;
- for the live volume, per 512-byte sector, a value the sector had at the volume's
  last completed flush/snapshot/rollback or any value written to it since. Anything
  older means a flushed write was lost. (A sector, not a block, for ROW too: a small
  write into a block only the live map reaches is written in place, and a disk's
  volatile cache keeps or loses each sector of it on its own; COW origins are
  written in place anyway.)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import xxhash

SECTOR = 512
MAX_SNAPS = 6


def gen_data(kind: str, seed: int, n: int) -> bytes:
    if kind == "zero":
        return bytes(n)
    r = random.Random(seed)
    if kind == "fill":
        return bytes([r.randrange(1, 256)]) * n
    return r.randbytes(n)


def digest(b: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(b)


@dataclass
class VolSpec:
    name: str
    mode: str
    size: int
    block_size: int


def make_ops(rng: random.Random, n: int, vols: list[VolSpec], snaps: dict[str, list[str]],
             counter: list[int]) -> list[dict]:
    """n operations; `snaps` (existing snapshot names per volume) and `counter` (for
    unique snapshot names) are updated as if every op completed."""
    ops = []
    snaps = {k: list(v) for k, v in snaps.items()}
    for _ in range(n):
        v = rng.choice(vols)
        have = snaps.setdefault(v.name, [])
        bs, size = v.block_size, v.size
        nb = -(-size // bs)
        k = rng.random()
        if k < 0.50:
            shape = rng.random()
            if shape < 0.5:      # whole blocks
                b = rng.randrange(nb)
                off, length = b * bs, min(rng.randint(1, 4) * bs, size - b * bs)
            elif shape < 0.7:    # unaligned, inside or across blocks
                off = rng.randrange(size)
                length = rng.randint(1, min(size - off, 2 * bs))
            elif shape < 0.85:   # whole 4 KiB units, as a database or a VM writes (in place)
                off = rng.randrange(size // 4096) * 4096
                length = min(4096 * rng.randint(1, 4), size - off)
            else:                # sectors
                off = rng.randrange(size // SECTOR) * SECTOR
                length = min(SECTOR * rng.randint(1, 16), size - off)
            kind = rng.choice(["random", "random", "random", "fill", "zero"])
            ops.append({"op": "write", "vol": v.name, "off": off, "len": length, "kind": kind,
                        "seed": rng.randrange(1 << 32)})
        elif k < 0.58:
            off = rng.randrange(size)
            length = rng.randint(1, min(size - off, 4 * bs))
            ops.append({"op": "discard", "vol": v.name, "off": off, "len": length})
        elif k < 0.72:
            ops.append({"op": "flush", "vol": v.name})
        elif k < 0.84 and len(have) < MAX_SNAPS:
            counter[0] += 1
            name = f"k{counter[0]}"
            have.append(name)
            ops.append({"op": "snapshot", "vol": v.name, "name": name})
        elif k < 0.95 and have:
            name = rng.choice(have)
            have.remove(name)
            ops.append({"op": "delete", "vol": v.name, "name": name})
        elif have:
            ops.append({"op": "rollback", "vol": v.name, "name": rng.choice(have)})
        else:
            ops.append({"op": "flush", "vol": v.name})
    return ops


def apply(pool, op: dict) -> None:
    vol = pool.volume(op["vol"])
    kind = op["op"]
    if kind == "write":
        vol.write(op["off"], gen_data(op["kind"], op["seed"], op["len"]))
    elif kind == "discard":
        vol.discard(op["off"], op["len"])
    elif kind == "flush":
        vol.flush()
    elif kind == "snapshot":
        vol.snapshot(op["name"])
    elif kind == "delete":
        vol.get_snapshot(op["name"]).delete()
    elif kind == "rollback":
        vol.rollback(op["name"])
    else:
        raise ValueError(kind)


@dataclass
class VolState:
    spec: VolSpec
    data: bytearray
    snaps: dict[str, bytes] = field(default_factory=dict)
    allowed: list[set[bytes]] = field(default_factory=list)
    maybe_snap: tuple[str, bytes] | None = None     # being created at the crash
    maybe_gone: str | None = None                   # being deleted at the crash

    @property
    def unit(self) -> int:
        return SECTOR

    def units(self, data: bytes | bytearray) -> list[bytes]:
        u = self.unit
        return [digest(memoryview(data)[i:i + u]) for i in range(0, len(data), u)]

    def durable(self) -> None:
        self.allowed = [{d} for d in self.units(self.data)]

    def touched(self, off: int, length: int) -> None:
        u = self.unit
        for i in range(off // u, -(-(off + length) // u)):
            self.allowed[i].add(digest(memoryview(self.data)[i * u:(i + 1) * u]))


class CrashModel:
    def __init__(self, states: dict[str, VolState]):
        self.vols = states
        for s in states.values():
            s.durable()

    @classmethod
    def from_pool(cls, pool) -> CrashModel:
        """The pool as it is now (after a verified recovery): the new baseline."""
        states = {}
        for v in pool.volumes():
            spec = VolSpec(v.name, v.mode, v.size, v.block_size)
            st = VolState(spec, bytearray(v.read(0, v.size)))
            for s in v.snapshots():
                st.snaps[s.name] = s.read(0, s.size)
            states[v.name] = st
        return cls(states)

    def snapshot_names(self) -> dict[str, list[str]]:
        return {n: list(s.snaps) for n, s in self.vols.items()}

    def specs(self) -> list[VolSpec]:
        return [s.spec for s in self.vols.values()]

    def replay(self, ops: list[dict], completed: int, in_flight: bool) -> None:
        """ops[:completed] returned; ops[completed] was running at the crash if in_flight."""
        for op in ops[:completed]:
            self._effects(op)
            self._complete(op)
        if in_flight and completed < len(ops):
            op = ops[completed]
            st = self.vols[op["vol"]]
            if op["op"] == "snapshot":
                st.maybe_snap = (op["name"], bytes(st.data))
            elif op["op"] == "delete":
                st.maybe_gone = op["name"]
            self._effects(op)

    def _effects(self, op: dict) -> None:
        st = self.vols[op["vol"]]
        kind = op["op"]
        if kind == "write":
            st.data[op["off"]:op["off"] + op["len"]] = gen_data(op["kind"], op["seed"], op["len"])
            st.touched(op["off"], op["len"])
        elif kind == "discard":
            st.data[op["off"]:op["off"] + op["len"]] = bytes(op["len"])
            st.touched(op["off"], op["len"])
        elif kind == "rollback":
            st.data = bytearray(st.snaps[op["name"]])
            st.touched(0, len(st.data))

    def _complete(self, op: dict) -> None:
        st = self.vols[op["vol"]]
        kind = op["op"]
        if kind == "snapshot":
            st.snaps[op["name"]] = bytes(st.data)
        elif kind == "delete":
            del st.snaps[op["name"]]
        if kind in ("flush", "snapshot", "rollback"):
            st.durable()

    def verify(self, pool) -> None:
        """Raise AssertionError if the reopened pool breaks a guarantee."""
        assert sorted(v.name for v in pool.volumes()) == sorted(self.vols)
        for name, st in self.vols.items():
            vol = pool.volume(name)
            assert vol.size == len(st.data)
            got = vol.read(0, vol.size)
            for i, d in enumerate(st.units(got)):
                if d not in st.allowed[i]:
                    u = st.unit
                    model_now = digest(st.data[i * u:(i + 1) * u]) == d
                    raise AssertionError(
                        f"{name}: unit {i} (offset {i * u}, {u} bytes) holds a value it never had "
                        f"since the last flush (matches latest write: {model_now}): flushed data lost")
            present = [s.name for s in vol.snapshots()]
            expect = [n for n in st.snaps]
            optional = set()
            if st.maybe_gone is not None:
                optional.add(st.maybe_gone)
            if st.maybe_snap is not None:
                optional.add(st.maybe_snap[0])
            missing = [n for n in expect if n not in present and n not in optional]
            assert not missing, f"{name}: snapshots {missing} were created and are gone"
            extra = [n for n in present if n not in expect and n not in optional]
            assert not extra, f"{name}: snapshots {extra} should not exist"
            for sname in present:
                want = st.maybe_snap[1] if (st.maybe_snap and sname == st.maybe_snap[0]) else st.snaps[sname]
                snap = vol.get_snapshot(sname)
                assert snap.size == len(want), (name, sname)
                got = snap.read(0, snap.size)
                if got != want:
                    bad = next(i for i in range(len(got)) if got[i] != want[i])
                    raise AssertionError(f"snapshot {name}@{sname} differs at byte {bad}")
