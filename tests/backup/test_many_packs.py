"""Many packs (issue 16): merged indexes, so that a command starts with a few GETs.

Filler packs are written straight through the Repository API (small random
chunks that no backup names), so that a test has hundreds or thousands of packs
without making hundreds of backups. Backups themselves go through the CLI.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from blocksnap.backup import index_files
from blocksnap.backup.backends import open_backend
from blocksnap.backup.chunk_index import missing_chunks
from blocksnap.backup.maintain import prune, verify
from blocksnap.backup.repo import Repository
from blocksnap.errors import CorruptionError
from blocksnap.retention import Policy

from .conftest import S3_ENV, Repo, export, three_generations

PASSWORD = b"correct horse"     # the conftest Repo's


_KEYS: dict[str, tuple] = {}


def open_repo(url: str, endpoint: str | None = None) -> Repository:
    """A fresh Repository (nothing cached but the unlocked key: scrypt once per test repository)."""
    if url not in _KEYS or not Path(url[7:]).exists():
        repo = Repository.open(url, lambda _new: PASSWORD, endpoint)[0]
        _KEYS[url] = (repo.keys, repo.config)
        return repo
    keys, config = _KEYS[url]
    return Repository(open_backend(url), keys, config)


def filler(repo: Repository, packs: int, chunks: int = 2) -> list[str]:
    """Packs of small random chunks (each with its own loose index)."""
    out = []
    for _ in range(packs):
        blobs = []
        for _ in range(chunks):
            data = os.urandom(64)
            cid = repo.keys.chunk_id(data)
            blobs.append((cid, repo.chunk_blob(cid, data)))
        out.append(repo.write_pack(blobs))
    return out


def index_names(repo: Repository) -> tuple[list[str], list[str]]:
    """(merged, loose) index object names."""
    names = sorted(k.split("/", 1)[1] for k in repo.backend.list("index"))
    return [n for n in names if index_files.is_merged(n)], [n for n in names if not index_files.is_merged(n)]


def start_as_backup(repo: Repository) -> int:
    """What a backup does first: load the index under its lock (and merge)."""
    with repo.lock("backup"):
        return repo.load_index()


def named_packs(repo: Repository) -> set[str]:
    return set(index_files.pack_contents(index_files.read_all(repo)))


def assert_whole(repo: Repository) -> None:
    """No index names a pack that is gone or short, and every backup's chunks are indexed."""
    repo = open_repo(repo.url)
    objects = index_files.read_all(repo)
    sizes = {k.split("/", 1)[1]: n for k, n in repo.backend.list("data").items()}
    for pack, (_, offs, lens) in index_files.pack_contents(objects).items():
        assert pack in sizes, f"an index names the missing pack {pack}"
        assert sizes[pack] >= int((offs.astype(np.int64) + lens).max())
    repo.load_index()
    for m in repo.manifests():
        assert missing_chunks(repo.index, m.ids) == 0, m.id


def test_a_backup_merges_loose_indexes_and_restores_across_both(local_repo: Repo, src: Path, tmp_path: Path):
    r = local_repo
    b1 = r.backup("v@s1")
    repo = open_repo(r.url)
    old = set(index_names(repo)[1])
    fill = filler(repo, index_files.LOOSE_MAX)        # LOOSE_MAX + b1's packs: more than LOOSE_MAX
    b2 = r.backup("v@s2")
    merged, loose = index_names(repo)
    assert len(merged) == 1
    assert not (old | set(fill)) & set(loose)          # every loose index found at the start is merged
    assert set(loose) == {p for p in named_packs(repo) if p not in old | set(fill)}   # b2's own packs
    assert old | set(fill) <= set(index_files.read_object(repo, merged[0]).packs)
    # b2's chunks: some in packs of the merged index (b1's), some in its own loose ones
    for b, snap in ((b1, "s1"), (b2, "s2")):
        out = tmp_path / f"{snap}.raw"
        r.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == export(src, f"v@{snap}", tmp_path / "x.raw")
    r.cli("verify", "--read-data")
    assert json.loads(r.cli("verify", "--json").stdout)["unindexed_packs"] == []


def test_few_loose_indexes_are_left_alone(local_repo: Repo):
    r = local_repo
    r.backup("v@s1")
    repo = open_repo(r.url)
    filler(repo, 3)
    before = index_names(repo)
    start_as_backup(repo)
    assert index_names(repo) == before and not before[0]
    open_repo(r.url).load_index()                     # a restore's start never writes
    assert index_names(repo) == before


def test_prune_after_merging_keeps_every_backup_whole(local_repo: Repo, src: Path, tmp_path: Path):
    import blocksnap
    M = 1 << 20
    with blocksnap.Pool.open(str(src)) as pool:
        three_generations(pool.create_volume("w", size=8 * M))
    r = local_repo
    ids = [r.backup(f"w@{s}")["id"] for s in ("a", "b")]
    repo = open_repo(r.url)
    filler(repo, index_files.LOOSE_MAX)
    ids.append(r.backup("w@c")["id"])          # merges a's, b's and the filler packs' indexes
    v1 = r.backup("v@s1")["id"]
    merged, loose = index_names(repo)
    assert merged and loose
    res = json.loads(r.cli("prune", "--keep-last", "1", "--json").stdout)
    assert sorted(res["removed"]) == sorted(ids[:2])
    # the filler packs (no backup names them), b's pack, and a's pack (rewritten)
    assert res["packs_deleted"] == index_files.LOOSE_MAX + 1 and res["packs_rewritten"] == 1
    merged, loose = index_names(repo)
    assert len(merged) == 1 and not loose               # prune folds the small objects into one
    assert named_packs(repo) == {k.split("/", 1)[1] for k in repo.backend.list("data")}
    assert_whole(repo)
    r.cli("verify", "--read-data")
    for bid, ref in ((ids[2], "w@c"), (v1, "v@s1")):
        out = tmp_path / "r.raw"
        r.cli("restore", bid, str(out), "--verify")
        assert out.read_bytes() == export(src, ref, tmp_path / "x.raw")
        out.unlink()


class Crash(Exception):
    pass


def crash_after(repo: Repository, writes: int) -> None:
    """The backend stops (as if the process died) at its write number `writes`
    (puts and deletes, locks not counted): that one and all later ones never happen."""
    done = [0]
    for op in ("put", "delete"):
        real = getattr(repo.backend, op)

        def call(key, *a, _real=real):
            if not key.startswith("locks/"):
                if done[0] >= writes:
                    raise Crash(key)
                done[0] += 1
            return _real(key, *a)
        setattr(repo.backend, op, call)


def writes_of(repo: Repository, fn) -> list[tuple[str, str]]:
    """The puts and deletes `fn(repo)` makes, in order (locks left out)."""
    log = []
    for op in ("put", "delete"):
        real = getattr(repo.backend, op)

        def rec(key, *a, _op=op, _real=real):
            if not key.startswith("locks/"):
                log.append((_op, key))
            return _real(key, *a)
        setattr(repo.backend, op, rec)
    fn(repo)
    return log


def _prune(repo: Repository) -> None:
    prune(repo, Policy(last=1))


@pytest.mark.parametrize("step", ["backup start", "prune"])
def test_a_crash_at_any_write_leaves_a_readable_repository(local_repo: Repo, src: Path, tmp_path: Path, step: str):
    """Merging (a backup's start) and prune killed at about 30 points spread over
    their writes, and right at and after the first delete of an index, each on a
    copy of one repository: the index objects never name a pack that is gone,
    every backup stays restorable, and a prune afterwards leaves it clean."""
    r = local_repo
    r.backup("v@s1")
    r.backup("v@s2")
    repo = open_repo(r.url)
    filler(repo, index_files.LOOSE_MAX + 1)
    if step == "prune":                   # merged and loose indexes both, and a backup to remove
        start_as_backup(repo)
        filler(repo, 4)
        r.backup("v@s3")
    root = Path(r.url[7:])
    run = start_as_backup if step == "backup start" else _prune
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    log = writes_of(open_repo(f"file://{clean}"), run)
    # the order the crash argument rests on
    first_delete = next(i for i, (op, k) in enumerate(log) if op == "delete" and k.startswith("index/"))
    merged_puts = [i for i, (op, k) in enumerate(log) if op == "put" and index_files.MERGED in k]
    assert merged_puts and max(merged_puts) < first_delete
    data_deletes = [i for i, (op, k) in enumerate(log) if op == "delete" and k.startswith("data/")]
    index_deletes = [i for i, (op, k) in enumerate(log) if op == "delete" and k.startswith("index/")]
    assert index_deletes and (not data_deletes or max(index_deletes) < min(data_deletes))
    assert (step == "prune") == bool(data_deletes)
    points = sorted(set(range(0, len(log) + 1, max(1, len(log) // 25))) | {first_delete, first_delete + 1,
                                                                           len(log) - 1})
    for n in points:
        at = tmp_path / f"crash{n}"
        shutil.copytree(root, at)
        url = f"file://{at}"
        _KEYS[url] = _KEYS[r.url]                 # a copy: the same keys
        crashed = open_repo(url)
        crash_after(crashed, n)
        try:
            run(crashed)
        except Crash:
            pass
        # a blocksnap started after the crash: the repository reads, backups are whole
        assert_whole(open_repo(url))
        rep = verify(open_repo(url))
        assert rep["problems"] == [], (n, log[n] if n < len(log) else None, rep["problems"])
        # and the next prune (after unlock) finishes the job
        again = open_repo(url)
        again.unlock(everything=True)
        prune(again, Policy(last=3))
        assert_whole(again)
        rep = verify(again, read_data=True)
        assert rep["problems"] == [] and rep["unindexed_packs"] == []
        shutil.rmtree(at)


def test_a_pack_named_by_both_kinds_of_index(local_repo: Repo, tmp_path: Path, src: Path):
    """The state a merge cut short leaves, made by hand: a merged index naming
    every pack, and every loose index still there. Read as one set of packs;
    restore, verify and a later backup and prune all work."""
    r = local_repo
    b = r.backup("v@s1")
    repo = open_repo(r.url)
    filler(repo, 5)
    chunks = open_repo(r.url).load_index()
    objects = index_files.read_all(repo)
    index_files.write_merged(repo, [p for o in objects for p in o.parts()])
    merged, loose = index_names(repo)
    assert len(merged) == 1 and len(loose) == len(objects)
    again = open_repo(r.url)
    assert again.load_index() == chunks
    assert len(again.index.packs) == len(objects)          # each pack once
    rep = json.loads(r.cli("verify", "--read-data", "--json").stdout)
    assert rep["problems"] == [] and rep["packs"] == len(objects)
    out = tmp_path / "r.raw"
    r.cli("restore", b["id"], str(out))
    assert out.read_bytes() == export(src, "v@s1", tmp_path / "x.raw")
    r.cli("prune", "--keep-last", "1")
    merged, loose = index_names(repo)
    assert len(merged) == 1 and not loose
    assert_whole(repo)


def test_a_listed_index_merged_meanwhile_is_found_in_the_new_listing(local_repo: Repo):
    """A restore that listed the loose indexes just before a backup merged them."""
    r = local_repo
    r.backup("v@s1")
    repo = open_repo(r.url)
    filler(repo, index_files.LOOSE_MAX + 1)
    reader = open_repo(r.url)
    stale = reader.backend.list("index")
    want = open_repo(r.url).load_index()
    start_as_backup(repo)                               # merged and deleted under the reader
    real = reader.backend.list
    calls = []

    def listing(prefix):
        calls.append(prefix)
        return stale if len(calls) == 1 else real(prefix)
    reader.backend.list = listing
    assert reader.load_index() == want
    assert len(calls) == 2


def test_verify_finds_missing_short_and_damaged_packs_behind_a_merged_index(local_repo: Repo, tmp_path: Path):
    r = local_repo
    r.backup("v@s1")
    repo = open_repo(r.url)
    packs = filler(repo, index_files.LOOSE_MAX + 1)
    start_as_backup(repo)
    assert not set(packs) & set(index_names(repo)[1])
    root = Path(r.url[7:])
    (root / "data" / packs[0]).unlink()
    short = root / "data" / packs[1]
    short.write_bytes(short.read_bytes()[:-10])
    res = r.cli("verify", "--list-packs", check=False)
    assert res.returncode != 0
    assert f"pack {packs[0]} is missing" in res.stdout and f"pack {packs[1]} is cut short" in res.stdout
    merged = root / "index" / index_names(repo)[0][0]
    blob = bytearray(merged.read_bytes())
    blob[40] ^= 1
    merged.write_bytes(bytes(blob))
    res = r.cli("verify", check=False)
    assert res.returncode != 0 and "merged index" in res.stdout and "damaged" in res.stdout
    with pytest.raises(CorruptionError):
        open_repo(r.url).load_index()
    res = r.cli("restore", r.list()[0]["id"], str(tmp_path / "r.raw"), check=False)
    assert res.returncode != 0 and "damaged" in res.stderr and not (tmp_path / "r.raw").exists()


def test_a_merged_index_under_another_name_does_not_open(local_repo: Repo):
    r = local_repo
    r.backup("v@s1")
    repo = open_repo(r.url)
    filler(repo, index_files.LOOSE_MAX + 1)
    start_as_backup(repo)
    root = Path(r.url[7:]) / "index"
    name = index_names(repo)[0][0]
    os.rename(root / name, root / (index_files.MERGED + "0" * 32))
    with pytest.raises(CorruptionError, match="authentication"):
        open_repo(r.url).load_index()


def build_many(repo: Repository, packs: int) -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: filler(repo, 1), range(packs)))


def index_gets(repo: Repository) -> list[str]:
    """Counts the GETs of index objects this repository's backend makes from now on."""
    got: list[str] = []
    real = repo.backend.get

    def get(key):
        if key.startswith("index/"):
            got.append(key)
        return real(key)
    repo.backend.get = get
    return got


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_start_reads_a_few_index_objects_for_thousands_of_packs(kind: str, tmp_path: Path, s3_server: str,
                                                                monkeypatch):
    n = 3000 if kind == "local" else 1200
    if kind == "s3":
        import boto3
        for k, v in S3_ENV.items():
            monkeypatch.setenv(k, v)
        bucket = "many-packs"
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
        url, endpoint = f"s3://{bucket}/repo", s3_server
    else:
        url, endpoint = f"file://{tmp_path / 'repo'}", None
    repo, _ = Repository.open(url, lambda _new: PASSWORD, endpoint, create=True)
    build_many(repo, n)
    # an old repository: one GET per pack
    old = Repository.open(url, lambda _new: PASSWORD, endpoint)[0]
    gets = index_gets(old)
    assert old.load_index() == 2 * n and len(gets) == n
    # a backup's start merges them (reading each once more is not needed: it has them)
    first = Repository.open(url, lambda _new: PASSWORD, endpoint)[0]
    gets = index_gets(first)
    assert start_as_backup(first) == 2 * n and len(gets) == n
    # from then on a start reads the merged index only, and the packs since
    filler(first, 5)
    for _ in range(2):
        later = Repository.open(url, lambda _new: PASSWORD, endpoint)[0]
        gets = index_gets(later)
        assert later.load_index() == 2 * n + 10
        assert len(gets) == 1 + 5 and sum(index_files.MERGED in k for k in gets) == 1
    rep = verify(Repository.open(url, lambda _new: PASSWORD, endpoint)[0])
    assert rep["problems"] == [] and rep["packs"] == n + 5


def test_merged_indexes_hold_whole_packs_up_to_the_limit(local_repo: Repo, monkeypatch):
    monkeypatch.setattr(index_files, "MERGED_CHUNKS", 7)
    r = local_repo
    r.backup("v@s1")
    repo = open_repo(r.url)
    big = filler(repo, 1, chunks=10)[0]                   # more than the limit alone
    filler(repo, index_files.LOOSE_MAX + 3)
    want = open_repo(r.url).load_index()
    start_as_backup(repo)
    merged, loose = index_names(repo)
    assert not loose
    seen: list[str] = []
    for name in merged:
        o = index_files.read_object(repo, name)
        assert len(o) <= 7 or o.packs == [big] or len(o.packs) == 1
        seen += o.packs
    assert sorted(seen) == sorted(set(seen)) and big in seen    # each pack in one object, whole
    assert open_repo(r.url).load_index() == want
    assert_whole(repo)
