#!/usr/bin/env python3
"""How long a repository command takes to start with many packs (issue 16).

Builds a repository of N packs cheaply: each pack holds a few small random chunks,
written straight through the Repository API (no pool, no backups), plus one
manifest naming the chunks of the first pack. Then, each in its own process so
that its peak RSS is its own:

  load_index      Repository.open + load_index (what backup, restore and prune
                  do at their start), timed inside the process; then, apart,
                  how long listing data/ takes (prune's, and verify --list-packs')
  backups         `blocksnap backups --repo URL`, wall time of the command
  verify          `blocksnap verify --repo URL` (every index, every manifest)
  restore         `blocksnap restore ID FILE` of the one-pack backup
  prune           with --prune, last, once: `blocksnap prune --keep-last 1`, which
                  deletes every pack but the first (the filler packs no backup names)

first on the repository as built (one index object per pack), then, when this
blocksnap consolidates indexes, after a backup's start has merged them. Runs on
file:// (a temporary directory) and on moto's S3 server (started here, as
tests/backup/conftest.py does). Usage:

  tools/bench_repo_start.py [--packs 20000] [--chunks 4] [--repeat 2] [--per-pack-runs N]
                            [--backend file,s3] [--prune] [--json]

Peak RSS is each process's own high-water mark (VmHWM), read as it exits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_s3 import S3_ENV, moto_server, s3_client

PASSWORD = b"bench-password"
# The peak RSS of a child is its own VmHWM, read as it exits: ru_maxrss from
# wait4 would carry the parent's high-water mark over the exec (Linux), which
# here is the benchmark's own, larger than a command's.
LAUNCH = """
import atexit, os, runpy, sys
def hwm():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_HWM"], "w") as f:
        f.write(str(kb * 1024))
atexit.register(hwm)
sys.argv = ["blocksnap", *sys.argv[1:]]
runpy.run_module("blocksnap", run_name="__main__", alter_sys=True)
"""


def _password(_new: bool) -> bytes:
    return PASSWORD


def build(url: str, endpoint: str | None, packs: int, chunks: int, chunk_bytes: int) -> str:
    """N packs of `chunks` random chunks each, and one manifest: its ID."""
    import numpy as np

    from blocksnap.backup.manifest import Manifest, new_backup_id
    from blocksnap.backup.repo import Repository
    repo, _ = Repository.open(url, _password, endpoint, create=True)

    def one(_i: int) -> list[bytes]:
        cids = []
        blobs = []
        for _ in range(chunks):
            data = os.urandom(chunk_bytes)
            cid = repo.keys.chunk_id(data)
            cids.append(cid)
            blobs.append((cid, repo.chunk_blob(cid, data)))
        repo.write_pack(blobs)
        return cids

    with ThreadPoolExecutor(16) as pool:
        first = None
        for i, cids in enumerate(pool.map(one, range(packs))):
            if first is None:
                first = cids
            if (i + 1) % 2000 == 0:
                print(f"  {i + 1} packs", file=sys.stderr, flush=True)
    ids = np.frombuffer(b"".join(first), np.uint8).reshape(-1, 16)
    info = {"id": new_backup_id(), "time": time.time(), "source": {"volume": "v", "snapshot": "s",
            "created": time.time()}, "size": chunks * chunk_bytes, "chunk_size": chunk_bytes,
            "chunks": chunks, "labels": {}, "consistency": None, "mode": "full", "requested_mode": "full",
            "base": None, "stats": {"read_bytes": 0, "new_bytes": 0, "new_chunks": 0, "packs": 1},
            "host": socket.gethostname(), "pool": "/bench"}
    m = Manifest.from_dense(info, ids) if hasattr(Manifest, "from_dense") else Manifest(info, ids)
    repo.write_manifest(m)
    return m.id


def hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def measure_load(url: str, endpoint: str | None, merge: bool) -> None:
    """In a child process: open + load_index (under a backup's lock with `merge`)."""
    from blocksnap.backup.repo import Repository
    t0 = time.perf_counter()
    repo, _ = Repository.open(url, _password, endpoint)
    if merge:
        with repo.lock("backup"):
            n = repo.load_index()
    else:
        n = repo.load_index()
    seconds = time.perf_counter() - t0
    t = time.perf_counter()
    # what verify --list-packs and prune list besides the indexes (by first hex digit, where it can)
    packs = len(getattr(repo.backend, "list_hex", repo.backend.list)("data"))
    print(json.dumps({"seconds": seconds, "chunks": n, "rss": hwm(), "packs": packs,
                      "list_data": time.perf_counter() - t}))


def child(cmd: list[str], env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of one command."""
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr.decode()}")
    return dt, p.stdout.decode()


def cli(args: list[str], env: dict, work: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `blocksnap ARGS`."""
    path = os.path.join(work, "hwm")
    dt, _ = child([sys.executable, "-c", LAUNCH, *args], dict(env, BENCH_HWM=path))
    with open(path) as f:
        return dt, int(f.read())


def load(url: str, endpoint: str | None, env: dict, merge: bool) -> dict:
    me = [sys.executable, os.path.abspath(__file__), "--child-load", url]
    dt, out = child(me + (["--endpoint", endpoint] if endpoint else []) + (["--merge"] if merge else []), env)
    got = json.loads(out)
    return {"load_index": got["seconds"], "load_index_rss": got["rss"], "wall": dt, "list_data": got["list_data"]}


def state(url: str, env: dict, endpoint: str | None, bid: str, work: str) -> dict:
    res = load(url, endpoint, env, False)
    del res["wall"]
    res["backups"], res["backups_rss"] = cli(["backups", "--repo", url], env, work)
    res["verify"], res["verify_rss"] = cli(["verify", "--repo", url], env, work)
    target = os.path.join(work, "restored.raw")
    res["restore"], res["restore_rss"] = cli(["restore", bid, target, "--repo", url], env, work)
    os.unlink(target)
    return res


def index_objects(url: str, endpoint: str | None) -> int:
    from blocksnap.backup.backends import open_backend
    return len(open_backend(url, endpoint).list("index"))


def bench(kind: str, args, work: str) -> dict:
    env = dict(os.environ, BLOCKSNAP_REPO_PASSWORD=PASSWORD.decode())
    with contextlib.ExitStack() as stack:
        endpoint = None
        if kind == "s3":
            endpoint = stack.enter_context(moto_server())
            env.update(S3_ENV, BLOCKSNAP_S3_ENDPOINT=endpoint)
            os.environ.update(S3_ENV)
            s3_client(endpoint).create_bucket(Bucket="bench")
            url = "s3://bench/repo"
        else:
            url = f"file://{work}/repo"
        t = time.perf_counter()
        bid = build(url, endpoint, args.packs, args.chunks, args.chunk_bytes)
        out = {"backend": kind, "packs": args.packs, "build_seconds": time.perf_counter() - t,
               "index_objects_before": index_objects(url, endpoint)}
        out["load"] = os.getloadavg()
        runs = args.repeat if args.per_pack_runs is None else args.per_pack_runs
        out["per_pack"] = [state(url, env, endpoint, bid, work) for _ in range(runs)]
        # a backup's start: merges the per-pack indexes if this blocksnap does that
        out["merging_start"] = load(url, endpoint, env, True)
        out["index_objects_after"] = index_objects(url, endpoint)
        if out["index_objects_after"] < out["index_objects_before"]:
            out["merged"] = [state(url, env, endpoint, bid, work) for _ in range(args.repeat)]
        if args.prune:
            out["prune"], out["prune_rss"] = cli(["prune", "--repo", url, "--keep-last", "1"], env, work)
        out["load_end"] = os.getloadavg()
        return out


def show(res: dict) -> None:
    mib = 1 << 20
    print(f"\n{res['backend']}: {res['packs']} packs, built in {res['build_seconds']:.0f} s, "
          f"{res['index_objects_before']} index objects"
          f" -> {res['index_objects_after']} after a backup's start "
          f"({res['merging_start']['load_index']:.2f} s, {res['merging_start']['load_index_rss'] / mib:.0f} MiB)")
    for name in ("per_pack", "merged"):
        for i, r in enumerate(res.get(name, [])):
            print(f"  {name:8} run {i + 1}: " + ", ".join(
                f"{k} {r[k]:.2f} s / {r[k + '_rss'] / mib:.0f} MiB" for k in ("load_index", "backups", "verify",
                                                                               "restore")))
    if "prune" in res:
        print(f"  prune --keep-last 1: {res['prune']:.2f} s / {res['prune_rss'] / mib:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", type=int, default=20000)
    ap.add_argument("--chunks", type=int, default=4, help="chunks per pack")
    ap.add_argument("--chunk-bytes", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--per-pack-runs", type=int, help="runs before the merge (default: --repeat)")
    ap.add_argument("--backend", default="file,s3")
    ap.add_argument("--prune", action="store_true", help="at the end, time a prune that deletes the filler packs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child-load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_load:
        measure_load(args.child_load, args.endpoint, args.merge)
        return
    results = []
    for kind in args.backend.split(","):
        work = tempfile.mkdtemp(prefix="bench-repo-start-")
        try:
            results.append(bench(kind, args, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not args.json:
            show(results[-1])
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
