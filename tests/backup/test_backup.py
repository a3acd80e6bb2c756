"""Backups end to end through the real CLI: to a local directory and to an S3 server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blocksnap.errors import AlreadyExists, Busy, CorruptionError, NotFound
from tests.conftest import assert_cli_error, run_cli

from .conftest import M, Repo, export, three_generations


@pytest.fixture(params=["local", "s3"])
def repo(request) -> Repo:
    return request.getfixturevalue(f"{request.param}_repo")


def test_full_incremental_differential_restore_bit_for_bit(repo: Repo, src: Path, tmp_path: Path):
    want = {s: export(src, f"v@{s}", tmp_path / "x.raw") for s in ("s1", "s2", "s3")}
    b1 = repo.backup("v@s1")                       # incremental with no base: a full one
    assert b1["mode"] == "full" and b1["base"] is None and "no earlier backup" in b1["note"]
    b2 = repo.backup("v@s2")
    assert b2["mode"] == "incremental" and b2["base"] == b1["id"]
    b3 = repo.backup("v@s3", "--mode", "differential")
    assert b3["mode"] == "differential" and b3["base"] == b1["id"]
    # read from the maps: only what changed since the base is read
    diff12 = run_cli(src, "snapshot", "diff", "v@s1", "v@s2", "--json").stdout
    changed = json.loads(diff12)["changed_bytes"]
    assert 0 < b2["stats"]["read_bytes"] <= changed < b1["stats"]["read_bytes"] + changed
    assert b2["stats"]["new_chunks"] < b1["stats"]["new_chunks"]
    b4 = repo.backup("v@s3", "--mode", "full")
    assert b4["mode"] == "full" and b4["stats"]["new_chunks"] == 0   # all deduplicated
    assert [b["id"] for b in repo.list()] == [b1["id"], b2["id"], b3["id"], b4["id"]]
    for b, snap in ((b1, "s1"), (b2, "s2"), (b3, "s3"), (b4, "s3")):
        out = tmp_path / f"{b['id']}.raw"
        repo.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == want[snap], snap
        assert os.stat(out).st_blocks * 512 < out.stat().st_size     # holes stay holes
    # every backup is whole: the pool can go, and the first backup with it
    run_cli(src, "volume", "delete", "v", "--recursive")
    repo.cli("prune", "--keep-last", "1")
    assert [b["id"] for b in repo.list()] == [b4["id"]]
    repo.cli("verify", "--read-data")
    out = tmp_path / "again.raw"
    repo.cli("restore", b4["id"][:17], str(out))     # a unique prefix of the ID will do
    assert out.read_bytes() == want["s3"]


def test_repository_holds_no_plaintext_and_needs_the_password(repo: Repo, src: Path, tmp_path: Path):
    repo.backup("v@s1")
    if repo.url.startswith("file://"):
        block = export(src, "v@s1", tmp_path / "x.raw")[:1 << 16]
        probe = block[1000:1064]     # 64 random bytes of the volume
        for p in Path(repo.url[7:]).rglob("*"):
            if p.is_file():
                assert probe not in p.read_bytes(), p
    assert_cli_error(repo.cli("backups", env={"BLOCKSNAP_REPO_PASSWORD": "wrong"}, check=False),
                     1, "wrong password")
    assert_cli_error(repo.cli("backups", env={"BLOCKSNAP_REPO_PASSWORD": ""}, check=False), 1, "password")


def test_bad_inputs_get_one_error_line_and_change_nothing(local_repo: Repo, tmp_path: Path):
    r = local_repo
    assert_cli_error(r.cli("backups", check=False), NotFound.exit_code, "no blocksnap repository")
    assert not Path(r.url[7:]).exists()
    assert_cli_error(r.cli("backup", "v@nope", check=False), NotFound.exit_code, "nope")
    assert_cli_error(r.cli("backup", "nope@s1", check=False), NotFound.exit_code)
    assert_cli_error(r.cli("backup", "v", check=False), 1, "VOLUME@NAME")
    assert_cli_error(r.cli("backup", "v@s1", "--repo", "ftp://x/y", check=False), 1, "file:///PATH")
    assert_cli_error(r.cli("backup", "v@s1", "--mode", "weekly", check=False), 2)
    b = r.backup("v@s1")
    assert_cli_error(r.cli("backup", "v@s1", check=False), 1, "already backed up")
    assert_cli_error(r.cli("restore", "20990101", str(tmp_path / "o.raw"), check=False), NotFound.exit_code,
                     "no backup")
    keep = tmp_path / "precious.img"
    keep.write_bytes(b"precious")
    assert_cli_error(r.cli("restore", b["id"], str(keep), check=False), AlreadyExists.exit_code, "exists")
    assert keep.read_bytes() == b"precious"
    assert_cli_error(r.cli("restore", b["id"], str(tmp_path), check=False), 1, "directory")
    assert_cli_error(r.cli("prune", check=False), 1, "no --keep")
    assert_cli_error(r.cli("prune", "--keep-within", "7x", check=False), 1, "duration")
    assert [x["id"] for x in r.list()] == [b["id"]]


def test_damage_is_found_and_never_restored(local_repo: Repo, tmp_path: Path):
    r = local_repo
    b = r.backup("v@s1")
    root = Path(r.url[7:])
    packs = sorted((root / "data").iterdir())
    r.cli("verify")
    blob = bytearray(packs[0].read_bytes())
    blob[len(blob) // 2] ^= 0x40
    packs[0].write_bytes(blob)
    r.cli("verify")                                   # sizes and indexes: still fine
    res = r.cli("verify", "--read-data", check=False)
    assert res.returncode == CorruptionError.exit_code and "problem: " in res.stdout and "damaged" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: 1 problems")
    out = tmp_path / "r.raw"
    assert_cli_error(r.cli("restore", b["id"], str(out), check=False), CorruptionError.exit_code, "damaged")
    assert not out.exists()                           # nothing half-restored left behind
    packs[0].unlink()
    res = r.cli("verify", "--list-packs", check=False)
    assert res.returncode == CorruptionError.exit_code and "is missing" in res.stdout


def test_prune_keeps_what_the_policy_says_and_frees_the_rest(local_repo: Repo, src: Path, tmp_path: Path):
    import blocksnap
    with blocksnap.Pool.open(str(src)) as pool:
        three_generations(pool.create_volume("w", size=8 * M))
    r = local_repo
    ids = [r.backup(f"w@{s}")["id"] for s in ("a", "b", "c")]
    v1 = r.backup("v@s1")["id"]               # another volume: its own policy
    root = Path(r.url[7:])
    before = sum(p.stat().st_size for p in (root / "data").iterdir())
    dry = r.cli("prune", "--keep-last", "1", "--dry-run").stdout
    assert f"would remove {ids[0]}" in dry and f"would remove {ids[1]}" in dry and len(r.list()) == 4
    res = json.loads(r.cli("prune", "--keep-last", "1", "--json").stdout)
    assert sorted(res["removed"]) == sorted(ids[:2])
    assert res["packs_deleted"] == 1 and res["packs_rewritten"] == 1
    assert sorted(b["id"] for b in r.list()) == sorted([ids[2], v1])
    after = sum(p.stat().st_size for p in (root / "data").iterdir())
    assert before - after > 5 * M
    r.cli("verify", "--read-data")
    for bid, ref in ((ids[2], "w@c"), (v1, "v@s1")):
        out = tmp_path / "r.raw"
        r.cli("restore", bid, str(out), "--verify")
        assert out.read_bytes() == export(src, ref, tmp_path / "x.raw")
        out.unlink()


def test_locks_of_dead_and_foreign_holders(local_repo: Repo):
    import socket
    r = local_repo
    r.backup("v@s1")
    locks = Path(r.url[7:]) / "locks"
    locks.mkdir(exist_ok=True)
    gone = subprocess.Popen(["true"])
    gone.wait()                                       # a pid of this host that no longer runs
    (locks / "1-dead").write_text(json.dumps({"op": "prune", "exclusive": True, "pid": gone.pid,
                                              "host": socket.gethostname(), "time": 0}))
    err = assert_cli_error(r.cli("backup", "v@s2", check=False), Busy.exit_code, "locked by prune")
    assert "`blocksnap unlock` removes" in err
    assert "removed 1 locks" in r.cli("unlock").stdout
    (locks / "2-far").write_text(json.dumps({"op": "backup", "exclusive": False, "pid": 1, "host": "elsewhere",
                                             "time": 0}))
    assert_cli_error(r.cli("prune", "--keep-last", "1", check=False), Busy.exit_code, "unlock --all")
    assert len(r.list()) == 1
    out = r.cli("unlock").stdout                      # a live or foreign holder's lock stays
    assert "removed 0 locks; kept 1" in out and (locks / "2-far").exists()
    r.cli("backup", "v@s2")                           # a shared lock does not stop a backup
    assert_cli_error(r.cli("prune", "--keep-last", "1", check=False), Busy.exit_code, "locked by backup")
    r.cli("unlock", "--all")
    r.cli("prune", "--keep-last", "1")
    assert len(r.list()) == 1


def test_never_a_manifest_naming_missing_chunks(local_repo: Repo, tmp_path: Path):
    """A base whose packs went (a prune run under a backup, by hand): the next
    backup refuses to name them instead of making a backup that cannot restore."""
    r = local_repo
    r.backup("v@s1")
    root = Path(r.url[7:])
    for d in ("data", "index"):
        for p in (root / d).iterdir():
            p.unlink()
    assert_cli_error(r.cli("backup", "v@s2", check=False), CorruptionError.exit_code, "not stored; no backup made")
    assert len(r.list()) == 1
    b = r.backup("v@s2", "--mode", "full")           # a full one stores everything again
    out = tmp_path / "r.raw"
    r.cli("restore", b["id"], str(out), "--verify")


def test_older_snapshot_and_other_pools_make_full_backups(local_repo: Repo, tmp_path: Path):
    from tests.conftest import history_pool
    r = local_repo
    r.backup("v@s2")
    old = r.backup("v@s1")                            # older than the last backup's snapshot
    assert old["mode"] == "full" and "newer snapshot" in old["note"]
    other = Repo(history_pool(tmp_path / "pool2"), r.url, {})   # same volume name, another pool
    b = other.backup("v@s3")
    assert b["mode"] == "full" and "no earlier backup" in b["note"]
    res = json.loads(r.cli("prune", "--keep-last", "1", "--json").stdout)   # per pool and volume
    assert b["id"] in res["kept"] and len(res["kept"]) == 2
    out = tmp_path / "r.raw"
    other.cli("restore", b["id"], str(out), "--verify")
    assert out.read_bytes() == export(other.pool, "v@s3", tmp_path / "x.raw")


def test_two_processes_creating_one_repository_agree_on_its_key(tmp_path: Path):
    import threading

    from blocksnap.backup.repo import Repository
    url = f"file://{tmp_path / 'repo'}"
    got, errors = [], []

    def make():
        try:
            repo, _ = Repository.open(url, lambda new: b"pw", create=True)
            cid = repo.keys.chunk_id(b"x" * 99)
            repo.write_pack([(cid, repo.chunk_blob(cid, b"x" * 99))])
            got.append(repo)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=make) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(got) == 4
    fresh, created = Repository.open(url, lambda new: b"pw")
    assert not created and fresh.load_index() == 1    # every pack's index opens with the one key


def test_malformed_endpoint(src: Path):
    r = Repo(src, "s3://b/x", {"BLOCKSNAP_S3_ENDPOINT": "minio:9000", "AWS_ACCESS_KEY_ID": "a",
                               "AWS_SECRET_ACCESS_KEY": "b"})
    assert_cli_error(r.cli("backups", check=False), 1, "invalid S3 endpoint")


def test_backup_cut_short_leaves_a_consistent_repository(local_repo: Repo, src: Path, tmp_path: Path):
    """kill -9 of a backup once its first pack is stored: no manifest, verify is clean,
    prune removes the orphan pack, and the next backup is whole."""
    import time

    import blocksnap
    with blocksnap.Pool.open(str(src)) as pool:   # enough data for several packs
        v = pool.volume("v")
        v.resize(96 * M)
        v.write(32 * M, os.urandom(60 * M))
        v.snapshot("big")
    r = local_repo
    r.backup("v@s1")
    root = Path(r.url[7:])
    first = set((root / "data").iterdir())
    env = dict(os.environ, **r.env, BLOCKSNAP_REPO=r.url)
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(src), "backup", "v@big"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and \
            not [p for p in set((root / "data").iterdir()) - first if not p.name.startswith(".")]:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert len(r.list()) == 1
    assert len(set((root / "data").iterdir()) - first) >= 1
    r.cli("unlock")                                   # the killed backup's lock (its pid is gone)
    r.cli("verify", "--read-data")
    # a checkpoint (if the run got that far, tests/backup/test_resume.py) keeps its packs
    resumable = (root / "checkpoints").exists() and any((root / "checkpoints").iterdir())
    pruned = r.cli("prune", "--keep-last", "5", "--json").stdout
    assert '"packs_deleted": ' in pruned or resumable
    assert resumable or set((root / "data").iterdir()) == first
    b = r.backup("v@big")
    assert (b["stats"]["resumed_from"] > 0) == resumable
    out = tmp_path / "big.raw"
    r.cli("restore", b["id"], str(out), "--verify")
    assert out.read_bytes() == export(src, "v@big", tmp_path / "x.raw")


def test_s3_errors_are_one_line(s3_server: str, src: Path, tmp_path: Path):
    from .conftest import S3_ENV
    r = Repo(src, "s3://no-such-bucket/x", dict(S3_ENV, BLOCKSNAP_S3_ENDPOINT=s3_server))
    assert_cli_error(r.cli("backup", "v@s1", check=False), 1, "no such bucket")
    dead = Repo(src, "s3://b/x", dict(S3_ENV, BLOCKSNAP_S3_ENDPOINT="http://127.0.0.1:9"))
    assert_cli_error(dead.cli("backups", check=False, timeout=120), 1, "failed")


def test_snapshot_prune_applies_the_same_policy_locally(src: Path):
    res = run_cli(src, "snapshot", "prune", "v", "--keep-last", "2", "--dry-run")
    assert res.returncode == 0 and "would delete v@s1" in res.stdout
    assert "v@s1" in run_cli(src, "snapshot", "list", "v").stdout
    res = run_cli(src, "snapshot", "prune", "v", "--keep-last", "2")
    assert res.returncode == 0 and "deleted v@s1" in res.stdout
    names = run_cli(src, "snapshot", "list", "v").stdout
    assert "v@s1" not in names and "v@s2" in names and "v@s3" in names
    assert_cli_error(run_cli(src, "snapshot", "prune", "v"), 1, "no --keep")


def test_s3_objects_written_only_if_absent(s3_server: str, monkeypatch):
    import boto3

    from blocksnap.backup.backends import open_backend

    from .conftest import S3_ENV
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="once")
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    b = open_backend("s3://once/p", s3_server)
    assert b.put_new("config", b"first") and not b.put_new("config", b"second")
    assert b.get("config") == b"first"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_ranged_reads_agree_on_both_backends(kind: str, s3_server: str, tmp_path: Path, monkeypatch):
    """get_range: the bytes asked for, shorter at the end, nothing past it, and a
    missing object is NotFound, the same on a directory and on S3."""
    import boto3

    from blocksnap.backup.backends import open_backend
    from blocksnap.errors import NotFound

    from .conftest import S3_ENV
    if kind == "s3":
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="ranges")
        for k, v in S3_ENV.items():
            monkeypatch.setenv(k, v)
        b = open_backend("s3://ranges/p", s3_server)
    else:
        b = open_backend(f"file://{tmp_path / 'repo'}")
    data = bytes(range(256)) * 40
    b.put("data/x", data)
    assert b.get_range("data/x", 0, 10) == data[:10]
    assert b.get_range("data/x", 1000, 3000) == data[1000:4000]
    assert b.get_range("data/x", len(data) - 5, 100) == data[-5:]
    assert b.get_range("data/x", len(data), 10) == b""
    assert b.get_range("data/x", len(data) + 50, 10) == b""
    assert b.get_range("data/x", 7, 0) == b""
    with pytest.raises(NotFound):
        b.get_range("data/missing", 0, 10)


def test_a_pack_that_cannot_be_written_fails_the_backup_cleanly(local_repo: Repo):
    """An error on the pack-writing thread reaches the command as one line, with no
    manifest written and no thread left hanging."""
    r = local_repo
    r.backup("v@s1")
    data = Path(r.url[7:]) / "data"
    data.rename(data.with_name("data.away"))
    data.write_bytes(b"not a directory")
    assert_cli_error(r.cli("backup", "v@s2", check=False, timeout=60), 1)
    assert len(r.list()) == 1
    data.unlink()
    data.with_name("data.away").rename(data)
    assert not list((data.parent / "locks").iterdir())   # its lock went with it
    r.cli("verify", "--read-data")
    assert r.backup("v@s2")["mode"] == "incremental"


def test_progress_on_a_terminal_and_quiet_otherwise(local_repo: Repo, monkeypatch, tmp_path: Path):
    from tests.cli.test_cli import _run_with_tty_stderr
    r = local_repo
    for k, v in dict(r.env, BLOCKSNAP_REPO=r.url).items():
        monkeypatch.setenv(k, v)
    code, out, tty = _run_with_tty_stderr(r.pool, "backup", "v@s1")
    assert code == 0 and b"backup v@s1" in tty and out.startswith(b"backup ") and b"\x1b" not in out
    res = r.cli("-q", "backup", "v@s2")
    assert res.stdout == "" and res.stderr == ""
    piped = r.cli("backup", "v@s3")
    assert "\x1b" not in piped.stdout + piped.stderr and len(piped.stdout.splitlines()) == 1
    bid = r.list()[-1]["id"]
    code, out, tty = _run_with_tty_stderr(r.pool, "restore", bid, tmp_path / "r.raw")
    assert code == 0 and f"restore {bid}".encode() in tty
    code, out, tty = _run_with_tty_stderr(r.pool, "verify", "--read-data")
    assert code == 0 and b"verify" in tty


def test_a_failure_with_records_in_flight_reports_its_real_cause(local_repo: Repo, src: Path, tmp_path: Path):
    """A pack write failing while records are still being worked on: the real error
    (not an internal one), no manifest, no lock left, and a restore that cannot make
    its file leaves none."""
    import blocksnap
    with blocksnap.Pool.open(str(src)) as pool:
        v = pool.volume("v")
        v.resize(96 * M)
        v.write(32 * M, os.urandom(60 * M))
        v.snapshot("big")
    r = local_repo
    b = r.backup("v@s1")
    data = Path(r.url[7:]) / "data"
    data.rename(data.with_name("data.away"))
    data.write_bytes(b"not a directory")
    err = assert_cli_error(r.cli("backup", "v@big", check=False, timeout=120), 1)
    assert "internal error" not in err and ("exists" in err.lower() or "directory" in err.lower()), err
    assert len(r.list()) == 1 and not list((data.parent / "locks").iterdir())
    data.unlink()
    data.with_name("data.away").rename(data)
    out = tmp_path / "small-fs.raw"
    code = ("import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "sys.argv = ['blocksnap', 'restore', sys.argv[1], sys.argv[2]]; "
            "runpy.run_module('blocksnap', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code, b["id"], str(out)], capture_output=True, text=True,
                         env=dict(os.environ, **r.env, BLOCKSNAP_REPO=r.url),
                         preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert res.returncode == 1 and "too large" in res.stderr.lower(), res.stderr
    assert not out.exists()                  # no empty file left to block a retry


def test_restore_fetches_only_the_parts_of_old_packs_it_needs(repo: Repo, tmp_path: Path):
    """An incremental backup that keeps a quarter of an old pack's chunks: restore
    fetches that quarter (ranged reads; S3 Range GETs), not the whole pack."""
    import random

    import blocksnap
    pool = tmp_path / "p2"
    with blocksnap.Pool.create(str(pool), size=64 * M) as p:
        v = p.create_volume("w", size=8 * M, block_size=64 << 10)
        v.write(0, random.Random(1).randbytes(8 * M))      # incompressible: one ~8 MiB pack
        v.snapshot("a")
        v.write(0, random.Random(2).randbytes(6 * M))      # the first 3/4 replaced
        v.snapshot("b")
    r = Repo(pool, repo.url, repo.env)
    r.backup("w@a")
    b = r.backup("w@b")
    assert b["mode"] == "incremental"
    out = tmp_path / "b.raw"
    res = json.loads(r.cli("restore", b["id"], str(out), "--json").stdout)
    assert out.read_bytes() == export(pool, "w@b", tmp_path / "x.raw")
    # 2 MiB from the first pack and 6 MiB from the second (plus a little framing),
    # where whole packs would be 8 + 6 MiB
    assert 8 * M <= res["bytes_fetched"] < 9 * M, res
    assert "fetched" in r.cli("restore", b["id"], str(tmp_path / "c.raw")).stdout
