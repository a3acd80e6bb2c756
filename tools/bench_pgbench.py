#!/usr/bin/env python3
"""pgbench on ext4 on a blocksnap volume vs qemu-storage-daemon's export vs raw loop.

Per target (the same devices as `bench_fuse.py --random`: tools/bench_random.py):
mkfs.ext4 on the loop device, mount, initdb (PostgreSQL 15, fsync on, the
defaults otherwise), `pgbench -i -s SCALE`, then `pgbench -c CLIENTS -j 2 -T SECONDS`;
TPS and the mean latency pgbench reports, plus the daemon's CPU seconds per
1,000 transactions. Needs root; PostgreSQL runs as the postgres user.

Usage: python tools/bench_pgbench.py [--scale 50] [--clients 8] [--time 60]
  [--targets raw,qsd,row] [--size 4G] [--repeat 1] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fuse
import bench_random

PGBIN = "/usr/lib/postgresql/15/bin"


def as_pg(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


@contextlib.contextmanager
def postgres(dev: str, work: str, port: int):
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    bench_fuse.sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)   # (qsd: a discarded export then failed to mount)
    bench_fuse.sh("mount", dev, mnt)
    try:
        data = os.path.join(mnt, "pg")
        os.makedirs(data)
        shutil.chown(data, "postgres", "postgres")
        os.chmod(mnt, 0o755)
        as_pg(f"{PGBIN}/initdb", "-D", data)
        as_pg(f"{PGBIN}/pg_ctl", "-D", data, "-w", "-l", os.path.join(data, "log"), "-o",
              f"-p {port} -k /tmp -c listen_addresses='' -c shared_buffers=128MB", "start")
        try:
            yield data
        finally:
            as_pg(f"{PGBIN}/pg_ctl", "-D", data, "-w", "-m", "fast", "stop", check=False)
    finally:
        bench_fuse.sh("umount", mnt, check=False)


def run_target(name: str, work: str, args, port: int) -> dict[str, float]:
    os.makedirs(work)
    os.chmod(work, 0o755)
    # (qsd's export behind a direct-io loop device lost mkfs's metadata here: the
    # file system then failed to mount; so its loop device goes through the page cache)
    env = {"sh": bench_fuse.sh, "loop": bench_fuse.loop, "qsd": bench_fuse._qsd, "blocksnap": bench_fuse.blocksnap,
           "qsd_dio": False}
    size = bench_fuse.parse_size(args.size)
    with bench_random.target(name, work, size, env) as t, postgres(t["dev"], work, port):
        common = ["-h", "/tmp", "-p", str(port), "postgres"]
        as_pg(f"{PGBIN}/pgbench", "-q", "-i", "-s", str(args.scale), *common)
        pid = t["pid"]
        c0 = bench_random.cpu_seconds(pid) if pid else 0.0
        out = as_pg(f"{PGBIN}/pgbench", "-c", str(args.clients), "-j", "2", "-T", str(args.time), *common)
        tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
        lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
        txns = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
        r = {"tps": tps, "latency_ms": lat, "transactions": txns}
        if pid:
            r["cpu_per_1k"] = (bench_random.cpu_seconds(pid) - c0) / max(txns, 1) * 1000
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--time", type=int, default=60)
    ap.add_argument("--size", default="4G", help="image size (scale 50 needs about 1 GiB)")
    ap.add_argument("--targets", default="raw,qsd,row")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mount)")
    if not os.path.exists(f"{PGBIN}/pgbench"):
        raise SystemExit(f"PostgreSQL 15 not found in {PGBIN} (Debian: postgresql-15)")
    names = [t for t in args.targets.split(",") if t]
    for t in names:
        if t not in bench_random.TARGETS:
            raise SystemExit(f"unknown target {t!r}: use {','.join(bench_random.TARGETS)}")
    work = tempfile.mkdtemp(prefix="bench-pg-", dir=args.dir or "/var/tmp")
    os.chmod(work, 0o755)
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in names}
    try:
        for rnd in range(args.repeat):
            for k, t in enumerate(names[rnd % len(names):] + names[:rnd % len(names)]):
                bench_fuse.drop_caches()
                r = run_target(t, os.path.join(work, f"r{rnd}-{t}"), args, 54400 + k)
                runs[t].append(r)
                if not args.json:
                    print(f"round {rnd + 1} {t}: {r}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    ref = statistics.median(r["tps"] for r in runs["qsd"]) if runs.get("qsd") else None
    print(f"\npgbench -s {args.scale} -c {args.clients} -j 2 -T {args.time}, ext4, fsync on; "
          f"median of {args.repeat}\n")
    print("| target | TPS | vs qsd | latency ms | daemon CPU s / 1k transactions |\n|---|---|---|---|---|")
    for t, rs in runs.items():
        tps = statistics.median(r["tps"] for r in rs)
        cpu = f"{statistics.median(r['cpu_per_1k'] for r in rs):.2f}" if "cpu_per_1k" in rs[0] else "-"
        print(f"| {bench_random.LABELS[t]} | {tps:.0f} | {f'{tps / ref:.2f}x' if ref else '-'} | "
              f"{statistics.median(r['latency_ms'] for r in rs):.1f} | {cpu} |")


if __name__ == "__main__":
    main()
