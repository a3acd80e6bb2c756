#!/usr/bin/env python3
"""The engine's read path, warm, with 1, 2 and 4 reader threads, side by side.

One ROW volume is filled with random data and read back in 512 KiB requests (what
the FUSE daemon gets from a loop device) by N threads at once, each over its own
part of the volume, with the data store in the page cache. Three readers, each
in its own process, on the same pool:

  raw preadv        os.preadv of the pool's data file: no map, no checksum (ceiling)
  compiled          vol.read_into with store/_blockread.c (the GIL released)
  python            vol.read_into with BLOCKSNAP_PURE_PYTHON=1 (blockio's Python path)

Reported: the best of the rounds in MB/s, CPU seconds per GB, and compiled
against python and against raw. Usage: tools/bench_read.py [--size 512M] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from blocksnap.units import parse_size

REQUEST = 512 << 10
THREADS = (1, 2, 4)


def fill(pool_dir: str, size: int) -> None:
    import numpy as np

    from blocksnap.engine.pool import Pool
    pool = Pool.create(pool_dir, size=size * 2)
    vol = pool.create_volume("v", size=size)
    chunk = np.random.default_rng(1).integers(0, 256, 4 << 20, np.uint8).tobytes()
    for off in range(0, size, len(chunk)):
        vol.write(off, chunk)
    pool.close()


def measure(read_part, size: int, threads: int, repeat: int) -> tuple[float, float]:
    """Best MB/s over the rounds, and CPU seconds per GB in that round."""
    best, cpu = 0.0, 0.0
    for _ in range(repeat):
        parts = [threading.Thread(target=read_part, args=(i * size // threads, (i + 1) * size // threads))
                 for i in range(threads)]
        c0, t0 = os.times(), time.perf_counter()
        for t in parts:
            t.start()
        for t in parts:
            t.join()
        dt, c1 = time.perf_counter() - t0, os.times()
        if size / dt / 1e6 > best:
            best = size / dt / 1e6
            cpu = (c1.user - c0.user + c1.system - c0.system) / (size / 1e9)
    return best, cpu


def child(mode: str, pool_dir: str, size: int, repeat: int) -> dict:
    """One reader, in this process (BLOCKSNAP_PURE_PYTHON, read as the pool opens, picks the read path)."""
    from blocksnap.engine.pool import Pool
    from blocksnap.store import filestore
    if mode == "compiled" and filestore._blockread is None:
        raise SystemExit("the compiled read path is not built (see setup.py)")
    pool = Pool.open(pool_dir)
    vol = pool.volume("v")
    if mode == "raw":
        fd = pool.store.fd

        def read_part(lo: int, hi: int) -> None:
            buf = memoryview(bytearray(REQUEST))
            for off in range(lo, hi, REQUEST):   # the volume's blocks sit in order in the store
                os.preadv(fd, [buf], off + base)
        ptrs, _ = pool.maps.get_range(vol.tree, 0, 1)
        base = int(ptrs[0]) * 4096
    else:
        def read_part(lo: int, hi: int) -> None:
            buf = memoryview(bytearray(REQUEST))
            for off in range(lo, hi, REQUEST):
                vol.read_into(off, buf)
    read_part(0, size)   # warm the page cache
    out = {str(n): measure(read_part, size, n, repeat) for n in THREADS}
    pool.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = parse_size(args.size)
    if args.child:
        print(json.dumps(child(args.child, args.pool, size, args.repeat)))
        return
    work = tempfile.mkdtemp(prefix="bench-read-", dir="/var/tmp")
    try:
        pool_dir = os.path.join(work, "pool")
        fill(pool_dir, size)
        res = {}
        for mode in ("raw", "compiled", "python"):
            env = dict(os.environ, **({"BLOCKSNAP_PURE_PYTHON": "1"} if mode == "python" else {}))
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--pool", pool_dir, "--size", args.size,
                                  "--repeat", str(args.repeat)], env=env, check=True, capture_output=True, text=True)
            res[mode] = json.loads(out.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"warm reads of a {args.size} ROW volume in {REQUEST >> 10} KiB requests, best of {args.repeat}")
    print("| threads | raw preadv MB/s | compiled MB/s | python MB/s | compiled vs python | compiled vs raw "
          "| CPU s/GB raw, compiled, python |")
    print("|---|---|---|---|---|---|---|")
    for n in map(str, THREADS):
        (r, rc), (c, cc), (p, pc) = res["raw"][n], res["compiled"][n], res["python"][n]
        print(f"| {n} | {r:.0f} | {c:.0f} | {p:.0f} | {c / p:.2f}x | {c / r:.2f}x | {rc:.2f}, {cc:.2f}, {pc:.2f} |")


if __name__ == "__main__":
    main()
