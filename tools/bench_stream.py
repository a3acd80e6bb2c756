#!/usr/bin/env python3
"""send/receive against the zstd command line on the same data, same machine, same run.

A ROW volume is filled with a mix (half random data, a quarter compressible text,
a quarter holes) and snapshotted as s1; then a tenth of its blocks are rewritten
and it is snapshotted as s2. Measured, each as the median of the rounds:

  send full      blocksnap send v@s1 -o FILE      vs  zstd -3 -T1 of the exported raw image
  receive full   blocksnap receive w -i FILE      vs  zstd -d of that file to a sparse image
  send incr.     blocksnap send v@s2 --from v@s1  (against the full send: size and time)
  receive incr.  blocksnap receive w (on top of s1)

zstd gets the easier job: no checksums and no metadata. It also never skips the
image's holes, so it reads (and compresses) their zeros. Its decompression is
followed by an fsync, because a receive makes its snapshot durable. Ratios above
1 favour blocksnap. As root it pauses a VM's free page reporting while it runs
(tools/steady_memory.py). Usage: tools/bench_stream.py [--size 512M] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(REPO, "src"))

import blocksnap  # noqa: E402
from blocksnap.units import format_size, parse_size  # noqa: E402
from steady_memory import steady_memory  # noqa: E402

M = 1 << 20
BS = 64 << 10


def cli(pool: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "blocksnap", "-q", "--pool", pool, *args], check=True)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_source(work: str, size: int, changed: float = 0.1) -> str:
    """The pool with v@s1 (the mix) and v@s2 (`changed` of the blocks rewritten, a tenth by default)."""
    rng = random.Random(1)
    text = b"".join(b"%08d the quick brown fox jumps over the lazy dog; " % i for i in range(2000))
    path = os.path.join(work, "src")
    with blocksnap.Pool.create(path, size=3 * size) as pool:
        v = pool.create_volume("v", size=size, block_size=BS)
        for off in range(0, size, 4 * M):   # per 4 MiB: 2 random, 1 text, 1 hole
            v.write(off, rng.randbytes(2 * M))
            v.write(off + 2 * M, (text * (M // len(text) + 1))[:M])
        v.snapshot("s1")
        for b in rng.sample(range(size // BS), int(size // BS * changed)):
            v.write(b * BS, rng.randbytes(BS))
        v.snapshot("s2")
    return path


def unzstd(zst: str, out: str) -> None:
    """zstd -d, then fsync: a receive makes its snapshot durable, so the reference does too."""
    subprocess.run(["zstd", "-q", "-d", "--sparse", zst, "-o", out], check=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def round_(work: str, src: str, r: int) -> dict[str, float]:
    d = os.path.join(work, f"r{r}")
    os.makedirs(d)
    full, inc = os.path.join(d, "full.bs"), os.path.join(d, "inc.bs")
    raw, zst, back = os.path.join(d, "raw.img"), os.path.join(d, "raw.zst"), os.path.join(d, "back.img")
    dst = os.path.join(d, "dst")
    cli(src, "export", "v@s1", raw)
    blocksnap.Pool.create(dst, size=os.path.getsize(raw) * 3).close()
    res = {
        "send_full_s": timed(lambda: cli(src, "send", "v@s1", "-o", full)),
        "zstd_s": timed(lambda: subprocess.run(["zstd", "-q", "-3", "-T1", raw, "-o", zst], check=True)),
        "receive_full_s": timed(lambda: cli(dst, "receive", "w", "-i", full)),
        "unzstd_s": timed(lambda: unzstd(zst, back)),
        "send_inc_s": timed(lambda: cli(src, "send", "v@s2", "--from", "v@s1", "-o", inc)),
        "receive_inc_s": timed(lambda: cli(dst, "receive", "w", "-i", inc)),
        "startup_s": timed(lambda: subprocess.run([sys.executable, "-m", "blocksnap", "--help"],
                                                  check=True, stdout=subprocess.DEVNULL)),
        "full_bytes": os.path.getsize(full), "zstd_bytes": os.path.getsize(zst),
        "inc_bytes": os.path.getsize(inc),
    }
    shutil.rmtree(d)
    return res


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    """--size, --repeat, --json: what every round-based benchmark takes (`extra(parser)`
    adds a benchmark's own options)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--changed", type=float, default=0.1, help="share of the blocks v@s2 rewrites")
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def run_rounds(prefix: str, args, round_fn) -> tuple[int, list | None, dict]:
    """make_source once, then `round_fn(work, src, r)` per round with memory kept
    steady: (size, runs, medians with the memory note). With --json the result is
    printed and runs is None."""
    size = parse_size(args.size) // (4 * M) * 4 * M
    work = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    try:
        with steady_memory(max(8 << 30, 12 * size), quiet=args.json) as mem_note:
            src = make_source(work, size, getattr(args, "changed", 0.1))
            runs = [round_fn(work, src, r) for r in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if args.json:
        print(json.dumps({"size": size, "memory": mem_note, "median": med, "runs": runs}, indent=2))
        return size, None, med
    return size, runs, dict(med, memory=mem_note)


def main() -> None:
    args = parse_args(__doc__)
    if shutil.which("zstd") is None:
        raise SystemExit("needs the zstd command (Debian: zstd)")
    size, runs, med = run_rounds("bench-stream-", args, round_)
    if runs is None:
        return
    mem_note = med.pop("memory")
    mb = size / 1e6
    print(f"{format_size(size)} volume (1/2 random, 1/4 text, 1/4 holes), median of {args.repeat}; "
          f"{mem_note}\n")
    print("| what | blocksnap | zstd -3 -T1 (raw image) | zstd time / blocksnap time |")
    print("|---|---|---|---|")
    print(f"| full send | {med['send_full_s']:.2f} s ({mb / med['send_full_s']:.0f} MB/s of volume) | "
          f"{med['zstd_s']:.2f} s | **{med['zstd_s'] / med['send_full_s']:.2f}** |")
    print(f"| full receive | {med['receive_full_s']:.2f} s | {med['unzstd_s']:.2f} s (zstd -d, fsync) | "
          f"**{med['unzstd_s'] / med['receive_full_s']:.2f}** |")
    print(f"| full stream size | {format_size(med['full_bytes'])} | {format_size(med['zstd_bytes'])} | "
          f"size ratio zstd / blocksnap {med['zstd_bytes'] / med['full_bytes']:.2f} |")
    print(f"| incremental send (1/10 of blocks changed) | {med['send_inc_s']:.2f} s, "
          f"{format_size(med['inc_bytes'])} | | {med['inc_bytes'] / med['full_bytes']:.2f} of the full stream |")
    print(f"| incremental receive | {med['receive_inc_s']:.2f} s | | |")
    print(f"\nEach blocksnap figure includes starting the command: {med['startup_s']:.2f} s "
          "for `python -m blocksnap --help`.")


if __name__ == "__main__":
    main()
