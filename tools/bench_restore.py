#!/usr/bin/env python3
"""Recovery from a backup without a restore, and full restore against restic.

Two ext4 volumes are made with `mkfs.ext4 -d` from a directory of random files
and imported into a pool (holes stay holes), snapshotted and backed up into a
local repository and into moto's S3 server (a process of its own, over HTTP):

  1 GiB volume   with --data1 of files (default 700 MiB)
  16 GiB volume  with --data16 of files (default 300 MiB): thin, as most disks are

For each, with page caches dropped first (root):

  first byte     `blocksnap mount --image-only` until the first 4 KiB of the
                 image is read (whole commands, as a user runs them)
  mount+list     `blocksnap mount` until every name in the filesystem is listed;
                 and the same through the Python API (mount_backup) in a process
                 that has imported blocksnap already: no command-line start
                 (each of these three: the median of 3, caches dropped each time)
  4 KiB reads    p50 / p99 latency of 4 KiB reads of <id>.img at random offsets
                 inside stored chunks (cold cache: each read of a new chunk fetches it)
  full restore   `blocksnap restore` (1 GiB only) vs `restic restore` of the same
                 raw image, both into a new file and fsynced; MB/s of the image's
                 stored data

Usage: tools/bench_restore.py [--rounds 2] [--data1 700M] [--data16 300M] [--reads 2000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fuse import drop_caches
from blocksnap.units import format_size, parse_size

PASSWORD = "bench-password"
M = 1 << 20


def bs(*args: str, env: dict | None = None, capture: bool = False) -> str:
    res = subprocess.run([sys.executable, "-m", "blocksnap", "-q", *args], check=True, text=True,
                         env=dict(os.environ, **(env or {})), capture_output=capture)
    return res.stdout if capture else ""


def make_volume(work: str, pool: str, name: str, size: int, data: int) -> None:
    files = os.path.join(work, f"files-{name}")
    os.makedirs(files)
    rnd = random.Random(1)
    left, i = data, 0
    while left > 0:
        n = min(left, rnd.choice([4096, 65536, 1 * M, 8 * M]))
        d = os.path.join(files, f"d{i % 16}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(n))
        left -= n
        i += 1
    img = os.path.join(work, f"{name}.img")
    subprocess.run(["truncate", "-s", str(size), img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", files, img], check=True)
    shutil.rmtree(files)
    bs("--pool", pool, "volume", "import", name, img)
    os.unlink(img)
    bs("--pool", pool, "snapshot", "create", f"{name}@s1")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    import boto3
    boto3.client("s3", endpoint_url=url, aws_access_key_id="t", aws_secret_access_key="t",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return proc, url


def stored_offsets(env: dict, bid: str, n: int) -> list[int]:
    """4 KiB-aligned offsets inside chunks the backup stores."""
    from blocksnap.backup.repo import Repository
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    repo, _ = Repository.open(env["BLOCKSNAP_REPO"], lambda new: PASSWORD.encode(), env.get("BLOCKSNAP_S3_ENDPOINT"))
    m = repo.manifest(bid)
    nums, cs = m.chunk_numbers(), m.info["chunk_size"]
    rnd = random.Random(2)
    return [int(rnd.choice(nums)) * cs + rnd.randrange(cs // 4096) * 4096 for _ in range(n)]


def cold() -> None:
    """Page caches dropped (the repository is read from disk), then the interpreter
    and blocksnap's code read back in, as on any machine that runs Python: the
    figures are blocksnap's work, not the disk's first read of the Python install."""
    drop_caches()
    bs("--help", capture=True)
    subprocess.run([sys.executable, "-c", "import blocksnap.recovery.server as s; s.preload()"], check=True)


def _walk(mnt: str) -> int:
    return sum(len(ds) + len(fs) for _, ds, fs in os.walk(mnt))


def in_process(work: str, env: dict, bid: str) -> float:
    """mount_backup + listing + unmount through the Python API in a fresh process:
    what blocksnap does, without the command line's own start."""
    code = f"""
import os, sys, time
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from blocksnap.recovery.mount import mount_backup, unmount
from blocksnap.recovery import server
from bench_restore import _walk
server.preload()
import boto3
t = time.monotonic()
mount_backup(os.environ["BLOCKSNAP_REPO"], os.environ["BLOCKSNAP_REPO_PASSWORD"].encode(), {bid!r}, {work!r} + "/ip",
             endpoint=os.environ.get("BLOCKSNAP_S3_ENDPOINT"))
_walk({work!r} + "/ip")
print(time.monotonic() - t)
unmount({work!r} + "/ip")
"""
    os.makedirs(f"{work}/ip", exist_ok=True)
    cold()
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=dict(os.environ, **env))
    return float(res.stdout.strip().splitlines()[-1])


def measure(work: str, env: dict, bid: str, reads: int, tries: int = 3) -> dict[str, float]:
    """Each timing is the median of `tries`, caches dropped before each."""
    out: dict[str, float] = {}
    mnt = tempfile.mkdtemp(dir=work)
    img = os.path.join(mnt, f"{bid}.img")
    first = []
    for _ in range(tries):
        cold()
        t = time.monotonic()
        bs("mount", bid, mnt, "--image-only", env=env)
        with open(img, "rb", buffering=0) as f:
            os.pread(f.fileno(), 4096, 0)
        first.append(time.monotonic() - t)
        bs("umount", mnt, env=env)
    out["first_byte_s"] = statistics.median(first)
    offsets = stored_offsets(env, bid, reads)
    cold()
    bs("mount", bid, mnt, "--image-only", env=env)
    lat = []
    with open(img, "rb", buffering=0) as f:
        for off in offsets:
            t = time.perf_counter()
            os.pread(f.fileno(), 4096, off)
            lat.append((time.perf_counter() - t) * 1000)
    bs("umount", mnt, env=env)
    lat.sort()
    out["read_p50_ms"] = statistics.median(lat)
    out["read_p99_ms"] = lat[int(len(lat) * 0.99) - 1]
    listed = []
    for _ in range(tries):
        cold()
        t = time.monotonic()
        bs("mount", bid, mnt, env=env)
        out["names"] = _walk(mnt)
        listed.append(time.monotonic() - t)
        bs("umount", mnt, env=env)
    out["mount_list_s"] = statistics.median(listed)
    out["api_mount_list_s"] = statistics.median(in_process(work, env, bid) for _ in range(tries))
    os.rmdir(mnt)
    return out


def restore_vs_restic(work: str, pool: str, env: dict, bid: str, ref: str) -> dict[str, float]:
    raw = os.path.join(work, "export.raw")
    bs("--pool", pool, "export", ref, raw)
    stored = int(subprocess.run(["du", "-B1", raw], capture_output=True, text=True).stdout.split()[0])
    rrepo = os.path.join(work, "restic-repo")
    renv = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=rrepo)
    subprocess.run(["restic", "-q", "init", "--repository-version", "2"], check=True, env=renv,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["restic", "-q", "backup", raw], check=True, env=renv, stdout=subprocess.DEVNULL)
    os.unlink(raw)
    out_file = os.path.join(work, "restored.raw")
    cold()
    t = time.monotonic()
    bs("restore", bid, out_file, env=env)
    bs_s = time.monotonic() - t
    os.unlink(out_file)
    rdir = os.path.join(work, "restic-out")
    cold()
    t = time.monotonic()
    subprocess.run(["restic", "-q", "restore", "latest", "--target", rdir], check=True, env=renv,
                   stdout=subprocess.DEVNULL)
    for d, _, fs in os.walk(rdir):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    restic_s = time.monotonic() - t
    shutil.rmtree(rdir)
    shutil.rmtree(rrepo)
    return {"restore_s": bs_s, "restic_restore_s": restic_s, "restore_MBps": stored / M / bs_s,
            "restic_MBps": stored / M / restic_s, "stored_bytes": stored}


def one_round(work: str, args) -> dict[str, dict[str, float]]:
    pool = os.path.join(work, "pool")
    bs("--pool", pool, "pool", "init", "--size", "20G")
    make_volume(work, pool, "v1", 1 << 30, args.data1)
    make_volume(work, pool, "v16", 16 << 30, args.data16)
    moto, endpoint = start_moto()
    results: dict[str, dict[str, float]] = {}
    try:
        for repo_name, env in (("file", {"BLOCKSNAP_REPO": f"file://{work}/repo"}),
                               ("s3", {"BLOCKSNAP_REPO": "s3://bench/r", "BLOCKSNAP_S3_ENDPOINT": endpoint,
                                       "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
                                       "AWS_DEFAULT_REGION": "us-east-1"})):
            env = dict(env, BLOCKSNAP_REPO_PASSWORD=PASSWORD, BLOCKSNAP_RUNTIME_DIR=os.path.join(work, "run"))
            for vol in ("v1", "v16"):
                bid = json.loads(bs("--pool", pool, "backup", f"{vol}@s1", "--json", env=env, capture=True))["id"]
                key = f"{repo_name}-{vol}"
                results[key] = measure(work, env, bid, args.reads if repo_name == "file" else args.reads // 4)
                if repo_name == "file" and vol == "v1":
                    results[key].update(restore_vs_restic(work, pool, env, bid, f"{vol}@s1"))
                print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}), file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(10)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data1", type=parse_size, default=700 * M)
    p.add_argument("--data16", type=parse_size, default=300 * M)
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("restic") is None:
        raise SystemExit("needs root (loop devices, mounts, drop_caches) and restic")
    rounds = []
    for r in range(args.rounds):
        work = tempfile.mkdtemp(prefix=f"bench-restore-{r}-", dir="/var/tmp")
        try:
            rounds.append(one_round(work, args))
        finally:           # what a failed round left mounted: undone before its directory goes
            from blocksnap.recovery.mount import all_states, teardown
            from blocksnap.settings import Settings
            for sd, st in all_states(Settings(runtime_dir=os.path.join(work, "run"))):
                teardown(sd, st, lazy=True)
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rounds, indent=1))
        return
    print(f"data: 1 GiB volume {format_size(args.data1)} of files, 16 GiB volume {format_size(args.data16)}; "
          f"{args.rounds} rounds (each figure: round 1, round 2)")
    print("| repository, volume | first byte (s) | mounted + listed (s) | same, API (s) | 4 KiB read p50 (ms) "
          "| p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for key in rounds[0]:
        cells = [", ".join(f"{r[key][k]:.{d}f}" for r in rounds) for k, d in
                 (("first_byte_s", 2), ("mount_list_s", 2), ("api_mount_list_s", 2), ("read_p50_ms", 2),
                  ("read_p99_ms", 2))]
        print(f"| {key} | " + " | ".join(cells) + " |")
    f = [r["file-v1"] for r in rounds]
    print(f"\nfull restore of the 1 GiB volume ({format_size(int(f[0]['stored_bytes']))} stored): blocksnap "
          + ", ".join(f"{x['restore_s']:.2f} s ({x['restore_MBps']:.0f} MB/s)" for x in f) + "; restic "
          + ", ".join(f"{x['restic_restore_s']:.2f} s ({x['restic_MBps']:.0f} MB/s)" for x in f)
          + "; restic time / blocksnap time " + ", ".join(f"{x['restic_restore_s'] / x['restore_s']:.2f}" for x in f))


if __name__ == "__main__":
    main()
