"""A backup reads its snapshot one of two ways: in the pool's own process, records
straight from the maps (`backup.make.direct`), or, while a daemon serves the pool,
as a send stream the daemon writes into a pipe (`backup.make.piped`). Both must
make the same backups, and both must stop at a damaged block of the pool."""
from __future__ import annotations

import json
import mmap
import random
from pathlib import Path

import pytest

from blocksnap.errors import CorruptionError
from tests.conftest import assert_cli_error, history_pool, root_skip_reason, run_cli

from .conftest import SIZE, Repo, export

SERVE_SKIP = root_skip_reason(["fusermount3"], "a FUSE daemon serving the pool")


def _serve(pool: Path, mnt: Path) -> int:
    mnt.mkdir()
    run_cli(pool, "serve", str(mnt), check=True)
    return json.loads((pool / "daemon.json").read_text())["pid"]


def _stop(pool: Path) -> None:
    if (pool / "daemon.json").exists():
        run_cli(pool, "stop", "--force", timeout=60)


def _backups(repo: Repo, refs: list[str]) -> list[dict]:
    return [repo.backup(ref) for ref in refs]


@pytest.mark.skipif(SERVE_SKIP is not None, reason=SERVE_SKIP or "")
def test_a_served_pool_backs_up_through_its_daemon_as_an_open_one_does(tmp_path: Path):
    pool = history_pool(tmp_path / "pool", SIZE)
    refs = ["v@s1", "v@s2", "v@s3"]
    want = {r: export(pool, r, tmp_path / "x.raw") for r in refs}
    here = Repo(pool, f"file://{tmp_path / 'here'}", {})
    made_here = _backups(here, refs)              # no daemon: read in this process
    pid = _serve(pool, tmp_path / "mnt")
    try:
        served = Repo(pool, f"file://{tmp_path / 'served'}", {})
        made_served = _backups(served, refs)      # the daemon holds the pool: it sends
        assert json.loads((pool / "daemon.json").read_text())["pid"] == pid
    finally:
        _stop(pool)
    for a, b in zip(made_here, made_served):
        assert (a["mode"], a["chunks"]) == (b["mode"], b["chunks"])
        for k in ("read_bytes", "chunks_read", "new_chunks", "packs"):
            assert a["stats"][k] == b["stats"][k], (a["source"], k)
    assert made_here[1]["mode"] == "incremental" and 0 < made_here[1]["stats"]["read_bytes"] < 4 << 20
    for repo, made in ((here, made_here), (served, made_served)):
        for b, ref in zip(made, refs):
            out = tmp_path / f"{b['id']}.raw"
            repo.cli("restore", b["id"], str(out), "--verify")
            assert out.read_bytes() == want[ref], ref


def _damage_a_block_of(pool: Path, ref: str, tmp_path: Path) -> None:
    """Flip a byte of the pool's data file inside one of the snapshot's blocks (found
    by its content: the pool keeps blocks as they are written)."""
    image = export(pool, ref, tmp_path / "probe.raw")
    probe = image[100:164]                        # 64 random bytes of its first block
    with open(pool / "data", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(probe)
        assert at > 0 and m.find(probe, at + 1) < 0
        at += random.randrange(64)
        m[at] ^= 0x40
        m.flush()


@pytest.mark.parametrize("way", ["here", "served"])
def test_a_damaged_pool_block_stops_the_backup_with_one_line(way: str, tmp_path: Path):
    if way == "served" and SERVE_SKIP:
        pytest.skip(SERVE_SKIP)
    pool = history_pool(tmp_path / "pool", SIZE)
    _damage_a_block_of(pool, "v@s1", tmp_path)
    repo = Repo(pool, f"file://{tmp_path / 'repo'}", {})
    if way == "served":
        _serve(pool, tmp_path / "mnt")
    try:
        err = assert_cli_error(repo.cli("-q", "backup", "v@s1", check=False), CorruptionError.exit_code)
        assert "checksum mismatch in snapshot v@s1 at block 0" in err, err
        assert repo.list() == []                  # no manifest, and no lock left behind
        assert not list((tmp_path / "repo" / "locks").iterdir())
    finally:
        _stop(pool)
