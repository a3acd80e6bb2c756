"""Backups against a real S3 server: Ceph's radosgw (Debian's Ceph 16), on a
throwaway one-node cluster that this session starts on loopback and stops after
(tests/backup/ceph_cluster.py). Everything goes through the real command line,
with `--repo s3://BUCKET/PREFIX --endpoint http://127.0.0.1:PORT` (or the
gateway's https:// port, with its certificate in AWS_CA_BUNDLE) and the
credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

The packages come from .ci/apt-packages-ceph.txt. Without them these tests fail
rather than skip: CI installs them, so their absence is a broken setup."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blocksnap
from tests.conftest import FAST_TMP, history_pool

from .ceph_cluster import PACKAGES, CephCluster, CephError, missing_binaries
from .conftest import M, Repo, export, three_generations

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="session")
def ceph():
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Ceph is not installed (no {', '.join(missing)}): these tests need "
                    f"`apt-get install --no-install-recommends {PACKAGES}` (.ci/apt-packages-ceph.txt)",
                    pytrace=False)
    for attempt in (1, 2):       # a second try, with new ports, if one of the free ports got taken
        cluster = CephCluster(FAST_TMP)
        try:
            cluster.start()
            break
        except CephError as e:
            if attempt == 2:
                pytest.fail(f"the test Ceph cluster did not start: {e}", pytrace=False)
    yield cluster
    cluster.stop()


class RgwRepo(Repo):
    """The CLI with --repo and --endpoint on its command line."""

    def __init__(self, pool: Path, ceph: CephCluster, bucket: str, prefix: str = "backups", tls: bool = False):
        super().__init__(pool, f"s3://{bucket}/{prefix}",
                         {"AWS_ACCESS_KEY_ID": ceph.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": ceph.SECRET_KEY,
                          "AWS_DEFAULT_REGION": "us-east-1", **({"AWS_CA_BUNDLE": str(ceph.ca_file)} if tls else {})})
        self.ceph, self.bucket, self.prefix = ceph, bucket, prefix
        self.endpoint = ceph.tls_endpoint if tls else ceph.endpoint

    def args(self, *args: str) -> list[str]:
        return [*map(str, args), "--repo", self.url, "--endpoint", self.endpoint]

    def cli(self, *args, env: dict | None = None, check: bool = True, timeout: float = 180):
        if args and args[0] == "-q":
            return super().cli("-q", *self.args(*args[1:]), env=env, check=check, timeout=timeout)
        return super().cli(*self.args(*args), env=env, check=check, timeout=timeout)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        env = dict(os.environ, **self.env)
        env.pop("BLOCKSNAP_REPO", None)
        return subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(self.pool), *self.args(*args)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def keys(self, under: str) -> dict[str, int]:
        """The bucket's objects under PREFIX/under, as radosgw lists them: key -> size."""
        out, kw = {}, {"Bucket": self.bucket, "Prefix": f"{self.prefix}/{under}"}
        while True:
            res = self.ceph.s3().list_objects_v2(**kw)
            out.update({o["Key"]: o["Size"] for o in res.get("Contents", [])})
            if not res.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = res["NextContinuationToken"]


@pytest.fixture
def bucket(ceph: CephCluster, request):
    """A fresh bucket, emptied afterwards (memstore keeps it all in RAM). The empty bucket
    stays: after the gateway was killed, radosgw takes seconds to remove one."""
    name = "bk-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    s3 = ceph.s3()
    s3.create_bucket(Bucket=name)
    yield name
    try:
        s3 = ceph.s3()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys})
    except Exception:  # noqa: BLE001 - a test that killed the gateway may have left it down
        pass


@pytest.fixture
def repo(src: Path, ceph: CephCluster, bucket: str) -> RgwRepo:
    return RgwRepo(src, ceph, bucket)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def small_pool(path: Path, size: int, seed: int, snaps: int = 1) -> Path:
    """Volume w of random (incompressible) data, with snapshots a, b, ... each
    after rewriting the first half."""
    with blocksnap.Pool.create(str(path), size=4 * size + 64 * M) as p:
        v = p.create_volume("w", size=size, block_size=64 << 10)
        v.write(0, random.Random(seed).randbytes(size))
        for i in range(snaps):
            if i:
                v.write(0, random.Random(seed * 100 + i).randbytes(size // 2))
            v.snapshot("abcdefgh"[i])
    return path


def test_round_trip(repo: RgwRepo, src: Path, tmp_path: Path):
    want = {s: export(src, f"v@{s}", tmp_path / "x.raw") for s in ("s1", "s2", "s3")}
    b1 = repo.backup("v@s1")
    assert b1["mode"] == "full"
    b2 = repo.backup("v@s2")
    assert b2["mode"] == "incremental" and b2["base"] == b1["id"]
    b3 = repo.backup("v@s3", "--mode", "differential")
    assert b3["mode"] == "differential" and b3["base"] == b1["id"]
    assert [b["id"] for b in repo.list()] == [b1["id"], b2["id"], b3["id"]]
    assert list(repo.keys("config")) == ["backups/config"] and not repo.keys("locks/")   # under the prefix
    for b, snap in ((b1, "s1"), (b2, "s2"), (b3, "s3")):
        out = tmp_path / f"{snap}.raw"
        repo.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == want[snap], snap
    repo.cli("verify", "--read-data")


def test_round_trip_over_https(ceph: CephCluster, bucket: str, tmp_path: Path):
    """The same gateway through its TLS endpoint. There boto3 (1.36 and later) would by
    default send a PUT's body aws-chunked with a trailing checksum, which radosgw 16
    refuses (MissingContentLength); the backend asks for checksums only where S3 requires them."""
    pool = small_pool(tmp_path / "p", 8 * M, seed=3, snaps=2)
    r = RgwRepo(pool, ceph, bucket, tls=True)
    r.backup("w@a")
    b = r.backup("w@b")
    assert b["mode"] == "incremental"
    out = tmp_path / "b.raw"
    r.cli("restore", b["id"], str(out), "--verify")
    assert out.read_bytes() == export(pool, "w@b", tmp_path / "x.raw")
    r.cli("verify", "--read-data")


def test_ranged_restore_fetches_part_of_an_old_pack(ceph: CephCluster, bucket: str, tmp_path: Path):
    """An incremental backup keeping a quarter of the first backup's pack: restore
    fetches that quarter with Range GETs, which radosgw answers with just those bytes."""
    pool = tmp_path / "p"
    with blocksnap.Pool.create(str(pool), size=64 * M) as p:
        v = p.create_volume("w", size=8 * M, block_size=64 << 10)
        v.write(0, random.Random(1).randbytes(8 * M))       # incompressible: one ~8 MiB pack
        v.snapshot("a")
        v.write(0, random.Random(2).randbytes(6 * M))       # the first 3/4 replaced
        v.snapshot("b")
    r = RgwRepo(pool, ceph, bucket)
    r.backup("w@a")
    b = r.backup("w@b")
    assert b["mode"] == "incremental"
    packs = r.keys("data/")
    assert len(packs) == 2 and sum(packs.values()) > 14 * M
    out = tmp_path / "b.raw"
    res = json.loads(r.cli("restore", b["id"], str(out), "--json").stdout)
    assert out.read_bytes() == export(pool, "w@b", tmp_path / "x.raw")
    assert 8 * M <= res["bytes_fetched"] < 9 * M, res      # 2 + 6 MiB, not 8 + 6


def _rgw_412s(ceph: CephCluster) -> int:
    """Requests radosgw answered 412 Precondition Failed (its log has one line per request)."""
    log = ceph.dir / "client.rgw.a.log"
    return len(re.findall(r"http_status=412", log.read_text(errors="replace"))) if log.exists() else 0


def test_conditional_config_creation(ceph: CephCluster, bucket: str, tmp_path: Path):
    """Two first backups race to create one repository. radosgw honours `If-None-Match: *`
    on PUT, so exactly one config is written; the other process takes it and seals
    its packs with that key. Repeated on fresh prefixes until a race was seen (a 412)."""
    pools = [history_pool(tmp_path / f"pool{i}") for i in range(2)]
    want = export(pools[0], "v@s1", tmp_path / "x.raw")
    raced = 0
    for round_ in range(6):
        repos = [RgwRepo(p, ceph, bucket, prefix=f"race{round_}") for p in pools]
        before = _rgw_412s(ceph)
        procs = [r.popen("backup", "v@s1", "--json") for r in repos]
        results = [finish(p) for p in procs]
        ok = [(r, json.loads(out)) for r, (code, out, _) in zip(repos, results) if code == 0]
        for code, _, err in results:
            assert "Traceback" not in err, err
            if code:                                           # a clean failure, if any
                assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert ok, results
        config = repos[0].keys("config")
        assert list(config) == [f"race{round_}/config"]
        assert sorted(b["id"] for b in repos[0].list()) == sorted(b["id"] for _, b in ok)
        repos[0].cli("verify", "--read-data")                 # every pack opens with the one key
        for r, b in ok:
            out = tmp_path / f"r{round_}-{b['id']}.raw"
            r.cli("restore", b["id"], str(out))
            assert out.read_bytes() == want
            out.unlink()
        raced += _rgw_412s(ceph) > before
        if raced:
            break
    assert raced, "the two first backups never raced for the config (no 412 from radosgw) in 6 rounds"


def test_concurrent_first_backups(ceph: CephCluster, bucket: str, tmp_path: Path):
    """Three volumes' first backups at once into one repository: shared locks, packs
    and indexes written side by side, and each backup restores."""
    pools = [small_pool(tmp_path / f"p{i}", 8 * M, seed=10 + i) for i in range(3)]
    first = RgwRepo(history_pool(tmp_path / "p-h"), ceph, bucket)
    first.backup("v@s1")                                      # the repository exists
    repos = [RgwRepo(p, ceph, bucket) for p in pools]
    procs = [r.popen("backup", "w@a", "--json") for r in repos]
    results = [finish(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    made = [json.loads(out) for _, out, _ in results]
    assert all(b["mode"] == "full" for b in made)
    assert len(first.list()) == 4 and not first.keys("locks/")
    first.cli("verify", "--read-data")
    for r, b in zip(repos, made):
        out = tmp_path / f"{b['id']}.raw"
        r.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == export(r.pool, "w@a", tmp_path / "x.raw")
        out.unlink()


def test_prune(ceph: CephCluster, bucket: str, tmp_path: Path):
    """prune on radosgw: a pack nothing needs is deleted, one a quarter live is
    rewritten, and what is kept verifies and restores."""
    pool = tmp_path / "p"
    with blocksnap.Pool.create(str(pool), size=64 * M) as p:
        three_generations(p.create_volume("w", size=8 * M))
    r = RgwRepo(pool, ceph, bucket)
    ids = [r.backup(f"w@{s}")["id"] for s in ("a", "b", "c")]
    before = sum(r.keys("data/").values())
    res = json.loads(r.cli("prune", "--keep-last", "1", "--json").stdout)
    assert sorted(res["removed"]) == sorted(ids[:2])
    assert res["packs_deleted"] == 1 and res["packs_rewritten"] == 1
    assert [b["id"] for b in r.list()] == [ids[2]]
    assert before - sum(r.keys("data/").values()) > 5 * M
    r.cli("verify", "--read-data")
    out = tmp_path / "c.raw"
    r.cli("restore", ids[2], str(out), "--verify")
    assert out.read_bytes() == export(pool, "w@c", tmp_path / "x.raw")


def test_gateway_killed_mid_backup(ceph: CephCluster, bucket: str, tmp_path: Path):
    """radosgw killed with SIGKILL while a backup is under way: the backup fails
    with one error line, and once the gateway is back a second backup succeeds
    and the repository verifies.

    To be sure the kill lands mid-backup, the backup is stopped (SIGSTOP) once its
    first pack is stored, the gateway is killed, and the backup continues (SIGCONT)
    into a dead endpoint, its open connections cut."""
    pool = small_pool(tmp_path / "p", 48 * M, seed=7)          # three packs
    r = RgwRepo(pool, ceph, bucket)
    first = r.backup("w@a")
    with blocksnap.Pool.open(str(pool)) as p:
        p.volume("w").write(0, random.Random(8).randbytes(48 * M))
        p.volume("w").snapshot("b")
    packs = set(r.keys("data/"))
    proc = r.popen("backup", "w@b")
    deadline = time.monotonic() + 60
    while not set(r.keys("data/")) - packs:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the backup ended or stalled before its first pack was stored: {finish(proc)}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    try:
        assert len(r.keys("backups/")) == 1                    # its manifest is not written yet
        ceph.kill_rgw()
        proc.send_signal(signal.SIGCONT)
        code, out, err = finish(proc, 180)
    finally:
        proc.send_signal(signal.SIGCONT)
        if "client.rgw.a" not in ceph.procs:
            ceph.start_rgw()
    assert code == 1 and "Traceback" not in err, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "failed" in lines[0], err
    assert [b["id"] for b in r.list()] == [first["id"]]       # no manifest from the failed backup
    r.cli("verify", "--read-data")
    again = r.backup("w@b")
    assert again["mode"] == "incremental" and again["base"] == first["id"]
    r.cli("verify", "--read-data")
    res = r.cli("unlock").stdout                               # the lock the failed backup could not delete
    assert "removed 1 locks" in res, res
    r.cli("prune", "--keep-last", "5")                         # the orphan packs go
    r.cli("verify", "--read-data")
    restored = tmp_path / "b.raw"
    r.cli("restore", again["id"], str(restored), "--verify")
    assert restored.read_bytes() == export(pool, "w@b", tmp_path / "x.raw")


def test_objects_written_only_if_absent(ceph: CephCluster, bucket: str, monkeypatch):
    """The backend's put_new on radosgw: the second writer gets False, the first one's bytes stay."""
    from blocksnap.backup.backends import open_backend
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ceph.SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    b = open_backend(f"s3://{bucket}/p", ceph.endpoint)
    assert b.put_new("config", b"first") and not b.put_new("config", b"second")
    assert b.get("config") == b"first"
    data = bytes(range(256)) * 40
    b.put("data/x", data)
    assert b.get_range("data/x", 1000, 3000) == data[1000:4000]
    assert b.get_range("data/x", len(data) - 5, 100) == data[-5:]
    assert b.get_range("data/x", len(data) + 50, 10) == b""
