"""Resumable backups: a backup cut off (the repository gone mid-way, or kill -9) and
run again reads and stores only what the first run had not, and the result restores
bit for bit. Bytes are measured from the runs' own reports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import blocksnap
from blocksnap.backup import resume
from blocksnap.backup.repo import Repository
from blocksnap.errors import BlocksnapError
from blocksnap.service import ops

from .conftest import M, Repo, backup_here, export

PASSWORD = b"correct horse"


@pytest.fixture
def big(src: Path) -> Path:
    """v@big: 80 MiB of random data (five packs and more)."""
    with blocksnap.Pool.open(str(src)) as pool:
        v = pool.volume("v")
        v.resize(96 * M)
        v.write(8 * M, os.urandom(80 * M))
        v.snapshot("big")
    return src


class LostNetwork(BlocksnapError):
    pass


def _backup_in_process(pool_path: Path, url: str, ref: str, fail_after_packs: int | None = None) -> dict:
    """make_backup as the CLI runs it, with the repository's backend failing after
    `fail_after_packs` pack uploads (a network lost mid-way)."""
    repo, _ = Repository.open(url, lambda new: PASSWORD, create=True)
    if fail_after_packs is not None:
        put, count = repo.backend.put, [0]

        def failing_put(key: str, data: bytes) -> None:
            if key.startswith("data/"):
                count[0] += 1
                if count[0] > fail_after_packs:
                    raise LostNetwork("the network went away")
            put(key, data)
        repo.backend.put = failing_put
    return backup_here(pool_path, repo, ref, "piped")


def test_a_backup_cut_off_goes_on_from_where_it_stopped(big: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(resume, "MIN_EVERY", 0.0)    # a checkpoint at every durable pack
    monkeypatch.setattr(resume, "COST_SHARE", float("inf"))
    url = f"file://{tmp_path / 'repo'}"
    with pytest.raises(LostNetwork):
        _backup_in_process(big, url, "v@big", fail_after_packs=3)
    cps = list((tmp_path / "repo" / "checkpoints").iterdir())
    assert len(cps) == 1
    repo, _ = Repository.open(url, lambda new: PASSWORD)
    cp = resume.load(repo, f"checkpoints/{cps[0].name}")
    assert cp is not None and cp.position > 16 * M
    stored_first = sum(n for k, n in repo.backend.list("data").items())

    second = _backup_in_process(big, url, "v@big")
    st = second["stats"]
    with blocksnap.Pool.open(str(big)) as pool:
        total = sum(n for _, n in pool.volume("v").get_snapshot("big").data_extents())
    assert st["resumed_from"] == cp.position
    assert st["read_bytes"] == total - sum(n for off, n in _extents_below(big, cp.position))
    # stored: only what the first run had not (random data: every chunk new)
    repo, _ = Repository.open(url, lambda new: PASSWORD)
    assert st["new_bytes"] <= sum(repo.backend.list("data").values()) - stored_first + (1 << 20)
    assert st["new_bytes"] < total - cp.position + 17 * M    # at most the pack in flight again
    assert not list((tmp_path / "repo" / "checkpoints").iterdir())   # gone with the manifest
    r = Repo(big, url, {})
    out = tmp_path / "restored.raw"
    r.cli("restore", second["id"], str(out), "--verify")
    assert out.read_bytes() == export(big, "v@big", tmp_path / "x.raw")
    r.cli("verify", "--read-data")


def _extents_below(pool_path: Path, position: int) -> list[tuple[int, int]]:
    with blocksnap.Pool.open(str(pool_path)) as pool:
        ext = pool.volume("v").get_snapshot("big").data_extents()
    return [(off, min(n, position - off)) for off, n in ext if off < position]


KILLED = textwrap.dedent("""
    import sys, time
    from tests.backup import test_resume as t
    from blocksnap.backup import resume
    resume.MIN_EVERY, resume.COST_SHARE = 0.0, float("inf")   # a checkpoint at every durable pack
    saved = resume.save
    def save_then_stall(repo, cp):
        took = saved(repo, cp)
        if cp.position >= 32 << 20:
            print("checkpoint", cp.position, flush=True)
            time.sleep(600)          # killed here, with more packs in flight
        return took
    resume.save = save_then_stall
    t._backup_in_process(sys.argv[1], sys.argv[2], "v@big")
""")


def test_kill_9_mid_backup_then_the_cli_resumes(big: Path, tmp_path: Path):
    url = f"file://{tmp_path / 'repo'}"
    err = tmp_path / "stderr"
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, "-c", KILLED, str(big), url], stdout=subprocess.PIPE, text=True,
                                stderr=ef, cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()
        assert line.startswith("checkpoint"), err.read_text()
        position = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    r = Repo(big, url, {})
    assert r.list() == []                             # no manifest: nothing lied
    r.cli("unlock")                                   # the killed run's lock (its pid is gone)
    # a prune meanwhile keeps what the checkpoint names
    r.cli("prune", "--keep-last", "1")
    res = r.backup("v@big")
    assert res["stats"]["resumed_from"] == position
    with blocksnap.Pool.open(str(big)) as pool:
        total = sum(n for _, n in pool.volume("v").get_snapshot("big").data_extents())
    assert res["stats"]["read_bytes"] == total - sum(n for _, n in _extents_below(big, position))
    out = tmp_path / "restored.raw"
    r.cli("restore", res["id"], str(out), "--verify")
    assert out.read_bytes() == export(big, "v@big", tmp_path / "x.raw")
    assert json.loads(r.cli("verify", "--read-data", "--json").stdout)["problems"] == []


def test_a_partial_stream_is_never_received(big: Path, tmp_path: Path):
    from tests.conftest import assert_cli_error, run_cli
    with blocksnap.Pool.open(str(big)) as pool, open(tmp_path / "part", "wb") as f:
        ops.send(pool, "v@big", f.fileno(), start=16 * M)
    other = tmp_path / "other"
    run_cli(other, "pool", "init", "--size", "256M", check=True)
    assert_cli_error(run_cli(other, "receive", "w", "-i", tmp_path / "part"), 1, "damaged stream")
    assert json.loads(run_cli(other, "volume", "list", "--json").stdout) == []
