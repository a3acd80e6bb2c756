"""A backup that wrote more than index_files.OWN_MAX packs merges their loose indexes
into one object at its end, so that the next command reads one index object, not
one per pack. The merged object is stored before the loose ones are deleted; a
merge that fails leaves the backup whole, and says so."""
from __future__ import annotations

from pathlib import Path

import pytest

from blocksnap.backup import chunker, index_files
from blocksnap.backup.repo import Repository
from blocksnap.errors import BlocksnapError

from .conftest import Repo, backup_here, export

PASSWORD = b"correct horse"    # the conftest Repo's


class DeleteRefused(BlocksnapError):
    pass


def _backup(pool_path: Path, url: str, ref: str, refuse_deletes: bool = False) -> tuple[dict, Repository]:
    """A backup made in this process (as the CLI makes it without a daemon)."""
    repo, _ = Repository.open(url, lambda new: PASSWORD, create=True)
    if refuse_deletes:
        def refuse(keys) -> None:
            raise DeleteRefused("the storage refused the delete")
        repo.backend.delete_many = refuse
    return backup_here(pool_path, repo, ref), repo


def _index_names(url: str) -> tuple[list[str], list[str]]:
    """(merged, loose) index objects."""
    names = sorted(k.split("/", 1)[1] for k in Repository.open(url, lambda new: PASSWORD)[0].backend.list("index"))
    return [n for n in names if index_files.is_merged(n)], [n for n in names if not index_files.is_merged(n)]


@pytest.fixture
def small_packs(monkeypatch):
    """A pack per record of the stream (1 MiB at most), and a merge above 3 packs:
    v@s1 makes 4, v@s2 2."""
    monkeypatch.setattr(chunker, "PACK_TARGET", 64 << 10)
    monkeypatch.setattr(index_files, "OWN_MAX", 3)


def test_a_backup_of_many_packs_leaves_one_index_object_for_them(small_packs, local_repo: Repo, src: Path,
                                                                  tmp_path: Path):
    first, repo = _backup(src, local_repo.url, "v@s1")
    assert first["stats"]["packs"] > index_files.OWN_MAX
    merged, loose = _index_names(local_repo.url)
    assert len(merged) == 1 and loose == []
    fresh = Repository.open(local_repo.url, lambda new: PASSWORD)[0]
    assert fresh.load_index() == len(repo.index) and sorted(fresh.index.packs) == sorted(repo.index.packs)
    second, _ = _backup(src, local_repo.url, "v@s2")        # a few packs: left loose
    assert 0 < second["stats"]["packs"] <= index_files.OWN_MAX
    merged2, loose2 = _index_names(local_repo.url)
    assert merged2 == merged and len(loose2) == second["stats"]["packs"]
    for b, ref in ((first, "v@s1"), (second, "v@s2")):
        out = tmp_path / f"{b['id']}.raw"
        local_repo.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == export(src, ref, tmp_path / "x.raw")
    local_repo.cli("verify", "--read-data")


def test_a_merge_that_fails_leaves_the_backup_whole_and_says_so(small_packs, local_repo: Repo, src: Path,
                                                                tmp_path: Path):
    b, _ = _backup(src, local_repo.url, "v@s1", refuse_deletes=True)
    assert "merging its indexes failed: the storage refused the delete" in b["note"]
    merged, loose = _index_names(local_repo.url)
    assert len(merged) == 1 and len(loose) == b["stats"]["packs"]   # each pack named twice
    out = tmp_path / "r.raw"
    local_repo.cli("restore", b["id"], str(out), "--verify")
    assert out.read_bytes() == export(src, "v@s1", tmp_path / "x.raw")
    local_repo.cli("verify", "--read-data")
    again, _ = _backup(src, local_repo.url, "v@s2")
    local_repo.cli("prune", "--keep-last", "1")                 # s1's packs go, whichever index named them
    assert [x["id"] for x in local_repo.list()] == [again["id"]]
    local_repo.cli("verify", "--read-data")
    out2 = tmp_path / "r2.raw"
    local_repo.cli("restore", again["id"], str(out2))
    assert out2.read_bytes() == export(src, "v@s2", tmp_path / "x.raw")


def test_the_merged_index_is_stored_before_a_loose_one_is_deleted(small_packs, local_repo: Repo, src: Path,
                                                                 monkeypatch):
    """The order, seen from the storage: the manifest, then the merged object, then
    the deletes of the loose indexes it replaces."""
    seen: list[tuple[str, str]] = []
    real_open = Repository.open.__func__

    def open_spied(cls, *a, **k):
        repo, created = real_open(cls, *a, **k)
        put, delete_many = repo.backend.put, repo.backend.delete_many

        def logged_put(key: str, data: bytes) -> None:
            put(key, data)
            seen.append(("put", key))

        def logged_delete(keys) -> None:
            keys = list(keys)
            delete_many(keys)
            seen.extend(("delete", k) for k in keys)
        repo.backend.put, repo.backend.delete_many = logged_put, logged_delete
        return repo, created
    monkeypatch.setattr(Repository, "open", classmethod(open_spied))
    b, _ = _backup(src, local_repo.url, "v@s1")
    manifest_at = next(i for i, (op, k) in enumerate(seen) if op == "put" and k.startswith("backups/"))
    merged_at = next(i for i, (op, k) in enumerate(seen) if op == "put" and index_files.MERGED in k)
    deletes = [(i, k) for i, (op, k) in enumerate(seen) if op == "delete"]
    assert manifest_at < merged_at < min(i for i, _ in deletes)
    assert sorted(k for _, k in deletes) == sorted(f"index/{p}" for p in _packs(local_repo.url))
    assert len(deletes) == b["stats"]["packs"]


def _packs(url: str) -> list[str]:
    return [k.split("/", 1)[1] for k in Repository.open(url, lambda new: PASSWORD)[0].backend.list("data")]
