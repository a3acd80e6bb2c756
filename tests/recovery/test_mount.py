"""`blocksnap mount --repo`: a backup's filesystem read-only without a restore,
from a local repository and from moto's S3 server, through the real command line."""
from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from tests.backup.conftest import export
from tests.conftest import assert_cli_error

from .conftest import assert_nothing_left, states, tree

M = 1 << 20


def _mount(b, mnt: Path, *extra: str) -> dict:
    res = b.cli("mount", b.id, str(mnt), "--json", *extra)
    return json.loads(res.stdout)


def _check_mounted_files(b, runtime: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    info = _mount(b, mnt)
    assert info["fstype"] == "ext4" and info["backup"] == b.id and info["device"].startswith("/dev/loop")
    (st,) = states(runtime)
    server = st["server_pid"]
    try:
        assert tree(mnt) == tree(b.files)
        with pytest.raises(OSError) as e:
            (mnt / "new.txt").write_text("x")
        assert e.value.errno == errno.EROFS
    finally:
        b.cli("umount", str(mnt))
    assert_nothing_left(runtime, mnt, pids=(server,))
    assert os.listdir(mnt) == []


def test_mount_local_files_equal_the_snapshot(local_backup, runtime_dir, tmp_path):
    _check_mounted_files(local_backup, runtime_dir, tmp_path)


def test_mount_s3_files_equal_the_snapshot(s3_backup, runtime_dir, tmp_path):
    _check_mounted_files(s3_backup, runtime_dir, tmp_path)


def _random_reads(img: Path, want: bytes, n: int = 300) -> None:
    rnd = random.Random(3)
    with open(img, "rb", buffering=0) as f:
        for i in range(n):
            size = 4096 if i % 3 else rnd.choice([1, 512, 70_000, 300_000])   # some span chunks
            off = rnd.randrange(0, len(want) - size) if i % 5 else rnd.randrange(0, len(want) // 4096) * 4096
            assert os.pread(f.fileno(), size, off) == want[off:off + size], (off, size)
        assert os.pread(f.fileno(), 100, len(want) - 10) == want[-10:]      # the end of the image


@pytest.mark.parametrize("where", ["local", "s3"])
def test_image_reads_equal_export_with_a_small_cache(where, request, runtime_dir, tmp_path):
    b = request.getfixturevalue(f"{where}_backup")
    want = export(b.pool, "v@s1", tmp_path / "export.raw")
    mnt = tmp_path / "img"
    mnt.mkdir()
    info = _mount(b, mnt, "--image-only", "--cache", "1M")     # 16 chunks; the data is about 12 MiB
    img = mnt / f"{b.id}.img"
    assert info["image"] == str(img) and img.stat().st_size == len(want)
    assert os.listdir(mnt) == [img.name]
    try:
        _random_reads(img, want)
        with pytest.raises(OSError) as e:
            open(img, "r+b")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    finally:
        b.cli("umount", str(mnt))
    assert_nothing_left(runtime_dir, mnt)


def test_source_cache_smaller_than_the_data(local_backup, tmp_path):
    """The block source itself: a 4-slot cache evicts, and every read stays exact."""
    from blocksnap.backup.repo import Repository
    from blocksnap.recovery.source import BlockSource, ChunkCache

    b = local_backup
    want = export(b.pool, "v@s1", tmp_path / "export.raw")
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    m = repo.manifest(b.id)
    repo.load_index()
    for directory in (None, str(tmp_path / "cache")):
        cache = ChunkCache(256 << 10, m.info["chunk_size"], directory)
        src = BlockSource(repo, m, cache)
        rnd = random.Random(5)
        for _ in range(200):
            off = rnd.randrange(0, len(want) - 200_000)
            n = rnd.choice([4096, 200_000])
            assert src.read(off, n) == want[off:off + n]
        assert len(cache) <= cache.slots == 4 and cache.misses > 4 * cache.slots
        assert src.fetched_bytes < 200 * 200_000
        assert dict(src.chunks()) == {i: want[i * 65536:(i + 1) * 65536] for i in m.chunk_numbers().tolist()}
        src.close()


def damage_chunk(b, row: int | None = None) -> tuple[str, int]:
    """Flip a byte inside a stored chunk (by default one in the middle of the image,
    used once): its ID (hex) and image offset."""
    from blocksnap.backup.repo import Repository
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    m = repo.manifest(b.id)
    repo.load_index()
    nums = m.chunk_numbers()
    if row is None:
        ids = [r.tobytes() for r in m.ids]
        row = next(r for r in range(len(nums) // 2, len(nums)) if ids.count(ids[r]) == 1)
    cid = m.ids[row].tobytes()
    pack, off, ln = repo.index.get(cid)
    path = Path(b.repo.url[len("file://"):]) / "data" / pack
    data = bytearray(path.read_bytes())
    data[off + ln // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return cid.hex(), int(nums[row]) * m.info["chunk_size"]


def test_corrupt_chunk_named(local_backup, runtime_dir, tmp_path):
    from blocksnap.backup.repo import Repository
    from blocksnap.errors import CorruptionError
    from blocksnap.recovery.source import BlockSource, ChunkCache

    b = local_backup
    want = export(b.pool, "v@s1", tmp_path / "export.raw")
    cid, at = damage_chunk(b)
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    m = repo.manifest(b.id)
    repo.load_index()
    src = BlockSource(repo, m, ChunkCache(1 << 20, 65536))
    with pytest.raises(CorruptionError) as e:
        src.read(at + 100, 10)
    assert cid in str(e.value) and f"image offset {at}" in str(e.value) and "authentication" in str(e.value)
    assert src.read(at - 4096, 4096) == want[at - 4096:at]        # its neighbours still read
    src.close()

    mnt = tmp_path / "img"
    mnt.mkdir()
    _mount(b, mnt, "--image-only")
    img = mnt / f"{b.id}.img"
    try:
        with open(img, "rb", buffering=0) as f:
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), 4096, at)
            assert e.value.errno == errno.EIO
            assert os.pread(f.fileno(), 4096, at - 4096) == want[at - 4096:at]
        (st,) = states(runtime_dir)
        log = (Path(runtime_dir) / "recovery").glob("*/damaged")
        assert any(cid in p.read_text() for p in log)
    finally:
        res = b.cli("umount", str(mnt))
    assert cid in res.stderr and res.stderr.startswith("warning: read a damaged chunk")
    assert_nothing_left(runtime_dir, mnt, pids=(st["server_pid"],))


def test_bad_inputs(local_backup, runtime_dir, tmp_path):
    b = local_backup
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert_cli_error(b.cli("mount", "20990101T000000Z-000000", str(mnt), check=False), 3, "no backup")
    assert_cli_error(b.cli("mount", b.id, str(mnt), env={"BLOCKSNAP_REPO_PASSWORD": "wrong"}, check=False), 1,
                     "wrong password")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_cli_error(b.cli("mount", b.id, str(afile), check=False), 1, "not a directory")
    assert_cli_error(b.cli("mount", b.id, str(tmp_path / "missing"), check=False), 3, "no such directory")
    assert_cli_error(b.cli("mount", b.id, str(mnt), "--repo", f"file://{tmp_path}/norepo", check=False), 3,
                     "no blocksnap repository")
    assert_cli_error(b.cli("umount", str(tmp_path / "missing"), check=False), 3, "not")
    assert_nothing_left(runtime_dir, mnt)
    _mount(b, mnt)
    try:
        assert_cli_error(b.cli("mount", b.id, str(mnt), check=False), 5, "already a mountpoint")
        other = tmp_path / "other"
        other.mkdir()
        assert_cli_error(b.cli("mount", b.id, str(other), "--image-only", "--cache", "1K", check=False), 1,
                         "--cache")
        assert_cli_error(b.cli("mount", "v@s1", str(other), "--repo", b.repo.url, check=False), 1, "snapshot")
        with open(mnt / "hello.txt") as busy:
            assert_cli_error(b.cli("umount", str(mnt), check=False), 5, "busy")
            assert busy.read() == "hello from the backup\n"       # refused: nothing was taken down
    finally:
        b.cli("umount", str(mnt))
    assert_nothing_left(runtime_dir, mnt)
