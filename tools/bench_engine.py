#!/usr/bin/env python3
"""Engine benchmarks, reported as ratios measured side by side in one run.

  snapshot create: 1 GiB vs 16 TiB volume, 2 vs 1,000 existing snapshots
  write throughput: engine vs plain pwrite+fsync on a file in the same directory
  COW: bytes copied per overwritten block with 50 snapshots
  ROW vs COW: cost of the first and the second overwrite after a snapshot
  many snapshots: random 64 KiB writes on an 8 GiB ROW volume after 3 vs 300
    snapshots, each taken after a batch of such writes (--only many-snapshots)

Usage: python tools/bench_engine.py [--dir DIR] [--mib 256] [--json] [--only many-snapshots]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blocksnap

MiB = 1 << 20


def timed(fn, repeat: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def snapshot_cost(pool, vol, n: int) -> float:
    """Median time of n 'write one block + snapshot' rounds (snapshot part only)."""
    times = []
    bs = vol.block_size
    for i in range(n):
        vol.write((i * 7919 % max(1, vol.size // bs - 1)) * bs, os.urandom(bs))
        t = time.perf_counter()
        vol.snapshot(f"b{len(vol.snapshot_rows)}")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_snapshot_size(root: str) -> dict:
    with blocksnap.Pool.create(os.path.join(root, "p-size"), size=4 << 30) as pool:
        small = pool.create_volume("small", size=1 << 30)
        huge = pool.create_volume("huge", size=16 << 40)
        for v in (small, huge):  # data spread over the whole volume
            for k in range(64):
                v.write((v.size // 64) * k, os.urandom(v.block_size))
            v.flush()
        t_small = snapshot_cost(pool, small, 30)
        t_huge = snapshot_cost(pool, huge, 30)
    return {"snapshot_1GiB_ms": t_small * 1e3, "snapshot_16TiB_ms": t_huge * 1e3,
            "ratio_16TiB_over_1GiB": t_huge / t_small}


def bench_qcow2_snapshot_size(root: str) -> dict:
    """Reference: qemu-img internal snapshots of a qcow2 at 1 GiB and 16 TiB."""
    import subprocess
    if not shutil.which("qemu-img"):
        return {}
    out = {}
    for label, size in (("1GiB", "1G"), ("16TiB", "16T")):
        img = os.path.join(root, f"ref-{label}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, size], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", img], check=True, capture_output=True)
        times = []
        for i in range(10):
            t = time.perf_counter()
            subprocess.run(["qemu-img", "snapshot", "-c", f"s{i}", img], check=True)
            times.append(time.perf_counter() - t)
        out[f"qcow2_snapshot_{label}_ms"] = statistics.median(times) * 1e3
        os.unlink(img)
    out["qcow2_ratio_16TiB_over_1GiB"] = out["qcow2_snapshot_16TiB_ms"] / out["qcow2_snapshot_1GiB_ms"]
    return out


def bench_snapshot_count(root: str) -> dict:
    with blocksnap.Pool.create(os.path.join(root, "p-count"), size=4 << 30) as pool:
        v = pool.create_volume("v", size=1 << 30)
        snapshot_cost(pool, v, 2)
        t2 = snapshot_cost(pool, v, 20)
        while len(v.snapshot_rows) < 1000:
            v.snapshot(f"fill{len(v.snapshot_rows)}")
        t1000 = snapshot_cost(pool, v, 20)
    return {"snapshot_with_2_ms": t2 * 1e3, "snapshot_with_1000_ms": t1000 * 1e3,
            "ratio_1000_over_2": t1000 / t2}


def bench_write(root: str, mib: int, io: int = MiB) -> dict:
    data = os.urandom(io)
    n = mib * MiB // io
    path = os.path.join(root, "plain.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, mib * MiB)

    def plain():
        for i in range(n):
            os.pwrite(fd, data, i * io)
        os.fsync(fd)
    t_plain = timed(plain)
    os.close(fd)
    os.unlink(path)
    with blocksnap.Pool.create(os.path.join(root, "p-write"), size=(mib * 3) * MiB) as pool:
        v = pool.create_volume("v", size=mib * MiB)

        def engine():
            for i in range(n):
                v.write(i * io, data)
            v.flush()
        t_first = timed(engine)
        v.snapshot("s")
        t_over = timed(engine)
        t = time.perf_counter()
        for i in range(n):
            v.read(i * io, io)
        t_read = time.perf_counter() - t
    mbps = lambda t: mib / t  # noqa: E731
    return {"plain_pwrite_MBps": mbps(t_plain), "engine_first_write_MBps": mbps(t_first),
            "engine_overwrite_after_snapshot_MBps": mbps(t_over), "engine_read_MBps": mbps(t_read),
            "ratio_engine_over_plain": t_plain / t_first}


def bench_cow_copies(root: str, nsnap: int = 50, nblocks: int = 256) -> dict:
    """Bytes copied into the pool per overwritten block, 50 snapshots, on an origin
    four times larger than the overwritten region: scattered order (no copy-ahead)
    and one sequential stream (copy-ahead may preserve blocks past its end)."""
    import random
    bs = 64 << 10
    out = {"cow_snapshots": nsnap, "cow_blocks_overwritten": nblocks,
           "classic_lvm_would_copy_per_block": float(nsnap)}
    for order in ("scattered", "sequential"):
        origin = os.path.join(root, f"origin-{order}.img")
        with open(origin, "wb") as f:
            f.write(os.urandom(4 * nblocks * bs))
        with blocksnap.Pool.create(os.path.join(root, f"p-cow-{order}"), size=1 << 30) as pool:
            v = pool.create_volume("c", mode="cow", origin=origin, block_size=bs)
            for i in range(nsnap):
                v.snapshot(f"s{i}")
            before = pool.status()["used"]
            blocks = list(range(nblocks))
            if order == "scattered":
                blocks = [b * 4 for b in blocks]
                random.Random(1).shuffle(blocks)
            for b in blocks:
                v.write(b * bs, os.urandom(bs))
            v.flush()
            copied = pool.status()["used"] - before
        out[f"cow_copied_per_overwritten_block_{order}"] = copied / (nblocks * bs)
    return out


def bench_overwrite(root: str, mib: int) -> dict:
    bs = 64 << 10
    io = MiB
    n = mib * MiB // io
    out = {}
    origin = os.path.join(root, "origin2.img")
    with open(origin, "wb") as f:
        f.truncate(mib * MiB)
    with blocksnap.Pool.create(os.path.join(root, "p-ow"), size=(mib * 4) * MiB) as pool:
        row = pool.create_volume("r", size=mib * MiB, block_size=bs)
        cow = pool.create_volume("c", mode="cow", origin=origin, block_size=bs)
        for name, v in (("row", row), ("cow", cow)):
            data = os.urandom(io)
            for i in range(n):
                v.write(i * io, data)
            v.flush()
            v.snapshot("s")

            def over(v=v):
                for i in range(n):
                    v.write(i * io, os.urandom(io))
                v.flush()
            out[f"{name}_first_overwrite_s"] = timed(over)
            out[f"{name}_second_overwrite_s"] = timed(over)
    out["cow_over_row_first"] = out["cow_first_overwrite_s"] / out["row_first_overwrite_s"]
    out["cow_over_row_second"] = out["cow_second_overwrite_s"] / out["row_second_overwrite_s"]
    return out


def bench_many_snapshots(root: str, counts=(3, 300), writes: int = 16384, per_snap: int = 64,
                         rounds: int = 3) -> dict:
    """Time of `writes` random 64 KiB writes (then a flush) on an 8 GiB ROW volume
    that has `count` snapshots, each taken after `per_snap` such writes (so the
    snapshots' maps differ, as daily snapshots of a busy disk do). The volume's data
    is the same size for every count; median of `rounds` timed passes, each on
    blocks none of the snapshots shares any more after the first pass.

    As root, the page cache is dropped before each pass (after a flush, untimed):
    a pass writes 1 GiB through it, and without that a pass took 0.7 s or 3.4 s
    by whether the kernel had free pages or had to reclaim the last pass's first,
    whatever the snapshot count (docs/performance.md)."""
    import random

    from bench_fuse import drop_caches
    bs, size = 64 << 10, 8 << 30
    nb = size // bs
    out = {}
    for count in counts:
        rng = random.Random(5)
        with blocksnap.Pool.create(os.path.join(root, f"p-snaps-{count}"), size=size * 2) as pool:
            v = pool.create_volume("v", size=size, block_size=bs)
            data = os.urandom(bs)
            for i in range(count):
                for _ in range(per_snap):
                    v.write(rng.randrange(nb) * bs, data)
                v.snapshot(f"s{i}")
            times = []
            for _ in range(rounds):
                offs = [rng.randrange(nb) * bs for _ in range(writes)]

                def go(offs=offs, v=v, data=data):
                    for o in offs:
                        v.write(o, data)
                    v.flush()
                v.flush()
                if os.geteuid() == 0:
                    drop_caches()
                times.append(timed(go))
            out[f"writes_{count}_snapshots_s"] = statistics.median(times)
        shutil.rmtree(os.path.join(root, f"p-snaps-{count}"), ignore_errors=True)
    lo, hi = min(counts), max(counts)
    out[f"ratio_{hi}_over_{lo}_snapshots"] = out[f"writes_{hi}_snapshots_s"] / out[f"writes_{lo}_snapshots_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--mib", type=int, default=256, help="data size for throughput runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=["many-snapshots"], help="run just this part")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-engine-", dir=args.dir or "/var/tmp")
    try:
        res = {}
        parts = [lambda: bench_snapshot_size(root), lambda: bench_qcow2_snapshot_size(root),
                 lambda: bench_snapshot_count(root),
                 lambda: bench_write(root, args.mib), lambda: bench_cow_copies(root),
                 lambda: bench_overwrite(root, args.mib), lambda: bench_many_snapshots(root)]
        if args.only == "many-snapshots":
            parts = parts[-1:]
        for part in parts:
            res.update(part())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        width = max(len(k) for k in res)
        for k, v in res.items():
            print(f"{k:{width}}  {v:10.3f}" if isinstance(v, float) else f"{k:{width}}  {v:10}")


if __name__ == "__main__":
    main()
