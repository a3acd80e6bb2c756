#!/usr/bin/env python3
"""dd through a loop device: blocksnap's FUSE export vs qemu-storage-daemon vs raw loop.

For each target, three phases on a loop device over the target's image file:
  first write   dd of random data onto a fresh (empty) image, oflag=direct, conv=fsync
  overwrite     the same after a snapshot (blocksnap snapshot / qcow2 internal snapshot)
  cold read     dd iflag=direct after `echo 3 > /proc/sys/vm/drop_caches`

Targets: raw (loop on a sparse image file: the ceiling), qsd (qemu-storage-daemon FUSE
export of a qcow2), row and cow (blocksnap volumes served by `blocksnap serve`).
Needs root; pauses a VM's free page reporting while it runs (tools/steady_memory.py).
Usage: tools/bench_fuse.py [--size 512M] [--json] [--targets raw,qsd,row,cow]
  [--baseline GITREF --targets qsd,row,row-base]  (an older commit side by side, same run)
  tools/bench_fuse.py --random [--size 1G] [--runtime 8] [--columns w4k-qd16-j1,...]
  [--targets raw,qsd,pyfuse,row,row-snap,cow-snap]  (fio random I/O: tools/bench_random.py)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(REPO, "src"))

from blocksnap.units import format_size, parse_size  # noqa: E402
from steady_memory import steady_memory  # noqa: E402

PHASES = ("first_write", "overwrite", "cold_read")
BS = 1 << 20


def sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


BASELINE_SRC: str | None = None   # src/ of a checkout to compare against (--baseline)


def blocksnap(pool: str, *args: str, src: str | None = None) -> str:
    """Run the CLI; with `src`, the code in that directory instead of this checkout's
    (PYTHONPATH comes before the editable install, and the daemon inherits it)."""
    cmd = [sys.executable, "-m", "blocksnap", "--pool", pool, *args]
    if src is None:
        return sh(*cmd)
    env = dict(os.environ, PYTHONPATH=src)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def dd_write(src: str, dev: str, size: int) -> float:
    t = time.perf_counter()
    sh("dd", f"if={src}", f"of={dev}", f"bs={BS}", f"count={size // BS}", "oflag=direct", "conv=fsync,notrunc",
       "status=none")
    return size / (time.perf_counter() - t)


def dd_read(dev: str, size: int) -> float:
    drop_caches()
    t = time.perf_counter()
    sh("dd", f"if={dev}", "of=/dev/null", f"bs={BS}", f"count={size // BS}", "iflag=direct", "status=none")
    return size / (time.perf_counter() - t)


@contextlib.contextmanager
def loop(path: str, dio: bool) -> Iterator[str]:
    dev = sh("losetup", "-f", "--show", f"--direct-io={'on' if dio else 'off'}", path).strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev, check=False)


def make_source(srcdir: str, size: int) -> str:
    """Random data (zeros would be holes for blocksnap and qcow2 alike), kept in memory."""
    src = os.path.join(srcdir, "random.src")
    with open(src, "wb") as f:
        for _ in range(size // BS):
            f.write(os.urandom(BS))
    with open(src, "rb") as f:
        while f.read(8 * BS):
            pass
    return src


# -- targets: each yields (device, snapshot_callback) --------------------------------
@contextlib.contextmanager
def target_raw(work: str, size: int, dio: bool) -> Iterator[dict]:
    img = os.path.join(work, "raw.img")
    with open(img, "wb") as f:
        f.truncate(size)
    with loop(img, dio) as dev:
        yield {"dev": dev, "snapshot": lambda: None}  # no snapshots: a plain overwrite


@contextlib.contextmanager
def _qsd(img: str, export: str) -> Iterator[None]:
    open(export, "w").close()
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file,filename={img},cache.direct=off",
         "--blockdev", "driver=qcow2,node-name=qcow,file=file",
         "--export", f"type=fuse,id=exp,node-name=qcow,mountpoint={export},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while os.stat(export).st_size == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"qemu-storage-daemon failed: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def target_qsd(work: str, size: int, dio: bool) -> Iterator[dict]:
    if shutil.which("qemu-storage-daemon") is None:
        raise SystemExit("qemu-storage-daemon not installed (Debian: qemu-system-common)")
    img = os.path.join(work, "disk.qcow2")
    export = os.path.join(work, "qsd.export")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    state: dict = {}
    stack = contextlib.ExitStack()

    def start() -> None:
        stack.enter_context(_qsd(img, export))
        state["dev"] = stack.enter_context(loop(export, dio))

    def snapshot() -> None:
        # qsd holds the image: stop it, take an internal snapshot, serve again
        stack.close()
        sh("qemu-img", "snapshot", "-c", "s1", img)
        start()

    state["snapshot"] = snapshot
    with stack:
        start()
        yield state  # the device changes when qsd restarts


@contextlib.contextmanager
def target_blocksnap(work: str, size: int, dio: bool, mode: str, base: bool = False) -> Iterator[dict]:
    src = BASELINE_SRC if base else None
    pool = os.path.join(work, f"pool-{mode}")
    os.environ["BLOCKSNAP_LOOP_DIRECT_IO"] = "on" if dio else "off"
    blocksnap(pool, "pool", "init", "--size", str(size * 3), src=src)
    if mode == "cow":
        origin = os.path.join(work, "origin.img")
        with open(origin, "wb") as f:
            f.truncate(size)
        blocksnap(pool, "volume", "create", "v", "--mode", "cow", "--origin", origin, src=src)
    else:
        blocksnap(pool, "volume", "create", "v", "--size", str(size), src=src)
    dev = blocksnap(pool, "-q", "attach", "v", src=src).strip()
    try:
        yield {"dev": dev, "snapshot": lambda: blocksnap(pool, "-q", "snapshot", "create", "v@s1", src=src)}
    finally:
        blocksnap(pool, "-q", "stop", "--force", src=src)


TARGETS = {
    "raw": target_raw,
    "qsd": target_qsd,
    "row": lambda w, s, d: target_blocksnap(w, s, d, "row"),
    "cow": lambda w, s, d: target_blocksnap(w, s, d, "cow"),
    "row-base": lambda w, s, d: target_blocksnap(w, s, d, "row", base=True),
    "cow-base": lambda w, s, d: target_blocksnap(w, s, d, "cow", base=True),
}
LABELS = {"raw": "raw loop on image file (ceiling)", "qsd": "qemu-storage-daemon FUSE, qcow2",
          "row": "blocksnap ROW volume", "cow": "blocksnap COW volume",
          "row-base": "blocksnap ROW volume, baseline", "cow-base": "blocksnap COW volume, baseline"}


def run_target(name: str, work: str, src: str, size: int, dio: bool) -> dict[str, float]:
    sub = os.path.join(work, name)
    os.makedirs(sub)
    # every target starts from the same page-cache state; work files stay until the
    # end, because deleting gigabytes (online discard) would slow the next target
    drop_caches()
    return _run_target(name, sub, src, size, dio)


def _run_target(name: str, sub: str, src: str, size: int, dio: bool) -> dict[str, float]:
    with TARGETS[name](sub, size, dio) as t:
        res = {"first_write": dd_write(src, t["dev"], size)}
        t["snapshot"]()
        res["overwrite"] = dd_write(src, t["dev"], size)
        res["cold_read"] = dd_read(t["dev"], size)
    return res


def table(results: dict[str, dict[str, float]]) -> str:
    ref = results.get("qsd")
    head = "| target | " + " | ".join(f"{p.replace('_', ' ')} MB/s" for p in PHASES)
    head += " | " + " | ".join(f"{p.replace('_', ' ')} vs qsd" for p in PHASES) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(PHASES))]
    for name, r in results.items():
        cells = [f"{r[p] / 1e6:.0f}" for p in PHASES]
        cells += [f"{r[p] / ref[p]:.2f}x" if ref else "-" for p in PHASES]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rounds(args: argparse.Namespace, names: list[str], work: str, src: str, size: int,
            runs: dict[str, list[dict[str, float]]]) -> None:
    for rnd in range(args.repeat):
        # interleaved rounds, each starting at another target: noise, and whatever
        # the previous target leaves behind (writeback, discards), hit them alike
        for t in names[rnd % len(names):] + names[:rnd % len(names)]:
            r = run_target(t, os.path.join(work, f"r{rnd}"), src, size, args.loop_direct_io == "on")
            runs[t].append(r)
            if not args.json:
                print(f"round {rnd + 1} {t}: " + ", ".join(f"{p} {r[p] / 1e6:.0f} MB/s" for p in PHASES),
                      file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512M", help="bytes written and read per phase (default 512M)")
    ap.add_argument("--targets", default="raw,qsd,row,cow")
    ap.add_argument("--loop-direct-io", choices=["on", "off"], default="on")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--baseline", metavar="GITREF",
                    help="also run targets row-base/cow-base on the code of this commit (a git worktree)")
    ap.add_argument("--keep-page-reporting", action="store_true",
                    help="leave a VM's free page reporting on (see tools/steady_memory.py)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--random", action="store_true", help="fio random I/O columns (tools/bench_random.py)")
    ap.add_argument("--runtime", type=float, default=8.0, help="--random: seconds per fio column")
    ap.add_argument("--columns", default="", help="--random: the columns to run (default all)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, drop_caches)")
    if args.random:
        import bench_random

        def memory() -> contextlib.AbstractContextManager:
            return (contextlib.nullcontext() if args.keep_page_reporting
                    else steady_memory(12 << 30, quiet=args.json))
        bench_random.main(args, {
            "sh": sh, "loop": loop, "qsd": _qsd, "blocksnap": blocksnap, "drop_caches": drop_caches,
            "parse_size": parse_size, "format_size": format_size, "make_source": make_source,
            "memory": memory, "mkdtemp": lambda: tempfile.mkdtemp(prefix="bench-rand-", dir=args.dir or "/var/tmp"),
            "mkdtemp_shm": lambda: tempfile.mkdtemp(prefix="bench-rand-src-", dir="/dev/shm")})
        return
    size = parse_size(args.size) // BS * BS
    names = [t for t in args.targets.split(",") if t]
    for t in names:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r}: use {','.join(TARGETS)}")
    if any(t.endswith("-base") for t in names) and not args.baseline:
        raise SystemExit("targets row-base/cow-base need --baseline GITREF")
    work = tempfile.mkdtemp(prefix="bench-fuse-", dir=args.dir or "/var/tmp")
    if args.baseline:
        global BASELINE_SRC
        tree = os.path.join(work, "baseline")
        sh("git", "-C", REPO, "worktree", "add", "--detach", tree, args.baseline)
        BASELINE_SRC = os.path.join(tree, "src")
    # the source lives on tmpfs when there is one: drop_caches would evict it elsewhere
    srcdir = tempfile.mkdtemp(prefix="bench-fuse-src-", dir="/dev/shm" if os.path.isdir("/dev/shm") else work)
    try:
        src = make_source(srcdir, size)
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in names}
        memory = contextlib.ExitStack()
        if not args.keep_page_reporting:
            mem_note = memory.enter_context(steady_memory(max(12 << 30, 24 * size), quiet=args.json))
        else:
            mem_note = "free page reporting left as it is"
        with memory:
            _rounds(args, names, work, src, size, runs)
    finally:
        if BASELINE_SRC:
            sh("git", "-C", REPO, "worktree", "remove", "--force", os.path.dirname(BASELINE_SRC), check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(srcdir, ignore_errors=True)
    results = {t: {p: statistics.median(r[p] for r in rs) for p in PHASES} for t, rs in runs.items()}
    info = {"size": size, "loop_direct_io": args.loop_direct_io, "repeat": args.repeat,
            "memory": mem_note, "median": results, "runs": runs}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"\n{format_size(size)} per phase, dd bs=1M, loop direct-io={args.loop_direct_io}, "
              f"median of {args.repeat}; {mem_note}\n")
        print(table(results))
        print("\nspread over the rounds (min-max MB/s):\n")
        for t, rs in runs.items():
            print(f"- {LABELS[t]}: " + ", ".join(
                f"{p.replace('_', ' ')} {min(r[p] for r in rs) / 1e6:.0f}-{max(r[p] for r in rs) / 1e6:.0f}"
                for p in PHASES))


if __name__ == "__main__":
    main()
