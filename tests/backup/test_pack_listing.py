"""Many packs (issue 16): data/ listed by first hex digit on parallel threads, packs
deleted in batches (S3 DeleteObjects, 1,000 keys a request), on a directory and on
moto's S3 server; `verify` without --list-packs takes the indexes at their word."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blocksnap.backup.backends import open_backend
from blocksnap.backup.coverage import verify_slice

from .conftest import S3_ENV, Repo, s3_bucket
from .test_many_packs import filler, open_repo


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_sharded_listing_and_batched_deletes(kind: str, tmp_path: Path, s3_server: str, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    if kind == "file":
        b = open_backend(f"file://{tmp_path}/r")
    else:
        b = open_backend(f"s3://{s3_bucket(s3_server, 'listing-' + os.urandom(3).hex())}/r", s3_server)
    names = sorted(os.urandom(16).hex() for _ in range(2100))
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: b.put(f"data/{n}", n.encode()), names))
    b.put("data/-not-a-pack", b"x")
    b.put("index/" + names[0], b"i")
    calls: list[str] = []
    if kind == "s3":
        b.s3.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    listed = b.list_hex("data")
    assert listed == {f"data/{n}": 32 for n in names}            # every pack, and only packs
    assert set(b.list("data")) == set(listed) | {"data/-not-a-pack"}
    if kind == "s3":
        assert calls.count("ListObjectsV2") >= 16                 # one listing per first digit
        calls.clear()
    b.delete_many(f"data/{n}" for n in names[:2050])
    assert set(b.list("data")) == {f"data/{n}" for n in names[2050:]} | {"data/-not-a-pack"}
    assert b.list("index") == {f"index/{names[0]}": 1}
    if kind == "s3":
        assert [c for c in calls if c.startswith("Delete")] == ["DeleteObjects"] * 3   # 1,000 + 1,000 + 50
    b.delete_many([])
    b.delete_many(["data/" + names[0]])                           # gone already: fine, as S3's DELETE


def test_verify_takes_the_indexes_at_their_word_unless_asked(local_repo: Repo):
    local_repo.backup("v@s1")
    repo = open_repo(local_repo.url)
    packs = filler(repo, 3)
    root = Path(local_repo.url[7:])
    (root / "data" / packs[0]).unlink()
    (root / "data" / "00000000000000000000000000000000").write_bytes(b"left by a cut-short backup")
    res = json.loads(local_repo.cli("verify", "--json").stdout)
    assert res["problems"] == [] and res["listed_packs"] is False and res["packs"] == 4
    res = json.loads(local_repo.cli("verify", "--list-packs", "--json", check=False).stdout)
    assert res["problems"] == [f"pack {packs[0]} is missing (its index names 2 chunks)"]
    assert res["unindexed_packs"] == ["00000000000000000000000000000000"]
    # a slice reads the missing pack when its turn comes (first: it was never read)
    got = verify_slice(open_repo(local_repo.url), 1 << 30, 86400.0)
    assert got["damaged"] == [packs[0]] and "is missing" in got["problems"][0]
