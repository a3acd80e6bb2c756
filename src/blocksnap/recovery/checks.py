"""The checks a drill runs on a backup brought up on its overlay.

* `fsck`: the filesystem's log is replayed first, as a real recovery would
  (ext: `e2fsck -E journal_only`, xfs: a mount and unmount), on the overlay, then
  checked read-only (`e2fsck -fn`, `xfs_repair -n`).
* `postgres`: the filesystem mounted read-write (on the overlay), the server
  started on the copy as the data directory's owner, with its own port and socket
  directory and no TCP listener, after plain crash recovery; then `pg_amcheck
  --all` or the user's SQL (with --expect, its output must match).
* `mariadb`: the same with mariadbd (`--skip-networking`, its own socket) and
  `mariadb-check --all-databases` or the SQL.
* `command:CMD`: `sh -c CMD` with BLOCKSNAP_DRILL_* variables.

Every server a check starts is written into the drill's state before it runs, so
a drill killed meanwhile has it killed by the next drill or `blocksnap umount`.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import BlocksnapError, InvalidArgument
from ..service import loopdev

CHECK_TIMEOUT = 600.0          # seconds a check's commands may take
OUTPUT_KEEP = 4000             # characters of a check's output kept in its result
ALIASES = {"fsck": "fsck", "postgres": "postgres", "postgresql": "postgres", "pg": "postgres",
           "mariadb": "mariadb", "mysql": "mariadb"}


class CheckFailed(BlocksnapError):
    """A drill check did not pass."""


def parse_check(spec: str, sql: str | None = None, expect: str | None = None,
                datadir: str | None = None) -> dict[str, Any]:
    """'fsck', 'postgres' ('pg'), 'mariadb' ('mysql') or 'command:CMD' as a check's description."""
    if spec.startswith("command:"):
        cmd = spec[len("command:"):].strip()
        if not cmd:
            raise InvalidArgument("--check command: needs a command after the colon")
        return {"kind": "command", "name": "command", "command": cmd}
    kind = ALIASES.get(spec.strip().lower())
    if kind is None:
        raise InvalidArgument(f"unknown check {spec!r}: use fsck, postgres, mariadb or command:CMD")
    out: dict[str, Any] = {"kind": kind, "name": kind}
    if kind in ("postgres", "mariadb"):
        out.update(sql=sql, expect=expect, datadir=datadir)
    return out


def _run(cmd: list[str], timeout: float = CHECK_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise CheckFailed(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(cmd[:3])}...: timed out after {timeout:.0f} s") from None


def _text(res: subprocess.CompletedProcess) -> str:
    return ((res.stdout or "") + (res.stderr or ""))[-OUTPUT_KEEP:]


class Bringup:
    """The backup as a drill sees it: a read-write loop device over the overlay,
    and its filesystem, mounted on demand at `fs_dir`."""

    def __init__(self, work: Path, device: str, fstype: str | None, manifest: Any, repo_url: str,
                 image: str, record: Callable[[dict], None]):
        self.work, self.device, self.fstype, self.m = work, device, fstype, manifest
        self.repo_url, self.image, self.record = repo_url, image, record
        self.fs_dir = work / "fs"
        self.mounted = False

    def mount(self) -> Path:
        if not self.mounted:
            opts = "nouuid" if self.fstype == "xfs" else "defaults"
            res = _run(["mount", "-o", opts] + (["-t", self.fstype] if self.fstype else [])
                       + [self.device, str(self.fs_dir)])
            if res.returncode != 0:
                last = (_text(res).strip().splitlines() or [f"exit {res.returncode}"])[-1]
                raise CheckFailed(f"cannot mount {self.device} ({self.fstype or 'no filesystem found'}): {last}")
            self.mounted = True
        return self.fs_dir

    def unmount(self) -> None:
        if self.mounted:
            loopdev.umount(str(self.fs_dir))
            self.mounted = False


# -- the checks ---------------------------------------------------------------------
def fsck(b: Bringup, _spec: dict) -> tuple[bool, str, str]:
    b.unmount()
    if b.fstype in ("ext2", "ext3", "ext4"):
        replay = _run(["e2fsck", "-E", "journal_only", "-y", b.device])
        res = _run(["e2fsck", "-f", "-n", b.device])
        out = _text(replay) + _text(res)
        return res.returncode == 0, out, "clean" if res.returncode == 0 else f"e2fsck exit {res.returncode}"
    if b.fstype == "xfs":
        b.mount()          # replays the log onto the overlay
        b.unmount()
        res = _run(["xfs_repair", "-n", b.device])
        return res.returncode == 0, _text(res), "clean" if res.returncode == 0 else f"xfs_repair exit {res.returncode}"
    raise CheckFailed(f"fsck: no ext2/3/4 or xfs filesystem on the backup (blkid says {b.fstype or 'nothing'})")


def _find(root: Path, marker: Callable[[Path], bool], given: str | None, what: str) -> Path:
    if given:
        d = root / given.lstrip("/")
        if not marker(d):
            raise CheckFailed(f"{given}: not a {what} data directory in the backup")
        return d
    for depth in range(4):
        for d in sorted(root.glob("/".join(["*"] * depth)) if depth else [root]):
            if d.is_dir() and marker(d):
                return d
    raise CheckFailed(f"no {what} data directory in the backup's filesystem (give --datadir)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _owner(d: Path) -> str:
    return pwd.getpwuid(d.stat().st_uid).pw_name


def _probe_sql(cmd: list[str], spec: dict) -> tuple[bool, str, str]:
    res = _run(cmd + [spec["sql"]])
    out = (res.stdout or "").strip()
    if res.returncode != 0:
        return False, _text(res), f"the query failed (exit {res.returncode})"
    if spec.get("expect") is not None and out != spec["expect"].strip():
        return False, _text(res), f"the query gave {out[:200]!r}, expected {spec['expect'].strip()[:200]!r}"
    return True, _text(res), f"the query gave {out[:200]!r}"


def postgres(b: Bringup, spec: dict) -> tuple[bool, str, str]:
    root = b.mount()
    data = _find(root, lambda d: (d / "PG_VERSION").is_file() and (d / "global" / "pg_control").is_file(),
                 spec.get("datadir"), "PostgreSQL")
    version = (data / "PG_VERSION").read_text().strip()
    bindir = Path(f"/usr/lib/postgresql/{version}/bin")
    if not (bindir / "pg_ctl").exists():
        raise CheckFailed(f"PostgreSQL {version} is not installed ({bindir} has no pg_ctl)")
    user = _owner(data)
    (data / "postmaster.pid").unlink(missing_ok=True)   # the original's lock file: its pid may run here
    sock = b.work / "pgsock"
    sock.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(sock, user, user)
    port = _free_port()
    log = b.work / "pgsock" / "server.log"
    as_user = ["runuser", "-u", user, "--"]
    opts = f"-k {sock} -p {port} -c listen_addresses='' -c shared_buffers=32MB -c max_connections=20"
    start = _run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", str(int(CHECK_TIMEOUT)), "-l",
                            str(log), "-o", opts, "start"])
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        b.record({"kind": "postgres", "pid": pid, "start": _start_time(pid)})
    try:
        if start.returncode != 0:
            tail = log.read_text()[-OUTPUT_KEEP:] if log.exists() else ""
            return False, _text(start) + tail, "PostgreSQL did not start on the copy"
        client = as_user + [str(bindir / ("psql" if spec.get("sql") else "pg_amcheck")), "-h", str(sock),
                            "-p", str(port), "-U", user]
        if spec.get("sql"):
            return _probe_sql(client + ["-d", "postgres", "-X", "-A", "-t", "-c"], spec)
        res = _run(client + ["--all", "--install-missing"])
        ok = res.returncode == 0 and not (res.stdout or "").strip()
        return ok, _text(res), "pg_amcheck found nothing" if ok else f"pg_amcheck exit {res.returncode}"
    finally:
        _run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop"],
             timeout=90)


def mariadb(b: Bringup, spec: dict) -> tuple[bool, str, str]:
    root = b.mount()
    data = _find(root, lambda d: (d / "mysql").is_dir() and (d / "ibdata1").exists(), spec.get("datadir"),
                 "MariaDB")
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    (data / "mysql.pid").unlink(missing_ok=True)
    sock = b.work / "my.sock"
    err = b.work / "mariadb.err"
    # a server that wrote a binary log commits in two phases: its prepared transactions
    # are settled from that log at recovery, so the copy must open it (the index
    # file names it, relative to the data directory); without it, mariadbd refuses
    binlog = [f"--log-bin={p.stem}" for p in sorted(data.glob("*.index"))
              if any(ln.strip().startswith(("./", p.stem)) for ln in p.read_text(errors="replace").splitlines())][:1]
    proc = subprocess.Popen([server, "--no-defaults", f"--datadir={data}", f"--socket={sock}", "--skip-networking",
                             f"--user={_owner(data)}", f"--pid-file={b.work / 'my.pid'}", f"--log-error={err}",
                             "--innodb-buffer-pool-size=64M", *binlog],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    b.record({"kind": "mariadb", "pid": proc.pid, "start": _start_time(proc.pid)})
    client = [shutil.which("mariadb") or "mysql", f"--socket={sock}", "-u", "root"]
    try:
        deadline = time.monotonic() + CHECK_TIMEOUT
        while _run(client + ["-e", "SELECT 1"], timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = err.read_text() if err.exists() else ""
                first = next((ln.strip() for ln in log.splitlines() if "[ERROR]" in ln), "")
                return False, log[-OUTPUT_KEEP:], "MariaDB did not start on the copy" + (f": {first}" if first else "")
            time.sleep(0.2)
        if spec.get("sql"):
            return _probe_sql(client + ["-N", "-B", "-e"], spec)
        res = _run([shutil.which("mariadb-check") or "mysqlcheck", f"--socket={sock}", "-u", "root",
                    "--all-databases"])
        bad = [ln for ln in (res.stdout or "").splitlines() if ln.strip() and not ln.rstrip().endswith("OK")
               and "note" not in ln.lower()]
        ok = res.returncode == 0 and not bad
        return ok, _text(res), "mariadb-check: every table OK" if ok else f"mariadb-check: {(bad or ['failed'])[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def command(b: Bringup, spec: dict) -> tuple[bool, str, str]:
    env = dict(os.environ, BLOCKSNAP_DRILL_DEVICE=b.device, BLOCKSNAP_DRILL_IMAGE=b.image,
               BLOCKSNAP_BACKUP_ID=b.m.id, BLOCKSNAP_VOLUME=b.m.volume,
               BLOCKSNAP_SNAPSHOT=str(b.m.info["source"].get("snapshot", "")), BLOCKSNAP_REPO=b.repo_url,
               BLOCKSNAP_DRILL_FSTYPE=b.fstype or "", BLOCKSNAP_DRILL_DIR="")
    if b.fstype:
        env["BLOCKSNAP_DRILL_DIR"] = str(b.mount())
    proc = subprocess.Popen(["sh", "-c", spec["command"]], env=env, cwd=str(b.work), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    b.record({"kind": "command", "pid": proc.pid, "start": _start_time(proc.pid), "group": True})
    try:
        out, _ = proc.communicate(timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return False, out[-OUTPUT_KEEP:], f"timed out after {CHECK_TIMEOUT:.0f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)      # what it left running in the background
    return proc.returncode == 0, out[-OUTPUT_KEEP:], f"exit {proc.returncode}"


CHECKS: dict[str, Callable[[Bringup, dict], tuple[bool, str, str]]] = {
    "fsck": fsck, "postgres": postgres, "mariadb": mariadb, "command": command}


def _start_time(pid: int) -> str | None:
    from .mount import start_time
    return start_time(pid)
