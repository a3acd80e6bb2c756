#!/usr/bin/env python3
"""Backups against restic on the same data, same machine, same run.

The volume is bench_stream's mix (half random data, a quarter compressible text,
a quarter holes) as v@s1; then a tenth of its blocks are rewritten as v@s2. Each
round makes a fresh repository for each tool: with --backend file (the default)
local ones on the same disk, with --backend s3 two prefixes of a fresh bucket on
one moto S3 server the benchmark starts on 127.0.0.1 (the tests' server; blocksnap
s3://BUCKET/bs with --endpoint, restic s3:http://127.0.0.1:PORT/BUCKET/restic):

  full backup     blocksnap backup v@s1             vs  restic backup of v@s1 exported raw
  incremental     blocksnap backup v@s2 (from the   vs  restic backup of v@s2 exported raw
                  maps: only changed blocks read)       (restic re-reads the whole file)
  restore         blocksnap restore (sparse, fsync) vs  restic restore, then fsync

Page caches are dropped before every timed step (root). Exports for restic are not
timed: restic gets the raw image for free. Both encrypt and compress (restic's
repository format 2, compression auto). Ratios are restic time / blocksnap time:
above 1 favours blocksnap. Restores go to local files in both cases, then cmp.
Usage: tools/bench_backup.py [--size 512M] [--repeat 3] [--changed 0.1] [--backend file|s3] [--json]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fuse import drop_caches
from bench_s3 import S3_ENV, moto_server, s3_client
from bench_stream import cli, parse_args, run_rounds, timed
from blocksnap.units import format_size

PASSWORD = "bench-password"
def s3_sizes(client, bucket: str) -> dict[str, int]:
    """Bytes per top-level prefix of the bucket ("bs", "restic")."""
    sizes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            top = o["Key"].split("/", 1)[0]
            sizes[top] = sizes.get(top, 0) + o["Size"]
    return sizes


def s3_drop(client, bucket: str) -> None:
    """Empty and delete the bucket (moto keeps it in memory)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


def step(fn) -> float:
    drop_caches()
    return timed(fn)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def fsync_tree(path: str) -> None:
    for d, _, fs in os.walk(path):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def restic(repo: str, *args: str) -> None:
    env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=repo)
    subprocess.run(["restic", "-q", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def round_(work: str, src: str, r: int, endpoint: str | None = None) -> dict[str, float]:
    """One round; with `endpoint` (moto's URL) both repositories are in a fresh bucket there."""
    d = os.path.join(work, f"r{r}")
    os.makedirs(d)
    raw = os.path.join(d, "disk.raw")
    if endpoint is None:
        os.environ.update(BLOCKSNAP_REPO=f"file://{d}/bs-repo", BLOCKSNAP_REPO_PASSWORD=PASSWORD)
        rrepo = os.path.join(d, "restic-repo")
    else:
        client, bucket = s3_client(endpoint), f"bench-backup-r{r}-{os.urandom(4).hex()}"
        client.create_bucket(Bucket=bucket)
        os.environ.update(S3_ENV, BLOCKSNAP_REPO=f"s3://{bucket}/bs", BLOCKSNAP_S3_ENDPOINT=endpoint,
                          BLOCKSNAP_REPO_PASSWORD=PASSWORD)
        rrepo = f"s3:{endpoint}/{bucket}/restic"
    restic(rrepo, "init", "--repository-version", "2")   # 2: compressed ("stable" is 1 in 0.14)
    out: dict[str, float] = {}
    out["bs_full_s"] = step(lambda: cli(src, "backup", "v@s1"))
    cli(src, "export", "v@s1", raw)
    out["restic_full_s"] = step(lambda: restic(rrepo, "backup", raw))
    out["bs_inc_s"] = step(lambda: cli(src, "backup", "v@s2"))
    os.unlink(raw)
    cli(src, "export", "v@s2", raw)
    out["restic_inc_s"] = step(lambda: restic(rrepo, "backup", raw))
    if endpoint is None:
        out["bs_repo_bytes"], out["restic_repo_bytes"] = du(f"{d}/bs-repo"), du(rrepo)
    else:
        sizes = s3_sizes(client, bucket)
        out["bs_repo_bytes"], out["restic_repo_bytes"] = sizes.get("bs", 0), sizes.get("restic", 0)
    last = json.loads(subprocess.run([sys.executable, "-m", "blocksnap", "backups", "--json"], check=True,
                                     capture_output=True, text=True).stdout)[-1]["id"]
    out["bs_restore_s"] = step(lambda: cli(src, "restore", last, os.path.join(d, "bs.raw")))
    rdir = os.path.join(d, "restic-out")
    out["restic_restore_s"] = step(lambda: (restic(rrepo, "restore", "latest", "--target", rdir), fsync_tree(rdir)))
    restored = os.path.join(rdir, raw.lstrip("/"))
    if subprocess.run(["cmp", "-s", restored, os.path.join(d, "bs.raw")]).returncode != 0:
        raise SystemExit("the two restores differ")
    shutil.rmtree(d)
    if endpoint is not None:
        s3_drop(client, bucket)
    return out


def main() -> None:
    args = parse_args(__doc__, lambda ap: ap.add_argument(
        "--backend", choices=("file", "s3"), default="file",
        help="where both repositories are: local file:// (default) or a moto S3 server started here"))
    if shutil.which("restic") is None:
        raise SystemExit("needs restic (Debian: restic)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches)")
    if args.backend == "s3":
        with moto_server() as endpoint:
            size, runs, med = run_rounds("bench-backup-", args, lambda w, s, r: round_(w, s, r, endpoint))
        where = "repositories on a local moto S3 server (s3://)"
    else:
        size, runs, med = run_rounds("bench-backup-", args, round_)
        where = "repositories on local disk (file://)"
    if runs is None:
        return
    mem_note = med.pop("memory")
    print(f"{format_size(size)} volume (1/2 random, 1/4 text, 1/4 holes; then {args.changed:.0%} of blocks "
          "rewritten), "
          f"{where}, median of {args.repeat}; {mem_note}\n")
    print("| step | blocksnap | restic 0.14 | restic time / blocksnap time |")
    print("|---|---|---|---|")
    for name, key in (("full backup", "full"), ("incremental backup", "inc"), ("restore (latest)", "restore")):
        b, r = med[f"bs_{key}_s"], med[f"restic_{key}_s"]
        print(f"| {name} | {b:.2f} s | {r:.2f} s | **{r / b:.2f}** |")
    print(f"| repository after both backups | {format_size(int(med['bs_repo_bytes']))} | "
          f"{format_size(int(med['restic_repo_bytes']))} | "
          f"size ratio {med['restic_repo_bytes'] / med['bs_repo_bytes']:.2f} |")
    for k in range(len(runs)):
        print(f"\nround {k + 1}: " + ", ".join(f"{n} {v:.2f}" for n, v in runs[k].items() if n.endswith("_s")), end="")
    print()


if __name__ == "__main__":
    main()
