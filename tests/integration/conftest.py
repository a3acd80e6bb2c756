"""End-to-end fixtures: a pool in tmp_path served by its real daemon, volumes attached
through FUSE + loop with real filesystems on them, and real PostgreSQL 15 / MariaDB
servers whose data directories live on those filesystems.

Everything a test starts is registered with its `Stack` and taken down in reverse
order at teardown, even when the test failed half-way: database servers (immediate
stop / SIGKILL), frozen filesystems (thawed), then `blocksnap stop --force`, then
whatever is still mounted, loop-attached or running under the test's directories
(tests.fuse.conftest.cleanup_under).

Mountpoints and Unix sockets live in a short directory under /tmp (`Stack.base`, mode
0755): the postgres user must be able to reach its data directory (pytest's tmp_path is
under a 0700 directory) and socket paths must fit in 108 bytes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import mark_root_dir, root_skip_reason, run_cli
from tests.fuse.conftest import cleanup_under
from tests.hooks.conftest import Sql

PG_BIN = Path("/usr/lib/postgresql/15/bin")
FITHAW = 0xC0045878
NEEDS = ["losetup", "mount", "umount", "fusermount3", "mkfs.ext4", "runuser"]
_REASON = root_skip_reason(NEEDS, "loop devices, mounts, FIFREEZE, servers")


def pytest_collection_modifyitems(config, items):
    mark_root_dir(items, "integration", _REASON)


# ----------------------------------------------------------------- small helpers

def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False,
                         **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def thaw(path: str | Path) -> bool:
    """FITHAW; True if the filesystem *was* frozen."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)


def assert_fs_writable(mnt: Path, within: float = 5.0) -> float:
    """A write + fsync from another process completes promptly (the filesystem is not
    frozen). If it does not, the filesystem is thawed (so the test can end) and the
    assertion fails. Returns how long the write took."""
    target = mnt / f".writable-{time.monotonic_ns()}"
    t0 = time.monotonic()
    proc = subprocess.Popen(["dd", "if=/dev/zero", f"of={target}", "bs=4k", "count=4", "conv=fsync",
                             "status=none"])
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        was_frozen = thaw(mnt)
        proc.wait(timeout=30)
        raise AssertionError(f"a write to {mnt} did not complete within {within} s "
                             f"({'it was still frozen' if was_frozen else 'not frozen, but stuck'})") from None
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"write to {mnt} failed ({proc.returncode})"
    target.unlink()
    return took


def assert_one_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI contract on failure: exit 1, exactly one stderr line `error: ...`."""
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got: {res.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------- the stack

class Stack:
    """One pool (in tmp_path) with its daemon, and everything a test builds on it."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.pool = tmp_path / "pool"
        self.base = Path(tempfile.mkdtemp(prefix="bs-it-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self.mounts: list[Path] = []

    # -- the real command line ------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_cli(self.pool, *args, check=check, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 120):
        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def init_pool(self, size: str = "4G") -> None:
        self.cli("pool", "init", "--size", size)

    def volume(self, name: str, size: str = "1G") -> None:
        self.cli("volume", "create", name, "--size", size)

    def attach(self, volume: str) -> str:
        dev = self.cli("attach", volume).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        return dev

    def snapshots(self, volume: str) -> list[str]:
        return [s["name"] for s in self.cli_json("snapshot", "list", volume)]

    def show(self, ref: str) -> dict:
        return self.cli_json("snapshot", "show", ref)

    def daemon_pid(self) -> int | None:
        try:
            return json.loads((self.pool / "daemon.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    # -- filesystems ------------------------------------------------------------
    def dir(self, name: str, mode: int = 0o755) -> Path:
        d = self.base / name
        d.mkdir(exist_ok=True)
        os.chmod(d, mode)
        return d

    def mkfs(self, dev: str, kind: str = "ext4") -> None:
        if kind == "xfs":
            sh("mkfs.xfs", "-q", "-f", dev)
        else:
            sh("mkfs.ext4", "-q", "-F", dev)

    def mount(self, dev: str, name: str, *opts: str) -> Path:
        mnt = self.dir(name)
        args = ["mount"] + (["-o", ",".join(opts)] if opts else []) + [dev, str(mnt)]
        sh(*args)
        self.mounts.append(mnt)
        return mnt

    def volume_fs(self, volume: str, size: str = "1G", kind: str = "ext4", mnt: str | None = None) -> Path:
        """Create `volume`, attach it, make a filesystem on it and mount it."""
        self.volume(volume, size)
        dev = self.attach(volume)
        self.mkfs(dev, kind)
        return self.mount(dev, mnt or volume)

    # -- clean-up ----------------------------------------------------------------
    def on_cleanup(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def _thaw_all(self) -> None:
        for mnt in self.mounts:
            try:
                thaw(mnt)
            except OSError:
                pass

    def teardown(self) -> None:
        errors = []
        self._thaw_all()  # a test that failed while frozen: let the servers and writers go on
        for what, fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep going, report at the end
                errors.append(f"{what}: {e}")
        self._thaw_all()
        if self.daemon_pid():
            res = run_cli(self.pool, "stop", "--force", timeout=90)
            if res.returncode != 0:
                errors.append(f"stop --force: {res.stderr.strip()}")
        cleanup_under(self.base)
        cleanup_under(self.tmp)
        shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise AssertionError("teardown: " + "; ".join(errors))


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch) -> Path:
    """A private directory for frozen.json, so tests never touch /run/blocksnap."""
    d = tmp_path / "run"
    monkeypatch.setenv("BLOCKSNAP_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def stack(tmp_path: Path):
    s = Stack(tmp_path)
    try:
        s.init_pool()
        yield s
    finally:
        s.teardown()


# ----------------------------------------------------------------- PostgreSQL

def _runuser(*argv, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return sh("runuser", "-u", "postgres", "--", *argv, check=check, timeout=timeout)


class PgServer:
    """PostgreSQL 15 run as the postgres user, on a Unix socket only."""

    def __init__(self, stack: Stack, datadir: Path, name: str, port: int):
        self.datadir = datadir
        self.port = port
        self.sockdir = stack.dir(name, 0o700)
        shutil.chown(self.sockdir, "postgres", "postgres")
        self.log = self.sockdir / "server.log"
        stack.on_cleanup(f"postgres {name}", self.stop)

    @property
    def dsn(self) -> str:
        return f"host={self.sockdir} port={self.port} dbname=postgres user=postgres"

    def initdb(self) -> None:
        parent = self.datadir.parent
        parent.mkdir(exist_ok=True)
        shutil.chown(parent, "postgres", "postgres")
        os.chmod(parent, 0o700)
        _runuser(PG_BIN / "initdb", "-D", self.datadir, "-A", "trust", "-U", "postgres", "-E", "UTF8")

    def start(self, timeout: int = 120) -> None:
        opts = (f"-k {self.sockdir} -p {self.port} -c listen_addresses='' -c shared_buffers=32MB "
                f"-c max_connections=40")
        res = _runuser(PG_BIN / "pg_ctl", "-D", self.datadir, "-w", "-t", str(timeout), "-l", self.log,
                       "-o", opts, "start", check=False, timeout=timeout + 30)
        if res.returncode != 0:
            raise AssertionError(f"postgres did not start: {res.stdout}{res.stderr}\n"
                                 + (self.log.read_text()[-3000:] if self.log.exists() else ""))

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists() and _runuser(
            PG_BIN / "pg_ctl", "-D", self.datadir, "status", check=False).returncode == 0

    def stop(self, mode: str = "immediate") -> None:
        if self.datadir.exists() and (self.datadir / "postmaster.pid").exists():
            _runuser(PG_BIN / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop",
                     check=False, timeout=90)

    def connect(self, dbname: str = "postgres"):
        import psycopg
        return psycopg.connect(host=str(self.sockdir), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True, connect_timeout=10)

    def query(self, sql: str, params: tuple = ()):
        with self.connect() as c:
            return c.execute(sql, params).fetchall()

    def execute(self, sql: str, params: tuple = ()) -> None:
        with self.connect() as c:
            c.execute(sql, params)

    def client(self, tool: str, *args: str) -> list[str]:
        return [str(PG_BIN / tool), "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres", *args]


# ----------------------------------------------------------------- MariaDB

MARIADBD = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
MARIADB_CHECK = shutil.which("mariadb-check") or shutil.which("mysqlcheck")


def needs_mariadb() -> None:
    if not (os.path.exists(MARIADBD) and INSTALL_DB and MARIADB_CHECK):
        pytest.skip("MariaDB is not installed (mariadbd, mariadb-install-db, mariadb-check)")
    try:
        import pymysql  # noqa: F401
    except ImportError:
        pytest.skip("PyMySQL is not installed")


class MariaDB:
    """mariadbd as root on a Unix socket only, binary log on (relative to the datadir, so
    a copy of the datadir, like a snapshot's clone, has a usable binlog index)."""

    def __init__(self, stack: Stack, datadir: Path, name: str, server_id: int = 1):
        self.datadir = datadir
        self.rundir = stack.dir(name)
        self.socket = self.rundir / "m.sock"
        self.errlog = self.rundir / "err.log"
        self.server_id = server_id
        self.proc: subprocess.Popen | None = None
        stack.on_cleanup(f"mariadb {name}", self.stop)

    @property
    def url(self) -> str:
        return f"mysql://root@localhost/?unix_socket={self.socket}"

    def install(self) -> None:
        sh(INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
           "--auth-root-authentication-method=normal", "--skip-test-db", timeout=180)

    def start(self, timeout: float = 120) -> None:
        import pymysql

        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             "--skip-networking", "--user=root", f"--pid-file={self.rundir / 'm.pid'}",
             f"--log-error={self.errlog}", "--log-bin=binlog", f"--server-id={self.server_id}",
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while True:
            try:
                pymysql.connect(unix_socket=str(self.socket), user="root", connect_timeout=5).close()
                return
            except pymysql.Error:
                if self.proc.poll() is not None or time.monotonic() > end:
                    log = self.errlog.read_text()[-3000:] if self.errlog.exists() else ""
                    raise AssertionError(f"mariadbd on {self.datadir} did not start:\n{log}") from None
                time.sleep(0.2)

    def connect(self, autocommit: bool = True, **kw):
        import pymysql
        return pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=autocommit,
                               connect_timeout=10, **kw)

    def query(self, sql: str, params: tuple | None = None) -> tuple:
        c = self.connect()
        try:
            with c.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def mariadb_writable(db: MariaDB, sql: str = "INSERT INTO app.u (v) VALUES (1)", within: float = 3.0) -> bool:
    """True if `sql` (autocommit) on a fresh connection completes within `within` s."""
    conn = db.connect()
    q = Sql(conn, sql)
    q.start()
    q.join(within)
    ok = q.done_at is not None and q.error is None
    if q.done_at is not None:
        conn.close()
    return ok


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
