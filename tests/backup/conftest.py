"""Fixtures for backups: a pool whose volume has three different snapshots, a
repository environment, and a real S3-compatible server (moto's, in its own
process, spoken to over HTTP by boto3 exactly as MinIO or AWS would be)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import history_pool, run_cli

M = 1 << 20
SIZE = 24 * M


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Volume v with s1 (data), s2 (overwrites, zeros, a discard, new data), s3 (grown)."""
    return history_pool(tmp_path / "pool", SIZE)


def three_generations(vol) -> None:
    """Snapshots a, b, c of an 8 MiB volume, each overwriting the last: of a's pack
    a quarter stays live in c, of b's nothing (prune deletes one pack, rewrites one)."""
    vol.write(0, os.urandom(4 * M))
    vol.snapshot("a")
    vol.write(0, os.urandom(3 * M))
    vol.snapshot("b")
    vol.write(0, os.urandom(3 * M))
    vol.snapshot("c")


class Repo:
    """Runs the CLI against one pool and one repository."""

    def __init__(self, pool: Path, url: str, env: dict[str, str]):
        self.pool, self.url, self.env = pool, url, dict(env, BLOCKSNAP_REPO_PASSWORD="correct horse")

    def cli(self, *args, env: dict | None = None, check: bool = True, timeout: float = 180):
        res = run_cli(self.pool, *args, env=dict(self.env, BLOCKSNAP_REPO=self.url, **(env or {})),
                      timeout=timeout)
        assert "Traceback" not in res.stderr, res.stderr
        if check:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def backup(self, ref: str, *extra: str) -> dict:
        return json.loads(self.cli("backup", ref, "--json", *extra).stdout)

    def list(self) -> list[dict]:
        return json.loads(self.cli("backups", "--json").stdout)


@pytest.fixture
def local_repo(src: Path, tmp_path: Path) -> Repo:
    return Repo(src, f"file://{tmp_path / 'repo'}", {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free local port, for the whole session."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto's S3 server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_repo(src: Path, s3_server: str, request) -> Repo:
    import boto3
    bucket = "bk-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server, **{k.lower(): v for k, v in S3_ENV.items()
                                                  if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return Repo(src, f"s3://{bucket}/backups", dict(S3_ENV, BLOCKSNAP_S3_ENDPOINT=s3_server))


def export(pool: Path, ref: str, out: Path) -> bytes:
    res = run_cli(pool, "export", ref, str(out))
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    os.unlink(out)
    return data


def s3_bucket(s3_server: str, name: str) -> str:
    """A new bucket on the moto server (a name unique to the test)."""
    import boto3
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


class Side:
    """One repository of a copy: its URL and the options naming it, as `--from`
    or `--to` (endpoint and password file given on the command line)."""

    def __init__(self, url: str, password_file: Path, endpoint: str | None = None):
        self.url, self.password_file, self.endpoint = url, password_file, endpoint

    def args(self, side: str) -> list[str]:
        return [f"--{side}", self.url, f"--{side}-password-file", str(self.password_file),
                *([f"--{side}-endpoint", self.endpoint] if self.endpoint else [])]

    def repo_args(self) -> list[str]:
        """The same repository as `--repo` for the other commands."""
        return ["--repo", self.url, "--password-file", str(self.password_file),
                *(["--endpoint", self.endpoint] if self.endpoint else [])]


def side(kind: str, tmp_path: Path, name: str, password: str, s3_server: str | None = None) -> Side:
    """A repository (not made yet) on file:// or on the moto server, with its own password."""
    pw = tmp_path / f"{name}.pass"
    pw.write_text(password + "\n")
    if kind == "file":
        return Side(f"file://{tmp_path / name}", pw)
    assert s3_server is not None
    bucket = s3_bucket(s3_server, f"{name}-{os.urandom(4).hex()}")
    return Side(f"s3://{bucket}/repo", pw, s3_server)


def backup_here(pool_path: Path, repo, ref: str, way: str = "direct") -> dict:
    """make_backup in this process on an open Repository, as the CLI runs it: records
    read from the maps here (`direct`, no daemon), or through a send stream as a
    daemon's come (`piped`)."""
    import socket

    import blocksnap
    from blocksnap.backup.make import direct, make_backup, piped
    from blocksnap.service import ops
    with blocksnap.Pool.open(str(pool_path)) as pool:
        def created(r: str) -> float | None:
            try:
                return ops.snapshot_show(pool, r)["created"]
            except blocksnap.NotFound:
                return None
        source = direct(pool, ref) if way == "direct" else \
            piped(lambda fd, base, start: ops.send(pool, ref, fd, base, start=start))
        origin = {"host": socket.gethostname(), "pool": os.path.abspath(pool_path)}   # as the CLI's
        return make_backup(repo, origin, ref, "incremental", source, created)
