#!/usr/bin/env python3
"""Instant recovery: time to first byte and to a mounted filesystem of a volume made
with `volume create --from-backup`, and hydration MB/s.

An ext4 volume (`mkfs.ext4 -d` from random files, `--data` of them) is imported into
a pool, snapshotted and backed up into a local repository (file://). The pool is
served; then, with page caches dropped (root), whole commands as a user runs them:

  first byte     `volume create --from-backup` started until the first 4 KiB of
                 the new volume's volume.img is read (the blocks come on demand)
  mounted        the same until `attach` and `mount -o ro,noload` return and the
                 filesystem's names are listed
  hydration      from `volume create` until `volume show` says hydrated: MB/s of
                 the backup's stored data (copied while the filesystem is mounted)

Usage: tools/bench_instant.py [--size 1G] [--data 400M] [--rounds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fuse import drop_caches
from blocksnap.units import parse_size

PASSWORD = "bench-password"
M = 1 << 20


def bs(pool: str, *args: str, capture: bool = False) -> str:
    env = dict(os.environ, BLOCKSNAP_REPO_PASSWORD=PASSWORD)
    res = subprocess.run([sys.executable, "-m", "blocksnap", "-q", "--pool", pool, *args], check=True, text=True,
                         env=env, capture_output=capture)
    return res.stdout if capture else ""


def setup(work: str, size: int, data: int) -> tuple[str, str, str, int]:
    import blocksnap
    pool, repo = os.path.join(work, "pool"), f"file://{work}/repo"
    blocksnap.Pool.create(pool, size=size + data + (256 << 20)).close()
    files = os.path.join(work, "files")
    os.makedirs(files)
    rnd = random.Random(1)
    left, i = data, 0
    while left > 0:
        n = min(left, rnd.choice([4096, 100_000, 1 << 20, 8 << 20]))
        with open(os.path.join(files, f"f{i}"), "wb") as f:
            f.write(os.urandom(n))
        left, i = left - n, i + 1
    img = os.path.join(work, "fs.img")
    subprocess.run(["truncate", "-s", str(size), img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", files, img], check=True)
    shutil.rmtree(files)
    bs(pool, "volume", "import", "v", img)
    os.unlink(img)
    bs(pool, "snapshot", "create", "v@s1")
    backup = json.loads(bs(pool, "backup", "v@s1", "--repo", repo, "--json", capture=True))
    return pool, repo, backup["id"], int(backup.get("stored_bytes") or backup.get("bytes_read") or data)


def one_round(pool: str, repo: str, backup: str, name: str, work: str) -> dict:
    mnt = os.path.join(work, "served")
    fs = os.path.join(work, f"fs-{name}")
    os.makedirs(fs)
    drop_caches()
    t0 = time.perf_counter()
    bs(pool, "volume", "create", name, "--from-backup", backup, "--repo", repo)
    with open(os.path.join(mnt, name, "volume.img"), "rb", buffering=0) as f:
        assert len(f.read(4096)) == 4096
    first = time.perf_counter() - t0
    dev = bs(pool, "attach", name, capture=True).strip()
    subprocess.run(["mount", "-o", "ro,noload", dev, fs], check=True)
    os.listdir(fs)
    mounted = time.perf_counter() - t0
    while True:
        h = json.loads(bs(pool, "volume", "show", name, "--json", capture=True))["hydration"]
        if h["state"] == "done":
            break
        time.sleep(0.1)
    hydrated = time.perf_counter() - t0
    subprocess.run(["umount", fs], check=True)
    bs(pool, "detach", name)
    return {"first_byte_s": round(first, 3), "mounted_s": round(mounted, 3), "hydrated_s": round(hydrated, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--data", default="400M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-instant-", dir="/var/tmp")
    pool = ""
    try:
        pool, repo, backup, _ = setup(work, parse_size(a.size), parse_size(a.data))
        os.makedirs(os.path.join(work, "served"))
        bs(pool, "serve", os.path.join(work, "served"))
        runs = [one_round(pool, repo, backup, f"r{i}", work) for i in range(a.rounds)]
        show = json.loads(bs(pool, "volume", "show", "r0", "--json", capture=True))
        stored = show["allocated"]
        out = {"size": a.size, "data": a.data, "local_bytes": stored, "rounds": runs,
               "hydration_MBps": [round(stored / r["hydrated_s"] / 1e6, 1) for r in runs],
               "load": os.getloadavg()[0]}
        if a.json:
            print(json.dumps(out, indent=1))
        else:
            for r, mbps in zip(runs, out["hydration_MBps"]):
                print(f"first byte {r['first_byte_s']:.2f} s, mounted {r['mounted_s']:.2f} s, "
                      f"hydrated {r['hydrated_s']:.1f} s ({mbps} MB/s of {stored / M:.0f} MiB)")
            print(f"load average {out['load']:.1f}")
    finally:
        if pool:
            subprocess.run([sys.executable, "-m", "blocksnap", "-q", "--pool", pool, "stop", "--force"],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
