#!/usr/bin/env python3
"""The engine's own CPU time per ROW write request, with the data store stubbed out.

Through FUSE a ROW first write pays, per request, the store write (as every target
does) plus the engine's Python work; this measures the second part alone, on the
request shapes a loop device sends for `dd bs=1M`: two 512 KiB requests per MiB,
either block-aligned or cut inside a block (520 + 504 KiB, the common case: the
block holding the cut is written by both). Pool on /dev/shm, 64 KiB blocks, a new
volume per round (first writes), median and best of the rounds after two warm-ups.

Usage: python tools/bench_write_path.py [--mib 256] [--rounds 8] [--json]
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import blocksnap

MiB = 1 << 20
KiB = 1 << 10


def per_request(mib: int, rounds: int, cut: int) -> list[float]:
    """Seconds per request of each round, writing `mib` MiB as pairs cut at `cut`."""
    root = tempfile.mkdtemp(prefix="bench-write-path-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        pool = blocksnap.Pool.create(os.path.join(root, "pool"), size=4 * mib * MiB)
        pool.store.pwrite = lambda data, offset: None          # the engine's work only
        pool.store.pwritev = lambda pieces, offset: None
        pool._punch = lambda starts, units: None
        data = memoryview(bytearray(os.urandom(MiB)))
        out = []
        for r in range(rounds):
            vol = pool.create_volume(f"v{r}", size=mib * MiB)
            t = time.perf_counter()
            for i in range(mib):
                vol.write(i * MiB, data[:cut])
                vol.write(i * MiB + cut, data[cut:])
            out.append((time.perf_counter() - t) / (2 * mib))
            vol.delete()
            pool.commit()
        pool.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {}
    for name, cut in (("aligned_512K", 512 * KiB), ("cut_520K_504K", 520 * KiB)):
        runs = per_request(args.mib, max(args.rounds, 3), cut)[2:]
        res[name] = {"median_us": statistics.median(runs) * 1e6, "best_us": min(runs) * 1e6}
    res["cut_over_aligned"] = res["cut_520K_504K"]["median_us"] / res["aligned_512K"]["median_us"]
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print("| request shape | engine CPU per request (median) | best |")
    print("|---|---|---|")
    for name in ("aligned_512K", "cut_520K_504K"):
        print(f"| {name} | {res[name]['median_us']:.0f} us | {res[name]['best_us']:.0f} us |")
    print(f"\ncut / aligned = {res['cut_over_aligned']:.2f}")


if __name__ == "__main__":
    main()
