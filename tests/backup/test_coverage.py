"""Verification with coverage: a budget of packs read back each run, those never
read first, then those read longest ago, with the record kept in the repository.
Days go by on a simulated clock (`now=`); the packs are real sealed packs in a
file:// repository, and the damage is a byte flipped in a pack file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocksnap.backup import coverage
from blocksnap.backup.coverage import read_record, verify_slice, write_record
from blocksnap.backup.repo import Repository
from blocksnap.errors import InvalidArgument
from tests.conftest import assert_cli_error

from .conftest import Repo
from .test_many_packs import PASSWORD, filler

DAY = 86400.0
T0 = 1_800_000_000.0


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(f"file://{tmp_path / 'repo'}", lambda _new: PASSWORD, create=True)[0]


def packs_of(repo: Repository) -> dict[str, int]:
    return {k.split("/", 1)[1]: n for k, n in repo.backend.list("data").items()}


def flip(repo: Repository, pack: str, at: int = 40) -> None:
    path = Path(repo.backend.root) / "data" / pack
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_pack_is_read_once_a_cycle_and_new_ones_first(repo: Repository):
    filler(repo, 10, chunks=4)
    size = max(packs_of(repo).values())
    budget, cycle = int(2.5 * size), 5 * DAY          # two packs a day: ten packs in five days
    seen: dict[str, list[int]] = {}
    for day in range(15):
        if day == 7:
            new = set(filler(repo, 2, chunks=4))
        before = {p: e.time for p, e in read_record(repo)[1].items()}
        res = verify_slice(repo, budget, cycle, now=T0 + day * DAY)
        assert res["problems"] == [] and res["packs_read"] == 2 and res["bytes_read"] <= budget
        read = {p for p, e in read_record(repo)[1].items() if e.time == T0 + day * DAY}
        assert len(read) == 2
        if day == 7:
            assert read == new             # new packs are read by the next run
        for p in read:
            seen.setdefault(p, []).append(day)
        if day < 5:
            assert res["never_verified_packs"] == 10 - 2 * (day + 1)
        # once all were read, those read now had waited longest
        waited = [before[p] for p in read if before.get(p)]
        rest = [t for q, t in before.items() if q not in read]
        assert not waited or not rest or max(waited) <= min(rest)
    # each pack read again at most a cycle after the last time (the two new ones shift the rest by a day)
    for p, days in seen.items():
        assert all(b - a <= 6 for a, b in zip(days, days[1:])), (p, days)
    cov = coverage.coverage(repo, cycle, now=T0 + 14 * DAY, budget_bytes=budget)
    assert cov["packs"] == 12 and cov["never_verified_packs"] == 0 and cov["as_of"] == T0 + 14 * DAY
    assert 0.75 < cov["coverage_ratio"] < 1.0 and cov["budget_enough"] is False   # 12 packs, 10 a cycle
    assert cov["oldest_verified_age"] == 5 * DAY
    # a while without runs: the share read within the cycle drops to nothing
    assert coverage.coverage(repo, cycle, now=T0 + 30 * DAY)["coverage_ratio"] == 0.0


def test_a_flipped_byte_in_any_pack_is_found_within_one_cycle(repo: Repository):
    filler(repo, 8, chunks=3)
    size = max(packs_of(repo).values())
    budget, cycle = 2 * size, 4 * DAY
    day = 0
    for _ in range(4):                 # one cycle: everything read once
        verify_slice(repo, budget, cycle, now=T0 + day * DAY)
        day += 1
    assert coverage.coverage(repo, cycle, now=T0 + (day - 1) * DAY)["coverage_ratio"] == 1.0
    for pack in sorted(packs_of(repo)):
        flip(repo, pack)
        found_on = None
        for _ in range(4):
            res = verify_slice(repo, budget, cycle, now=T0 + day * DAY)
            day += 1
            if res["problems"]:
                assert res["damaged"] == [pack]
                assert all(f"in pack {pack}" in p and "chunk " in p for p in res["problems"])
                found_on = day
                break
        assert found_on is not None, f"a flipped byte in pack {pack} was not found within a cycle"
        cov = coverage.coverage(repo, cycle, now=T0 + (day - 1) * DAY)
        assert cov["damaged_packs"] == [pack] and cov["coverage_ratio"] < 1.0
        res = verify_slice(repo, budget, cycle, now=T0 + day * DAY)   # damage is read first, and again
        day += 1
        assert res["damaged"] == [pack]
        flip(repo, pack)               # mended (as if from a copy)
        res = verify_slice(repo, budget, cycle, now=T0 + day * DAY)
        day += 1
        assert res["problems"] == [] and coverage.coverage(repo, cycle, now=T0 + day * DAY)["damaged_packs"] == []


def test_the_record_is_shared_and_crash_safe(repo: Repository, tmp_path: Path):
    filler(repo, 4, chunks=2)
    size = max(packs_of(repo).values())
    verify_slice(repo, 2 * size, 4 * DAY, now=T0)
    keys, entries, _ = read_record(repo)
    assert len(keys) == 1 and sum(e.time == T0 for e in entries.values()) == 2
    # another host's run wrote its own record meanwhile (it read the other two packs)
    other = {p: coverage.Entry(e.size, T0 + 60 if e.time == 0 else e.time, True) for p, e in entries.items()}
    write_record(repo, other, T0 + 60, [])
    assert coverage.coverage(repo, 4 * DAY, now=T0 + 120)["coverage_ratio"] == 1.0
    # a run killed after writing its record and before deleting the old ones leaves both: still read right
    delete = repo.backend.delete

    def cut(key: str) -> None:
        raise OSError("killed")
    repo.backend.delete = cut
    with pytest.raises(OSError):
        verify_slice(repo, size, 4 * DAY, now=T0 + DAY)
    repo.backend.delete = delete
    keys, entries, as_of = read_record(repo)
    assert len(keys) == 3 and as_of == T0 + DAY and sum(e.time == T0 + DAY for e in entries.values()) == 1
    verify_slice(repo, 0, 4 * DAY, now=T0 + 2 * DAY)        # the next run folds them into one
    assert len(read_record(repo)[0]) == 1
    # the record is sealed like everything else: no pack names in the clear
    raw = (Path(repo.backend.root) / read_record(repo)[0][0]).read_bytes()
    assert not any(bytes.fromhex(p) in raw or p.encode() in raw for p in packs_of(repo))


def test_bad_arguments(repo: Repository):
    with pytest.raises(InvalidArgument, match="cycle"):
        verify_slice(repo, 1 << 20, 0)
    with pytest.raises(InvalidArgument, match="budget"):
        verify_slice(repo, -1, DAY)


def test_the_command_line(local_repo: Repo):
    local_repo.backup("v@s1")
    local_repo.backup("v@s2")
    res = json.loads(local_repo.cli("verify", "--budget", "2M", "--cycle", "7d", "--json").stdout)
    assert res["problems"] == [] and res["coverage"]["never_verified_packs"] == 1   # the 3 MiB pack waits
    assert res["coverage"]["budget_enough"] is False and res["packs_read"] == 1
    text = local_repo.cli("verify", "--budget", "8M", "--cycle", "7d").stdout
    assert "coverage 100.0%" in text and "no problems" in text
    res = json.loads(local_repo.cli("verify", "--read-data", "--json").stdout)
    assert res["coverage"]["coverage_ratio"] == 1.0 and res["packs_read"] == 2
    assert_cli_error(local_repo.cli("verify", "--cycle", "7d", check=False), 2, "--budget")
    assert_cli_error(local_repo.cli("verify", "--budget", "1M", "--read-data", check=False), 2, "not both")
    assert_cli_error(local_repo.cli("verify", "--budget", "lots", check=False), 1, "invalid size")
    assert_cli_error(local_repo.cli("verify", "--budget", "1M", "--cycle", "soon", check=False), 1,
                     "invalid duration")
    # damage found by a slice: problem lines, one error line, exit 7
    path = Path(local_repo.url[7:])
    pack = min((p for p in (path / "data").iterdir()), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[100] ^= 0x40
    pack.write_bytes(bytes(data))
    res = local_repo.cli("verify", "--budget", "8M", "--cycle", "7d", check=False)
    assert res.returncode == 7 and f"in pack {pack.name}" in res.stdout
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
