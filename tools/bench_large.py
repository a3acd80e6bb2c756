#!/usr/bin/env python3
"""Backups of large thin volumes: time and peak RSS that follow what is stored, not the size.

Two cases, as issue 16 names them:

  4 TiB ROW volume, 256 MiB written     full backup, then an incremental of a second
                                         snapshot with nothing changed (and `send --from`
                                         of the same pair, for reference)
  64 TiB ROW volume, 1 GiB written      backup, restore (sparse), restore --verify,
                                         verify --read-data, prune

Data is random 1 MiB pieces at random offsets. Everything (pool, repository,
restore target) lives on an XFS filesystem in a sparse loop image made here: ext4
cannot hold a 64 TiB file. Each command is a child process; its peak RSS comes
from wait4 (which counts the parent's RSS at the fork too: this script stays at
about 30 MiB, so that is the floor of the figures). Page caches are dropped before every step (root). Usage:
tools/bench_large.py [--repeat 2] [--json] [--only 4T|64T]
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

M, G, T = 1 << 20, 1 << 30, 1 << 40
PASSWORD = "bench-password"
CASES = {"4T": (4 * T, 256 * M), "64T": (64 * T, 1 * G)}


def run(pool: str, *args: str, env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one blocksnap command, caches dropped first."""
    drop_caches()
    full_env = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "-q", "--pool", pool, *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"blocksnap {' '.join(args)} failed: {err.decode(errors='replace')}")
    return took, usage.ru_maxrss * 1024, out.decode()


def fill(pool_path: str, size: int, data: int, seed: int) -> None:
    """In a child process: a child's peak RSS (wait4) starts at its parent's, so the
    parent stays small and imports neither blocksnap nor numpy."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_large; bench_large.fill_here({pool_path!r}, {size}, {data}, {seed})")
    subprocess.run([sys.executable, "-c", code], check=True)


def fill_here(pool_path: str, size: int, data: int, seed: int) -> None:
    import blocksnap
    rnd = random.Random(seed)
    with blocksnap.Pool.open(pool_path) as pool:
        v = pool.create_volume("v", size=size)
        piece = 1 * M
        for _ in range(data // piece):
            v.write(rnd.randrange(size // piece) * piece, os.urandom(piece))
        v.snapshot("s1")
        v.snapshot("s2")      # nothing changed: the incremental has nothing to read


def one_case(root: str, name: str, r: int) -> dict[str, float]:
    size, data = CASES[name]
    d = os.path.join(root, f"{name}-r{r}")
    os.makedirs(d)
    pool = os.path.join(d, "pool")
    subprocess.run([sys.executable, "-m", "blocksnap", "-q", "--pool", pool, "pool", "init", "--size",
                    str(data * 3)], check=True)
    fill(pool, size, data, r)
    env = {"BLOCKSNAP_REPO": f"file://{d}/repo", "BLOCKSNAP_REPO_PASSWORD": PASSWORD}
    out: dict[str, float] = {}

    def step(label: str, *args: str) -> str:
        took, rss, text = run(pool, *args, env=env)
        out[f"{label}_s"], out[f"{label}_rss_mib"] = round(took, 3), round(rss / M, 1)
        return text

    step("full_backup", "backup", "v@s1", "--json")
    inc = json.loads(step("incremental_backup", "backup", "v@s2", "--json"))
    out["incremental_read_bytes"] = inc["stats"]["read_bytes"]
    took, rss, _ = run(pool, "send", "v@s2", "--from", "v@s1", "-o", os.path.join(d, "inc.stream"))
    out["send_from_s"], out["send_from_rss_mib"] = round(took, 3), round(rss / M, 1)
    if name == "64T":
        target = os.path.join(d, "restored.raw")
        step("restore", "restore", inc["id"], target)
        os.unlink(target)
        step("restore_verify", "restore", inc["id"], target, "--verify")
        os.unlink(target)
        step("verify_read_data", "verify", "--read-data")
        step("prune", "prune", "--keep-last", "1")
    shutil.rmtree(d)
    return out


def xfs_scratch() -> tuple[str, str, str]:
    """A sparse 2 TiB image with XFS on a loop device, mounted: (image, device, mountpoint)."""
    base = tempfile.mkdtemp(prefix="bench-large-")
    img = os.path.join(base, "xfs.img")
    with open(img, "wb") as f:
        f.truncate(2 * T)
    dev = subprocess.run(["losetup", "-f", "--show", img], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["mkfs.xfs", "-q", dev], check=True)
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt)
    subprocess.run(["mount", dev, mnt], check=True)
    return img, dev, mnt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", choices=sorted(CASES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    img, dev, mnt = xfs_scratch()
    results: dict[str, list[dict]] = {}
    try:
        for name in [args.only] if args.only else list(CASES):
            results[name] = [one_case(mnt, name, r) for r in range(args.repeat)]
    finally:
        subprocess.run(["umount", mnt], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(os.path.dirname(img), ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, rounds in results.items():
        size, data = CASES[name]
        print(f"## {name} volume, {data // M} MiB written ({len(rounds)} runs)")
        for key in rounds[0]:
            print(f"{key:28} " + "  ".join(f"{r[key]:>10}" for r in rounds))


if __name__ == "__main__":
    main()
