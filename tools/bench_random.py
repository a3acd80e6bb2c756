"""Random I/O through a loop device: fio against blocksnap, qemu-storage-daemon, raw loop.

Called by `tools/bench_fuse.py --random`. Each target is a 1 GiB image (`--size`)
attached to a loop device (direct-io on) and first filled with 3/4 of its size of
random data, sequentially with dd; the targets with snapshots take three of them
during the fill (after each of the first three quarters). Then every column is one
short fio run (libaio, direct, `--runtime` seconds, default 8) over the filled part.

Targets: raw (loop on an image file), qsd (qemu-storage-daemon FUSE export of a
qcow2, no snapshot), pyfuse (tools/fuse_floor.py: blocksnap's FUSE class on mfusepy
with a bare pread/pwrite behind it, the floor of any Python engine there), row
(ROW volume, no snapshot), row-snap (ROW, 3 snapshots during the fill), cow-snap
(COW, 3 snapshots during the fill).

Besides IOPS, for the daemons (qsd and blocksnap):
* cpu/1k: the daemon's CPU seconds (user + system, /proc/<pid>/stat) per 1,000 fio
  operations of the column;
* for blocksnap's write columns, bytes written per application byte: `data` from
  the data store's own count (FileStore.written, reported by `pool status`), and
  `other`, the rest of what the daemon wrote through system calls (/proc/<pid>/io
  wchar less the FUSE replies: catalog, log, and for COW the origin writes).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator

MiB = 1 << 20
FUSE_WRITE_REPLY = 24     # fuse_out_header + fuse_write_out, written per write request
FUSE_READ_REPLY = 16      # fuse_out_header, written per read request with the data

# name -> fio arguments
COLUMNS: dict[str, dict[str, str]] = {
    "w4k-qd1-j1": {"rw": "randwrite", "bs": "4k", "iodepth": "1", "numjobs": "1"},
    "w4k-qd16-j1": {"rw": "randwrite", "bs": "4k", "iodepth": "16", "numjobs": "1"},
    "w4k-qd1-j4": {"rw": "randwrite", "bs": "4k", "iodepth": "1", "numjobs": "4"},
    "w4k-qd16-j4": {"rw": "randwrite", "bs": "4k", "iodepth": "16", "numjobs": "4"},
    "r4k-qd1-j1": {"rw": "randread", "bs": "4k", "iodepth": "1", "numjobs": "1"},
    "r4k-qd16-j1": {"rw": "randread", "bs": "4k", "iodepth": "16", "numjobs": "1"},
    "r4k-qd1-j4": {"rw": "randread", "bs": "4k", "iodepth": "1", "numjobs": "4"},
    "r4k-qd16-j4": {"rw": "randread", "bs": "4k", "iodepth": "16", "numjobs": "4"},
    "w16k-qd16-j1": {"rw": "randwrite", "bs": "16k", "iodepth": "16", "numjobs": "1"},
    "w64k-qd16-j1": {"rw": "randwrite", "bs": "64k", "iodepth": "16", "numjobs": "1"},
    "rw70-4k-qd16-j1": {"rw": "randrw", "rwmixread": "70", "bs": "4k", "iodepth": "16", "numjobs": "1"},
}
TARGETS = ("raw", "qsd", "pyfuse", "row", "row-snap", "cow-snap")
LABELS = {"raw": "raw loop on image file", "qsd": "qemu-storage-daemon FUSE, qcow2",
          "pyfuse": "Python FUSE floor (tools/fuse_floor.py: pread/pwrite, no engine)",
          "row": "blocksnap ROW, no snapshot", "row-snap": "blocksnap ROW, 3 snapshots in the fill",
          "cow-snap": "blocksnap COW, 3 snapshots in the fill"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def fio(dev: str, span: int, runtime: float, args: dict[str, str]) -> dict[str, float]:
    cmd = ["fio", "--name=bench", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
           f"--size={span}", f"--runtime={runtime:g}", "--time_based", "--group_reporting",
           "--randrepeat=0", "--norandommap", "--output-format=json"]
    cmd += [f"--{k}={v}" for k, v in args.items()]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"fio failed: {res.stderr.strip() or res.stdout.strip()}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    r, w = job["read"], job["write"]
    return {"iops": r["iops"] + w["iops"], "ops": r["total_ios"] + w["total_ios"],
            "write_ops": w["total_ios"], "write_bytes": w["io_bytes"],
            "read_ops": r["total_ios"], "read_bytes": r["io_bytes"],
            "lat_us": (job["write" if w["total_ios"] else "read"]["clat_ns"]["mean"]) / 1e3}


@contextlib.contextmanager
def target(name: str, work: str, size: int, env: dict) -> Iterator[dict]:
    """Yields {"dev", "pid" (or None), "snapshot" (callable), "written" (callable or None)}."""
    sh, loop, blocksnap = env["sh"], env["loop"], env["blocksnap"]
    if name == "raw":
        img = os.path.join(work, "raw.img")
        with open(img, "wb") as f:
            f.truncate(size)
        with loop(img, True) as dev:
            yield {"dev": dev, "pid": None, "snapshot": lambda: None, "written": None}
        return
    if name == "qsd":
        img, export = os.path.join(work, "disk.qcow2"), os.path.join(work, "qsd.export")
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
        with env["qsd"](img, export) as proc, loop(export, env.get("qsd_dio", True)) as dev:
            yield {"dev": dev, "pid": proc.pid, "snapshot": lambda: None, "written": None}
        return
    if name == "pyfuse":
        with _floor(work, size, env) as t:
            yield t
        return
    mode = "cow" if name.startswith("cow") else "row"
    pool = os.path.join(work, "pool")
    os.environ["BLOCKSNAP_LOOP_DIRECT_IO"] = "on"
    blocksnap(pool, "pool", "init", "--size", str(size * 3))
    if mode == "cow":
        origin = os.path.join(work, "origin.img")
        with open(origin, "wb") as f:
            f.truncate(size)
        blocksnap(pool, "volume", "create", "v", "--mode", "cow", "--origin", origin)
    else:
        blocksnap(pool, "volume", "create", "v", "--size", str(size))
    dev = blocksnap(pool, "-q", "attach", "v").strip()
    with open(os.path.join(pool, "lock")) as f:
        pid = int(f.read().strip())
    count = iter(range(1, 100))

    def written() -> int:
        st = json.loads(blocksnap(pool, "pool", "status", "--json"))
        return int(st.get("store_written", 0))
    try:
        yield {"dev": dev, "pid": pid, "written": written,
               "snapshot": lambda: blocksnap(pool, "-q", "snapshot", "create", f"v@s{next(count)}")}
    finally:
        blocksnap(pool, "-q", "stop", "--force")


@contextlib.contextmanager
def _floor(work: str, size: int, env: dict) -> Iterator[dict]:
    """tools/fuse_floor.py serving a raw image, a loop device (direct-io) on it."""
    img, mnt = os.path.join(work, "floor.img"), os.path.join(work, "floor")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "fuse_floor.py"), img, mnt],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(mnt, "disk")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("tools/fuse_floor.py did not mount")
            time.sleep(0.1)
        with env["loop"](os.path.join(mnt, "disk"), True) as dev:
            yield {"dev": dev, "pid": proc.pid, "snapshot": lambda: None, "written": None}
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fill(dev: str, src: str, span: int, snapshot: Callable[[], None] | None, sh) -> None:
    """dd random data over [0, span), in four parts, a snapshot after each of the first three."""
    part = span // 4 // MiB
    for i in range(4):
        sh("dd", f"if={src}", f"of={dev}", "bs=1M", f"count={part}", f"skip={i * part}", f"seek={i * part}",
           "oflag=direct", "conv=fsync,notrunc", "status=none")
        if snapshot is not None and i < 3:
            snapshot()


def run_target(name: str, work: str, src: str, size: int, runtime: float, columns: list[str],
               env: dict) -> dict[str, dict[str, float]]:
    span = size * 3 // 4 // MiB * MiB
    os.makedirs(work)
    env["drop_caches"]()
    out: dict[str, dict[str, float]] = {}
    with target(name, work, size, env) as t:
        fill(t["dev"], src, span, t["snapshot"] if name.endswith("-snap") else None, env["sh"])
        for col in columns:
            pid, written = t["pid"], t["written"]
            c0 = cpu_seconds(pid) if pid else 0.0
            w0 = wchar(pid) if pid else 0
            d0 = written() if written else 0
            r = fio(t["dev"], span, runtime, COLUMNS[col])
            if pid:
                r["cpu_per_1k"] = (cpu_seconds(pid) - c0) / max(r["ops"], 1) * 1000
            if written and r["write_bytes"]:
                data = written() - d0
                other = (wchar(pid) - w0 - data - FUSE_WRITE_REPLY * r["write_ops"]
                         - FUSE_READ_REPLY * r["read_ops"] - r["read_bytes"])
                r["amp_data"] = data / r["write_bytes"]
                r["amp_other"] = max(other, 0) / r["write_bytes"]
            out[col] = r
    return out


def median_table(runs: dict[str, list[dict[str, dict[str, float]]]], columns: list[str]) -> str:
    med = {t: {c: statistics.median(r[c]["iops"] for r in rs) for c in columns} for t, rs in runs.items()}
    ref = med.get("qsd")
    lines = ["| target | " + " | ".join(columns) + " |", "|" + "---|" * (1 + len(columns))]
    for t, m in med.items():
        cells = [f"{m[c]:.0f}" + (f" ({m[c] / ref[c]:.2f}x)" if ref and t != "qsd" else "") for c in columns]
        lines.append(f"| {LABELS[t]} | " + " | ".join(cells) + " |")
    extra = ["", "daemon CPU seconds per 1,000 ops (median):", "",
             "| target | " + " | ".join(columns) + " |", "|" + "---|" * (1 + len(columns))]
    for t, rs in runs.items():
        if "cpu_per_1k" in rs[0][columns[0]]:
            extra.append(f"| {LABELS[t]} | " + " | ".join(
                f"{statistics.median(r[c]['cpu_per_1k'] for r in rs):.3f}" for c in columns) + " |")
    wcols = [c for c in columns if COLUMNS[c]["rw"] != "randread"]
    extra += ["", "bytes written per application byte, data store + other (median):", "",
              "| target | " + " | ".join(wcols) + " |", "|" + "---|" * (1 + len(wcols))]
    for t, rs in runs.items():
        if wcols and "amp_data" in rs[0][wcols[0]]:
            extra.append(f"| {LABELS[t]} | " + " | ".join(
                f"{statistics.median(r[c]['amp_data'] for r in rs):.2f} + "
                f"{statistics.median(r[c]['amp_other'] for r in rs):.2f}" for c in wcols) + " |")
    return "\n".join(lines + extra)


def main(args, env: dict) -> None:
    """`bench_fuse.py --random`: rounds over the targets, medians, the tables."""
    size = env["parse_size"](args.size if args.size != "512M" else "1G")
    names = [t for t in args.targets.split(",") if t] if args.targets != "raw,qsd,row,cow" else list(TARGETS)
    for t in names:
        if t not in TARGETS:
            raise SystemExit(f"unknown random target {t!r}: use {','.join(TARGETS)}")
    columns = [c for c in args.columns.split(",") if c] if args.columns else list(COLUMNS)
    for c in columns:
        if c not in COLUMNS:
            raise SystemExit(f"unknown column {c!r}: use {','.join(COLUMNS)}")
    if shutil.which("fio") is None:
        raise SystemExit("fio not installed (Debian: fio)")
    work = env["mkdtemp"]()
    srcdir = env["mkdtemp_shm"]()
    runs: dict[str, list] = {t: [] for t in names}
    try:
        src = env["make_source"](srcdir, size * 3 // 4 // MiB * MiB)
        with env["memory"]():
            for rnd in range(args.repeat):
                for t in names[rnd % len(names):] + names[:rnd % len(names)]:
                    t0 = time.monotonic()
                    r = run_target(t, os.path.join(work, f"r{rnd}-{t}"), src, size, args.runtime, columns, env)
                    runs[t].append(r)
                    if not args.json:
                        print(f"round {rnd + 1} {t} ({time.monotonic() - t0:.0f} s): " + ", ".join(
                            f"{c} {r[c]['iops']:.0f}" for c in columns), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(srcdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"size": size, "runtime": args.runtime, "repeat": args.repeat, "runs": runs}, indent=2))
    else:
        print(f"\nfio libaio direct, {args.runtime:g} s per column, {env['format_size'](size)} image "
              f"with 3/4 filled, median of {args.repeat} (IOPS; ratio to qsd)\n")
        print(median_table(runs, columns))
