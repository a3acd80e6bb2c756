"""`backup copy`: backups from one repository into another (3-2-1), each with its
own password and key. Through the real command line, on file:// and moto's S3
server (as a process), in both directions: a copy restores bit for bit like the
original, keeps its identity, sends only what the destination lacks, and a copy
killed with SIGKILL and run again sends exactly the chunks not yet indexed."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.backup.chunk_index import keys_of
from blocksnap.backup.copy import PREFIX
from blocksnap.backup.repo import Repository
from blocksnap.errors import BlocksnapError
from tests.conftest import assert_cli_error, run_cli

from .conftest import S3_ENV, M, Side, export, side
from .test_radosgw import bucket, ceph  # noqa: F401 - the fixtures: a throwaway Ceph cluster, a bucket
from .test_resume import big  # noqa: F401 - the fixture: v@big, 80 MiB of random data


def cli(pool: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI with S3 credentials and no password in the environment (each side has its file)."""
    res = run_cli(pool, *args, env=dict(S3_ENV, BLOCKSNAP_REPO_PASSWORD="", **(env or {})), timeout=300)
    assert "Traceback" not in res.stderr, res.stderr
    if check:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


def backup_all(pool: Path, a: Side) -> list[dict]:
    """v@s1 (full), v@s2, v@s3 (incrementals) into `a`."""
    for ref in ("v@s1", "v@s2", "v@s3"):
        cli(pool, "backup", ref, *a.repo_args())
    return json.loads(cli(pool, "backups", "--json", *a.repo_args()).stdout)


def copy(pool: Path, a: Side, b: Side, *what: str, check: bool = True) -> dict | subprocess.CompletedProcess:
    res = cli(pool, "backup", "copy", *what, *a.args("from"), *b.args("to"), "--json", check=check)
    return json.loads(res.stdout) if check else res


def restored(pool: Path, b: Side, bid: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"restored-{bid}.raw"
    cli(pool, "restore", bid, str(out), *b.repo_args(), "--verify")
    data = out.read_bytes()
    out.unlink()
    return data


def identity(info: dict) -> tuple:
    return (info["id"], info["source"], info["time"], info["host"], info["pool"], info["mode"], info["size"])


@pytest.mark.parametrize("kinds", [("file", "file"), ("file", "s3"), ("s3", "file")])
def test_a_copy_restores_like_the_original(kinds, src: Path, tmp_path: Path, s3_server: str, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    a = side(kinds[0], tmp_path, "a", "source password", s3_server)
    b = side(kinds[1], tmp_path, "b", "another password", s3_server)
    made = backup_all(src, a)
    s1, s2, s3 = (m["id"] for m in made)
    # an incremental copied alone is whole there, and restores by itself
    res = copy(src, a, b, s3[:-1])     # a prefix (three backups may share the second, and more)
    assert res["copied"] == [s3] and res["skipped"] == [] and res["chunks_sent"] > 0
    assert restored(src, b, s3, tmp_path) == export(src, "v@s3", tmp_path / "e3")
    res = copy(src, a, b, "--all")
    assert res["copied"] == [s1, s2] and res["skipped"] == [s3]
    listed = json.loads(cli(src, "backups", "--json", *b.repo_args()).stdout)
    assert [identity(m) for m in listed] == [identity(m) for m in made]   # the same recovery points
    by_id = {m["id"]: m for m in listed}
    assert by_id[s2]["base"] == s1          # its base came first: the relation holds there
    assert by_id[s3]["base"] is None and by_id[s3]["copy"]["base"] == s2   # copied before its base
    for bid, ref in ((s1, "v@s1"), (s2, "v@s2")):
        assert restored(src, b, bid, tmp_path) == export(src, ref, tmp_path / "e")
    assert "no problems" in cli(src, "verify", "--read-data", *b.repo_args()).stdout
    # two repositories, two keys: nothing of the source's chunk IDs is in the destination
    ra = Repository.open(a.url, lambda _n: b"source password", a.endpoint)[0]
    rb = Repository.open(b.url, lambda _n: b"another password", b.endpoint)[0]
    ra.load_index()
    rb.load_index()
    assert ra.config["id"] != rb.config["id"]
    assert len(rb.index) == len(ra.index)
    assert not set(map(bytes, ra.read_manifest(s1).ids)) & set(map(bytes, rb.read_manifest(s1).ids))
    # again: nothing to do, nothing fetched or sent
    res = copy(src, a, b, "--all")
    assert res["copied"] == [] and sorted(res["skipped"]) == sorted([s1, s2, s3])   # (by ID: not read)
    assert res["bytes_fetched"] == res["bytes_sent"] == 0


def test_a_new_backup_builds_on_a_copy_and_dedups_against_it(src: Path, tmp_path: Path, s3_server: str):
    a = side("file", tmp_path, "a", "pw-a")
    b = side("file", tmp_path, "b", "pw-b")
    made = backup_all(src, a)
    copy(src, a, b, "--all")
    with blocksnap.Pool.open(str(src)) as pool:
        v = pool.volume("v")
        v.write(4 * M, os.urandom(M))
        v.snapshot("s4")
    got = json.loads(cli(src, "backup", "v@s4", "--json", *b.repo_args()).stdout)
    assert got["mode"] == "incremental" and got["base"] == made[-1]["id"]   # the copy of v@s3
    assert got["stats"]["read_bytes"] == M and got["stats"]["new_bytes"] < M + 4096
    assert restored(src, b, got["id"], tmp_path) == export(src, "v@s4", tmp_path / "e4")
    # and copied back to the first repository, only the new chunks go
    res = copy(src, b, a, got["id"])
    assert res["copied"] == [got["id"]] and res["chunks_sent"] == 16
    assert restored(src, a, got["id"], tmp_path) == export(src, "v@s4", tmp_path / "e4")


def test_a_copy_killed_and_run_again_sends_only_the_rest(big: Path, tmp_path: Path):  # noqa: F811
    a = side("file", tmp_path, "a", "pw-a")
    b = side("file", tmp_path, "b", "pw-b")
    bid = json.loads(cli(big, "backup", "v@big", "--json", *a.repo_args()).stdout)["id"]
    env = dict(os.environ, **S3_ENV, BLOCKSNAP_REPO_PASSWORD="")
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(big), "backup", "copy", bid,
                             *a.args("from"), *b.args("to")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    maps = tmp_path / "b" / PREFIX / json.loads((tmp_path / "a" / "config").read_text())["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and \
            not [p for p in (maps.glob("*") if maps.is_dir() else []) if not p.name.startswith(".tmp")]:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not list((tmp_path / "b" / "backups").glob("*")), "the copy finished before it was killed"
    # the killed copy's locks are there, shared: a prune on either side is refused meanwhile
    for s, op in ((a, "copy-from"), (b, "copy-to")):
        assert_cli_error(cli(big, "prune", "--keep-last", "1", *s.repo_args(), check=False), 5, f"locked by {op}")
    rb = Repository.open(b.url, lambda _n: b"pw-b")[0]
    rb.load_index()
    indexed = len(rb.index)                   # only chunks of this backup are in b
    ra = Repository.open(a.url, lambda _n: b"pw-a")[0]
    total = len({bytes(r) for r in ra.read_manifest(bid).ids})
    assert 0 < indexed < total
    res = copy(big, a, b, bid)
    assert res["copied"] == [bid]
    assert res["chunks_sent"] == total - indexed      # exactly what was not yet there
    assert res["chunks_fetched"] < total              # what the first run mapped is not fetched again
    assert res["chunks_present"] == total - res["chunks_fetched"]
    assert restored(big, b, bid, tmp_path) == export(big, "v@big", tmp_path / "e")
    assert "no problems" in cli(big, "verify", "--read-data", *b.repo_args()).stdout
    for s in (a, b):
        cli(big, "unlock", *s.repo_args())
    cli(big, "prune", "--keep-last", "1", *b.repo_args())     # the killed run's orphan pack goes
    assert restored(big, b, bid, tmp_path) == export(big, "v@big", tmp_path / "e")


def test_copy_waits_for_nobody_under_a_prune(src: Path, tmp_path: Path):
    """An exclusive lock (a prune on another host) on either side stops the copy."""
    a = side("file", tmp_path, "a", "pw-a")
    b = side("file", tmp_path, "b", "pw-b")
    bid = backup_all(src, a)[0]["id"]
    copy(src, a, b, bid)
    for s in (a, b):
        lock = Path(s.url[7:]) / "locks" / "1-prune"
        lock.write_text(json.dumps({"op": "prune", "exclusive": True, "host": "elsewhere", "pid": 1,
                                    "time": time.time()}))
        assert_cli_error(copy(src, a, b, "--all", check=False), 5, "locked by prune", "elsewhere")
        lock.unlink()
    assert len(copy(src, a, b, "--all")["copied"]) == 2


def test_bad_inputs_get_one_error_line(src: Path, tmp_path: Path, s3_server: str):
    a = side("file", tmp_path, "a", "pw-a")
    b = side("file", tmp_path, "b", "pw-b")
    bid = backup_all(src, a)[0]["id"]
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not it\n")
    assert_cli_error(copy(src, a, b, "20991231T000000Z-000000", check=False), 3, "no backup")
    assert not Path(b.url[7:]).exists()            # nothing made for an unknown backup
    assert_cli_error(copy(src, a, a, bid, check=False), 1, "same repository")
    same = Side(a.url + "/", a.password_file)       # another spelling of the same place
    assert_cli_error(copy(src, a, same, bid, check=False), 1, "same repository")
    copy(src, a, b, bid)
    assert_cli_error(copy(src, Side(a.url, wrong), b, "--all", check=False), 1, "wrong password", a.url)
    assert_cli_error(copy(src, a, Side(b.url, wrong), "--all", check=False), 1, "wrong password", b.url)
    with socket.socket() as s:                      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert_cli_error(copy(src, a, Side("s3://nobucket/x", b.password_file, dead), "--all", check=False), 1,
                     "failed")
    assert_cli_error(copy(src, Side("s3://nobucket/x", a.password_file, dead), b, "--all", check=False), 1,
                     "failed")
    assert_cli_error(copy(src, a, b, check=False), 2, "BACKUP_ID... or --all")
    assert_cli_error(copy(src, a, b, bid, "--all", check=False), 2, "BACKUP_ID... or --all")
    assert_cli_error(copy(src, a, Side("ftp://x", b.password_file), "--all", check=False), 1,
                     "invalid repository")
    assert_cli_error(copy(src, Side(f"file://{tmp_path}/none", a.password_file), b, "--all", check=False), 3,
                     "no blocksnap repository")


def test_backup_keeps_its_command_line_beside_copy(src: Path, tmp_path: Path):
    a = side("file", tmp_path, "a", "pw-a")
    first = cli(src, "backup", "v@s1", *a.repo_args(), "--json")          # VOLUME@NAME first
    second = cli(src, "backup", *a.repo_args(), "--json", "v@s2")          # options first
    assert json.loads(second.stdout)["base"] == json.loads(first.stdout)["id"]
    helped = cli(src, "backup", "--help").stdout
    assert "VOLUME@NAME --repo URL" in helped and "copy" in helped and "--mode" in helped
    assert "--from-password-file" in cli(src, "backup", "copy", "--help").stdout
    assert "--mode" in cli(src, "backup", "v@s3", "--help").stdout
    assert_cli_error(cli(src, "backup", check=False), 2, "VOLUME@NAME")
    assert_cli_error(cli(src, "backup", "nosuch@x", *a.repo_args(), check=False), 3, "no snapshot")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_copy_to_and_from_radosgw(ceph, bucket: str, src: Path, tmp_path: Path):  # noqa: F811
    """The same through a real S3 server: file:// -> radosgw -> file://, restored bit
    for bit at each end, and a prune on radosgw (its batched DeleteObjects)."""
    creds = {"AWS_ACCESS_KEY_ID": ceph.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": ceph.SECRET_KEY}
    a = side("file", tmp_path, "a", "pw-a")
    (tmp_path / "rgw.pass").write_text("pw-rgw")
    g = Side(f"s3://{bucket}/copy", tmp_path / "rgw.pass", ceph.endpoint)
    c = side("file", tmp_path, "c", "pw-c")
    made = [m["id"] for m in backup_all(src, a)]

    def run(*args: str) -> dict:
        return json.loads(cli(src, *args, "--json", env=creds).stdout)

    assert run("backup", "copy", "--all", *a.args("from"), *g.args("to"))["copied"] == made
    assert run("backup", "copy", made[2], *g.args("from"), *c.args("to"))["copied"] == [made[2]]
    for s in (g, c):
        out = tmp_path / "r.raw"
        cli(src, "restore", made[2], str(out), *s.repo_args(), "--verify", env=creds)
        assert out.read_bytes() == export(src, "v@s3", tmp_path / "e")
        out.unlink()
    got = run("prune", "--keep-last", "1", *g.repo_args())
    assert sorted(got["removed"]) == sorted(made[:2])   # (the report lists by ID: same-second IDs sort by their suffix)
    assert run("verify", "--read-data", *g.repo_args())["problems"] == []


def test_the_python_api_and_the_translation_folded(src: Path, tmp_path: Path, monkeypatch):
    """copy_backups as the agent calls it; the translation objects folded into one
    once there are more than MAP_MAX, and still used after."""
    from blocksnap.backup import copy as copy_mod
    monkeypatch.setattr(copy_mod, "MAP_MAX", 1)
    a = side("file", tmp_path, "a", "pw-a")
    made = [m["id"] for m in backup_all(src, a)]
    ra = Repository.open(a.url, lambda _n: b"pw-a")[0]
    rb = Repository.open(f"file://{tmp_path / 'b'}", lambda _n: b"pw-b", create=True)[0]
    seen = []
    res = copy_mod.copy_backups(ra, rb, made[:1], progress=lambda done, total: seen.append((done, total)))
    assert res["copied"] == made[:1] and seen and seen[-1][0] == seen[-1][1] > 0
    maps = tmp_path / "b" / PREFIX / ra.config["id"]
    assert len(list(maps.iterdir())) == 1                    # one pack, one translation object
    res = copy_mod.copy_backups(ra, rb, made[1:])
    assert res["copied"] == made[1:] and len(list(maps.iterdir())) == 1   # folded
    with pytest.raises(BlocksnapError, match="same repository"):
        copy_mod.copy_backups(ra, Repository.open(a.url, lambda _n: b"pw-a")[0], None)
    with pytest.raises(BlocksnapError, match="no backup"):
        copy_mod.copy_backups(ra, rb, ["nosuch"])
    # the folded map is enough: a fresh destination-side read knows every chunk of the source
    rb.load_index()
    ra.load_index()
    idmap = copy_mod.IdMap(rb, ra.config["id"]).load()
    for bid in made:
        _, known = idmap.lookup(keys_of(ra.read_manifest(bid).ids))
        assert known.all()
    res = copy_mod.copy_backups(ra, rb, None)
    assert sorted(res["skipped"]) == sorted(made) and res["bytes_fetched"] == 0


def _old_format_repository(url: str, password: str) -> None:
    """A repository as blocksnap made them before `chunk_ids`: keyed BLAKE2b IDs and
    no such key in its config."""
    from blocksnap.backup.backends import open_backend
    from blocksnap.backup.crypto import Keys

    _, config = Keys.create(password.encode(), os.urandom(16).hex())
    del config["chunk_ids"]
    assert open_backend(url, None).put_new("config", json.dumps(config).encode())


def test_an_old_repository_with_blake2b_ids_is_read_written_and_copied(src: Path, tmp_path: Path):
    """Repositories made before the change keep their BLAKE2b chunk IDs: backups into
    one dedup against what it holds and restore bit for bit, and a copy into a new
    repository (HMAC-SHA-256 IDs) translates every ID and restores the same."""
    from blocksnap.backup.crypto import BLAKE2B, HMAC_SHA256

    old = side("file", tmp_path, "old", "pw-old")
    new = side("file", tmp_path, "new", "pw-new")
    _old_format_repository(old.url, "pw-old")
    made = [m["id"] for m in backup_all(src, old)]
    stats = json.loads(cli(src, "backup", "v@s3", "--mode", "full", *old.repo_args(), "--json").stdout)["stats"]
    assert stats["new_chunks"] == 0          # every chunk found under its BLAKE2b ID
    assert copy(src, old, new, "--all")["copied"][:3] == made
    opened = {}
    for s in (old, new):
        password = Path(s.password_file).read_text().strip().encode()
        opened[s.url], _ = Repository.open(s.url, lambda _new, pw=password: pw)
        assert restored(src, s, made[2], tmp_path) == export(src, "v@s3", tmp_path / "e")
    assert opened[old.url].keys.chunk_ids == BLAKE2B and opened[new.url].keys.chunk_ids == HMAC_SHA256
    data = export(src, "v@s1", tmp_path / "e1")[:64 << 10]
    ids = {url: r.keys.chunk_id(data) for url, r in opened.items()}
    assert ids[old.url] == hashlib.blake2b(data, digest_size=16, key=opened[old.url].keys._id_key).digest()
    assert ids[old.url] != ids[new.url]


def test_a_repository_with_unknown_chunk_ids_is_refused(src: Path, tmp_path: Path):
    """A config naming an ID hash this blocksnap does not know: one error line."""
    r = side("file", tmp_path, "r", "pw")
    cli(src, "backup", "v@s1", *r.repo_args())
    cfg_path = Path(r.url[len("file://"):]) / "config"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["chunk_ids"] == "hmac-sha256-128"
    cfg["chunk_ids"] = "sha3-512"
    cfg_path.chmod(0o600)
    cfg_path.write_text(json.dumps(cfg))
    assert_cli_error(cli(src, "backups", *r.repo_args(), check=False), 1, "are not supported")
