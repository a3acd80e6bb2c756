"""Fixtures for the hooks tests: a real ext4 filesystem on a loop device, a real
PostgreSQL 15 and a real MariaDB started in temporary directories, and a runner for the
real `blocksnap freeze` command line."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import assert_cli_error

FITHAW = 0xC0045878
IS_ROOT = os.geteuid() == 0
PG_BIN = Path("/usr/lib/postgresql/15/bin")

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices, mounts, FIFREEZE, servers)")


# ----------------------------------------------------------------- command line

def _cli_prefix() -> list[str]:
    """`python -m blocksnap` if the whole CLI imports; else the freeze command alone
    (other subcommands may be half-written while this package is developed)."""
    probe = subprocess.run([sys.executable, "-c", "import blocksnap.cli.main"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "blocksnap"]
    return [sys.executable, str(Path(__file__).with_name("freeze_cli.py"))]


_PREFIX: list[str] | None = None


def cli_argv(*args: str) -> list[str]:
    global _PREFIX
    if _PREFIX is None:
        _PREFIX = _cli_prefix()
    return [*_PREFIX, *[str(a) for a in args]]


def run_freeze(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(cli_argv("freeze", *args), capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    return res


def assert_one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI's error contract with exit code 1 (tests/conftest.py)."""
    return assert_cli_error(res, 1, *needles)


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch) -> Path:
    """A private directory for frozen.json, so tests never touch /run/blocksnap."""
    d = tmp_path / "run"
    monkeypatch.setenv("BLOCKSNAP_RUNTIME_DIR", str(d))
    return d


# ----------------------------------------------------------------- filesystem

def thaw(path: str | Path) -> bool:
    """FITHAW; True if it *was* frozen (so a test can assert it was not)."""
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


def assert_thawed(path: str | Path) -> None:
    assert not thaw(path), f"{path} was still frozen"


def start_writer(path: Path) -> subprocess.Popen:
    """A separate process that creates and writes a file (blocks while frozen)."""
    return subprocess.Popen(["sh", "-c", f"echo data > '{path}'"])


def blocked(proc: subprocess.Popen, for_s: float = 0.5) -> bool:
    """True if `proc` is still running after `for_s` (never waits on it otherwise)."""
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return proc.poll() is None


def wait_done(proc: subprocess.Popen, within: float) -> float:
    t0 = time.monotonic()
    proc.wait(timeout=within)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def ext4_loop():
    """A real ext4 filesystem on a loop device, mounted in a temp dir."""
    if not IS_ROOT:
        pytest.skip("needs root (loop devices, mounts, FIFREEZE)")
    base = Path(tempfile.mkdtemp(prefix="bs-hooks-fs-"))
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            try:
                thaw(mnt)
            except OSError:
                pass
            for _ in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fs(ext4_loop):
    """The loop filesystem, checked thawed after each test (and thawed if not)."""
    yield ext4_loop
    assert_thawed(ext4_loop)


# ----------------------------------------------------------------- PostgreSQL

def _runuser(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def pg_server():
    """PostgreSQL 15 in a temp dir, Unix socket only, run as the postgres user."""
    if not IS_ROOT:
        pytest.skip("needs root (runs PostgreSQL as the postgres user)")
    assert (PG_BIN / "initdb").exists(), f"PostgreSQL 15 is not installed ({PG_BIN})"
    base = Path(tempfile.mkdtemp(prefix="bs-pg-", dir="/tmp"))
    shutil.chown(base, "postgres", "postgres")
    os.chmod(base, 0o700)
    data = base / "data"
    _runuser(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
             "-E", "UTF8")
    opts = f"-k {base} -c listen_addresses='' -c fsync=off -c max_connections=30"
    _runuser(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(base / "log"),
             "-o", opts, "start")
    try:
        yield {"dsn": f"host={base} user=postgres dbname=postgres", "socket_dir": str(base)}
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                        "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------- MariaDB

MARIADB_PASSWORD = "Pw-7fZq!k2#secret"


@pytest.fixture(scope="session")
def mariadb_server():
    """MariaDB in a temp dir, Unix socket only, binary log on; user `bk` with a password."""
    if not IS_ROOT:
        pytest.skip("needs root (runs MariaDB with --user=root)")
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    assert os.path.exists(server) and install, "MariaDB is not installed (apt-get install mariadb-server)"
    import pymysql

    base = Path(tempfile.mkdtemp(prefix="bs-my-", dir="/tmp"))
    data, sock = base / "data", base / "m.sock"
    subprocess.run([install, "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True)
    proc = subprocess.Popen([server, "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                             "--skip-networking", "--user=root", f"--pid-file={base / 'm.pid'}",
                             f"--log-error={base / 'err.log'}", f"--log-bin={data / 'binlog'}",
                             "--server-id=1", "--innodb-buffer-pool-size=32M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                c = pymysql.connect(unix_socket=str(sock), user="root", autocommit=True)
                break
            except pymysql.Error:
                if time.monotonic() > end or proc.poll() is not None:
                    raise AssertionError("MariaDB did not start: "
                                         + (base / "err.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        with c.cursor() as cur:
            cur.execute(f"CREATE USER 'bk'@'localhost' IDENTIFIED BY '{MARIADB_PASSWORD}'")
            cur.execute("GRANT ALL ON *.* TO 'bk'@'localhost'")
            cur.execute("CREATE DATABASE app")
            cur.execute("CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB")
            cur.execute("CREATE TABLE app.m (v INT) ENGINE=MyISAM")
        c.close()
        yield {"socket": str(sock), "root_url": f"mysql://root@localhost/?unix_socket={sock}",
               "bk_url": f"mysql://bk@localhost/?unix_socket={sock}", "password": MARIADB_PASSWORD}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def my_conn(mariadb_server):
    """A root connection factory for the test's own sessions (closed at the end)."""
    import pymysql

    conns = []

    def connect():
        c = pymysql.connect(unix_socket=mariadb_server["socket"], user="root", autocommit=True)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


class Sql(threading.Thread):
    """One statement on its own connection, in a thread; records when it finished."""

    def __init__(self, conn, sql: str):
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.done_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute(self.sql)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.done_at = time.monotonic()
