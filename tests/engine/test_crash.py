"""Crash safety (DESIGN.md "Guarantees"): flushed writes and created snapshots survive
kill -9 at any instant and a power cut at any I/O; after the crash the pool opens,
`check` is clean and every snapshot reads back exactly what it held.

a) kill -9: a writer process (crash_writer.py) runs a seeded random workload of
   writes, discards, flushes, snapshots, snapshot deletes and rollbacks on ROW and COW
   volumes and reports each completed operation on stdout; the test kills it with
   SIGKILL at a random instant, reopens the pool and judges it with the model of
   workload.py. The runs chain on one pool: each recovery is the next run's start.
b) power cut: FaultyFileStore (faulty.py) counts every pwrite, fsync, hole punch and
   catalog commit; the test cuts the power at the N-th one for N over the whole
   workload (or a large sample), drops the pool without committing, throws away
   all, or a random torn subset, of the writes not yet fsynced, and judges the
   reopened pool the same way.
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import blocksnap

from .faulty import PowerCut, install
from .workload import CrashModel, VolSpec, VolState, apply, gen_data, make_ops

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_writer.py")
POOL_SIZE = 96 << 20
# fixed by default (the same runs every time); set another value to explore
SEED = os.environ.get("BLOCKSNAP_TEST_SEED", "0")

# volumes per mode: (name, mode, block size, blocks); r4/c4 span two map leaf pages
LAYOUTS = {
    "row": [("r64", "row", 64 << 10, 24), ("r4", "row", 4 << 10, 1100)],
    "cow": [("c16", "cow", 16 << 10, 48), ("c4", "cow", 4 << 10, 1100)],
    "mixed": [("r16", "row", 16 << 10, 40), ("c64", "cow", 64 << 10, 16)],
}


def build_pool(path: str, layout, seed: int) -> CrashModel:
    """A pool with the layout's volumes, some data, flushed, and one snapshot each."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    states = {}
    with blocksnap.Pool.create(path, size=POOL_SIZE) as pool:
        for name, mode, bs, nb in layout:
            size = nb * bs
            content = bytearray(size)
            for b in range(nb):
                if rng.random() < 0.4:
                    content[b * bs:(b + 1) * bs] = gen_data("random", rng.randrange(1 << 32), bs)
            if mode == "row":
                vol = pool.create_volume(name, size=size, mode="row", block_size=bs)
                for b in range(nb):
                    chunk = content[b * bs:(b + 1) * bs]
                    if any(chunk):
                        vol.write(b * bs, chunk)
            else:
                origin = os.path.join(os.path.dirname(path), f"{name}.img")
                with open(origin, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                vol = pool.create_volume(name, mode="cow", origin=origin, block_size=bs)
            vol.flush()
            vol.snapshot("base")
            st = VolState(VolSpec(name, mode, size, bs), content)
            st.snaps["base"] = bytes(content)
            states[name] = st
    return CrashModel(states)


def check_clean(pool) -> None:
    rep = pool.check()
    assert rep["clean"], rep["errors"]


def empty_everything(path: str) -> None:
    """Delete every volume: all space and all map pages must come back."""
    with blocksnap.Pool.open(path) as pool:
        for v in pool.volumes():
            v.delete(recursive=True)
    with blocksnap.Pool.open(path) as pool:
        st = pool.status()
        assert st["used"] == 0 and st["metadata_pages"] == 0, st
        check_clean(pool)


# -- a) kill -9 ---------------------------------------------------------------------

def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("the writer did not start in time")
    return proc.stdout.readline()


@pytest.mark.slow
@pytest.mark.parametrize("mode,runs", [("row", 16), ("cow", 16), ("mixed", 16)])
def test_kill9_at_random_instants(tmp_path, mode, runs):
    rng = random.Random(f"kill9-{mode}-{SEED}")
    path = str(tmp_path / "pool")
    build_pool(path, LAYOUTS[mode], rng.randrange(1 << 32))
    counter = [0]
    outcomes = {"finished": 0, "killed": 0}
    for run in range(runs):
        with blocksnap.Pool.open(path) as pool:
            model = CrashModel.from_pool(pool)
        ops = make_ops(rng, 120, model.specs(), model.snapshot_names(), counter)
        ops_file = tmp_path / f"ops{run}.json"
        ops_file.write_text(json.dumps(ops))
        err_file = tmp_path / f"stderr{run}.txt"
        with open(err_file, "wb") as err:
            proc = subprocess.Popen([sys.executable, WRITER, path, str(ops_file)],
                                    stdout=subprocess.PIPE, stderr=err)
        try:
            first = _read_line(proc, 30)
            assert first == b"ready\n", (first, err_file.read_text())
            # kill at a random instant: after a random number of completed operations
            # plus a random delay that lands inside one (a few runs finish first)
            target = rng.randrange(len(ops) + len(ops) // 10)
            out = b""
            while target < len(ops):
                line = _read_line(proc, 30)
                out += line
                if not line or line == b"end\n" or int(line) >= target:
                    break
            time.sleep(rng.uniform(0.0, 0.004))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            out += proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        lines = out.decode().split()
        finished = "end" in lines
        if not finished:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err_file.read_text())
        done = [int(x) for x in lines if x.isdigit()]
        assert done == list(range(len(done)))
        outcomes["finished" if finished else "killed"] += 1
        model.replay(ops, len(done), in_flight=not finished)
        with blocksnap.Pool.open(path) as pool:
            check_clean(pool)
            # blocks the killed transaction wrote are free again, and so is their host space
            st = pool.status()
            assert st["host_allocated"] <= st["used"] + 256 * 1024, st
            try:
                model.verify(pool)
            except AssertionError as e:
                raise AssertionError(f"run {run}: killed after op {len(done)} of {len(ops)} "
                                     f"({ops[len(done)] if len(done) < len(ops) else 'end'}): {e}") from None
    assert outcomes["killed"] >= runs // 2, outcomes
    empty_everything(path)


# -- b) power cut -------------------------------------------------------------------

def _run_until_cut(pool, ops) -> tuple[int, bool]:
    """(operations completed, whether the power was cut)."""
    done = 0
    try:
        for op in ops:
            apply(pool, op)
            done += 1
    except PowerCut:
        return done, True
    return done, False


@pytest.mark.slow
@pytest.mark.parametrize("mode,points", [("row", 110), ("cow", 110), ("mixed", 110)])
def test_power_cut_at_every_io(fast_tmp_path, monkeypatch, mode, points):
    tmp_path = fast_tmp_path  # the medium does not matter: the power cut is simulated
    disk = install(monkeypatch)
    rng = random.Random(f"power-{mode}-{SEED}")
    seed = rng.randrange(1 << 32)
    model0 = build_pool(str(tmp_path / "dry" / "pool"), LAYOUTS[mode], seed)
    ops = make_ops(rng, 45, model0.specs(), model0.snapshot_names(), [0])

    # dry run: how many I/O calls does the workload make?
    with blocksnap.Pool.open(str(tmp_path / "dry" / "pool")) as pool:
        disk.arm(None)
        done, cut = _run_until_cut(pool, ops)
        total = disk.calls
    disk.reset()
    assert done == len(ops) and not cut
    assert total > 50, total
    shutil.rmtree(tmp_path / "dry")

    if total <= points:
        cut_points = list(range(1, total + 1))
    else:
        cut_points = sorted(rng.sample(range(1, total + 1), points - 2) + [1, total])
    where = {}
    for n in cut_points:
        d = tmp_path / f"cut{n}"
        path = str(d / "pool")
        disk.reset()
        model = build_pool(path, LAYOUTS[mode], seed)
        pool = blocksnap.Pool.open(path)
        disk.arm(n)
        done, cut = _run_until_cut(pool, ops)
        assert cut, f"no cut at I/O {n} of {total}"
        cut_where = disk.where
        where[cut_where.split(" ")[0]] = where.get(cut_where.split(" ")[0], 0) + 1
        pool.abandon()
        revert = "all" if n % 3 == 0 else "random"
        disk.armed = False
        disk.is_cut = False
        disk.revert(rng, revert)
        disk.reset()
        model.replay(ops, done, in_flight=True)
        desc = f"power cut at I/O {n}/{total} ({cut_where}) during op {done} {ops[done]}, revert={revert}"
        if n % 4 == 1:
            # and again while the next open recovers (orphan pages, host space reclaim)
            disk.arm(rng.randint(1, 3))
            try:
                blocksnap.Pool.open(path).abandon()
            except PowerCut:
                pass
            disk.armed = False
            disk.is_cut = False
            disk.revert(rng, "random")
            disk.reset()
            desc += ", and again during recovery"
        with blocksnap.Pool.open(path) as pool:
            rep = pool.check()
            assert rep["clean"], f"{desc}: {rep['errors']}"
            try:
                model.verify(pool)
            except AssertionError as e:
                raise AssertionError(f"{desc}: {e}") from None
        shutil.rmtree(d)
    # the cut points covered writes, syncs and both sides of catalog commits
    assert {"pwrite", "fsync", "catalog"} <= set(where), where
