"""Fixtures for recovery: a pool whose volume holds a real ext4 filesystem (made
with `mkfs.ext4 -d` from a directory of files, then `volume import`ed), its
snapshot backed up into a local repository or moto's S3 server, and checks that
nothing a mount or a drill made is left: mounts, loop devices, processes."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.backup.conftest import S3_ENV, Repo, s3_server  # noqa: F401  (s3_server: a fixture)
from tests.conftest import mark_root_dir, root_skip_reason
from tests.fuse.conftest import cleanup_under

NEEDS = ["losetup", "mount", "umount", "fusermount3", "mkfs.ext4", "e2fsck"]
_REASON = root_skip_reason(NEEDS, "loop devices, FUSE and filesystem mounts")
M = 1 << 20


def pytest_collection_modifyitems(config, items):
    mark_root_dir(items, "recovery", _REASON)


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch) -> Path:
    """A private runtime directory: the state of mounts and drills is kept there."""
    d = tmp_path / "run"
    monkeypatch.setenv("BLOCKSNAP_RUNTIME_DIR", str(d))
    yield d
    cleanup_under(d)
    cleanup_under(tmp_path)


def make_tree(root: Path, seed: int = 7) -> None:
    """Files of many sizes (some larger than a chunk, some tiny, one sparse), in subdirectories."""
    rnd = random.Random(seed)
    for i in range(30):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        n = rnd.choice([0, 1, 100, 4096, 65536 + 5, 300_000, 1_200_000])
        (d / f"f{i}.bin").write_bytes(rnd.randbytes(n))
    (root / "hello.txt").write_text("hello from the backup\n")
    with open(root / "sparse.img", "wb") as f:
        f.seek(3 * M)
        f.write(b"tail")


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = Path(d) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return {k: v for k, v in out.items() if not k.startswith("lost+found")}


class Backup:
    """A volume v with an ext4 filesystem of `files`, snapshot v@s1, backed up."""

    def __init__(self, repo: Repo, files: Path, tmp: Path):
        self.repo, self.files, self.tmp = repo, files, tmp
        self.pool = repo.pool
        b = repo.backup("v@s1")
        self.id = b["id"]

    def cli(self, *args, **kw):
        return self.repo.cli(*args, **kw)


def ext4_backup(repo: Repo, tmp: Path, size: str = "64M") -> Backup:
    files = tmp / "files"
    make_tree(files)
    img = tmp / "fs.img"
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(img)], check=True)
    repo.cli("volume", "import", "v", str(img))
    img.unlink()
    repo.cli("snapshot", "create", "v@s1")
    return Backup(repo, files, tmp)


@pytest.fixture
def local_backup(tmp_path: Path) -> Backup:
    import blocksnap
    pool = tmp_path / "pool"
    blocksnap.Pool.create(str(pool), size=256 * M).close()
    return ext4_backup(Repo(pool, f"file://{tmp_path / 'repo'}", {}), tmp_path)


def s3_bucket(server: str, name: str) -> str:
    import boto3
    bucket = "rc-" + name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    boto3.client("s3", endpoint_url=server, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_backup(tmp_path: Path, s3_server: str, request) -> Backup:  # noqa: F811
    import blocksnap
    pool = tmp_path / "pool"
    blocksnap.Pool.create(str(pool), size=256 * M).close()
    bucket = s3_bucket(s3_server, request.node.name)
    return ext4_backup(Repo(pool, f"s3://{bucket}/backups", dict(S3_ENV, BLOCKSNAP_S3_ENDPOINT=s3_server)), tmp_path)


def states(runtime: Path) -> list[dict]:
    d = runtime / "recovery"
    return [json.loads((s / "state.json").read_text()) for s in d.iterdir()
            if (s / "state.json").exists()] if d.is_dir() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def assert_nothing_left(runtime: Path, *paths: Path | str, pids: tuple[int, ...] = ()) -> None:
    """No mount, loop device or process that a mount or drill made is left."""
    with open("/proc/mounts") as f:
        mounts = f.read()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for p in (runtime, *paths):
        assert f" {p}" not in mounts, mounts
        assert str(p) not in loops, loops
    assert "blocksnap-backup:" not in "".join(ln for ln in mounts.splitlines(True) if str(runtime) in ln)
    assert states(runtime) == []
    for pid in pids:
        assert not alive(pid), f"pid {pid} still runs"
