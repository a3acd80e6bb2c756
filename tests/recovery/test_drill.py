"""`blocksnap drill`: a backup brought up on a throwaway overlay and checked, through
the real command line: fsck on ext4 (clean, and with a damaged chunk), a user
command, a drill killed with SIGKILL (the next one cleans up) or SIGTERM (it
cleans up itself), results read back from the repository, and bad input."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import assert_cli_error

from .conftest import assert_nothing_left, states
from .test_mount import damage_chunk


def _drill(b, *args, check=True):
    res = b.cli("drill", *args, "--json", check=False)
    if check:
        assert res.returncode == 0, (res.stdout, res.stderr)
    return res


def _repo_digest(b) -> str:
    root = Path(b.repo.url[len("file://"):])
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.is_file() and "drills" not in p.parts and "locks" not in p.parts):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_fsck_and_command_drill(local_backup, runtime_dir):
    b = local_backup
    before = _repo_digest(b)
    cmd = ("command:test -f $BLOCKSNAP_DRILL_DIR/hello.txt && test $BLOCKSNAP_BACKUP_ID = " + b.id
           + " && test -b $BLOCKSNAP_DRILL_DEVICE && echo written > $BLOCKSNAP_DRILL_DIR/hello.txt && echo done")
    res = json.loads(_drill(b, b.id, "--check", "fsck", "--check", cmd).stdout)
    assert res["ok"] and res["error"] is None and res["fstype"] == "ext4", res
    assert [c["name"] for c in res["checks"]] == ["fsck", "command"] and all(c["ok"] for c in res["checks"])
    assert "done" in res["checks"][1]["output"]
    assert 0 < res["rto_seconds"] <= res["seconds"]
    assert res["overlay_bytes"] > 0              # the command wrote, on the overlay only
    assert _repo_digest(b) == before             # the backup never changes
    assert_nothing_left(runtime_dir, res["work_dir"])
    assert not os.path.exists(res["work_dir"])

    # by volume; then the results, as any host with the password sees them
    res2 = json.loads(_drill(b, "--volume", "v").stdout)
    assert res2["ok"] and res2["backup"] == b.id and [c["name"] for c in res2["checks"]] == ["fsck"]
    from blocksnap.backup.repo import Repository
    from blocksnap.recovery.drill import drill_results
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    got = drill_results(repo, "v")
    assert [d["rto_seconds"] for d in got] == [res["rto_seconds"], res2["rto_seconds"]]
    assert drill_results(repo, "other") == []
    listed = json.loads(b.cli("drills", "--json").stdout)
    assert [d["backup"] for d in listed] == [b.id, b.id] and all(d["ok"] for d in listed)


def test_damaged_block_fails_the_drill_naming_it(local_backup, runtime_dir):
    b = local_backup
    cid, at = damage_chunk(b, row=0)            # chunk 0: the superblock
    assert at == 0
    res = _drill(b, b.id, check=False)
    line = assert_cli_error(res, 7, "damaged", cid, "image offset 0")
    assert "drill of" in line
    from blocksnap.backup.repo import Repository
    from blocksnap.recovery.drill import drill_results
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    (rec,) = drill_results(repo)
    assert not rec["ok"] and rec["rto_seconds"] is None and cid in rec["error"] and rec["damaged"]
    assert_nothing_left(runtime_dir, rec["work_dir"])


def _start_drill(b, runtime_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, BLOCKSNAP_REPO=b.repo.url, BLOCKSNAP_REPO_PASSWORD="correct horse")
    env.pop("BLOCKSNAP_POOL", None)
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(b.pool), "drill", b.id, "--check",
                             "command:touch $BLOCKSNAP_DRILL_DIR/started; sleep 120"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        st = states(runtime_dir)
        if st and st[0].get("services") and (Path(st[0]["fs_dir"]) / "started").exists():
            return proc, st[0]
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def test_killed_drill_is_cleaned_by_the_next(local_backup, runtime_dir, tmp_path):
    b = local_backup
    proc, st = _start_drill(b, runtime_dir, tmp_path)
    proc.kill()
    proc.wait()
    with open("/proc/mounts") as f:
        assert st["fs_dir"] in f.read()         # what it left: the mount, the loop device, the command
    res = json.loads(_drill(b, b.id).stdout)
    assert res["ok"] and any("unmounted" in d for d in res["cleaned_up_leftovers"]), res["cleaned_up_leftovers"]
    assert_nothing_left(runtime_dir, st["fs_dir"], pids=tuple(s["pid"] for s in st["services"]))
    assert not os.path.exists(st["remove"][0])
    from blocksnap.backup.repo import Repository
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    assert repo.locks() == []                   # the killed drill's lock went too


def test_killed_drill_is_cleaned_by_umount(local_backup, runtime_dir, tmp_path):
    b = local_backup
    proc, st = _start_drill(b, runtime_dir, tmp_path)
    proc.kill()
    proc.wait()
    b.cli("umount", st["fs_dir"])
    assert_nothing_left(runtime_dir, st["fs_dir"], pids=tuple(s["pid"] for s in st["services"]))


def test_sigterm_drill_cleans_up_itself(local_backup, runtime_dir, tmp_path):
    b = local_backup
    proc, st = _start_drill(b, runtime_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.count("\n") == 1 and "interrupted" in err, err
    assert_nothing_left(runtime_dir, st["fs_dir"], pids=tuple(s["pid"] for s in st["services"]))
    from blocksnap.backup.repo import Repository
    from blocksnap.recovery.drill import drill_results
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    (rec,) = drill_results(repo)
    assert not rec["ok"] and "SIGTERM" in rec["error"]


def test_drill_bad_inputs(local_backup, runtime_dir):
    b = local_backup
    assert_cli_error(_drill(b, "20990101T000000Z-000000", check=False), 3, "no backup")
    assert_cli_error(_drill(b, "--volume", "nope", check=False), 3, "no backup of volume")
    assert_cli_error(_drill(b, check=False), 1, "BACKUP_ID or --volume")
    assert_cli_error(_drill(b, b.id, "--volume", "v", check=False), 1, "one of them")
    assert_cli_error(_drill(b, b.id, "--check", "bogus", check=False), 1, "unknown check")
    assert_cli_error(_drill(b, b.id, "--sql", "SELECT 1", check=False), 1, "--sql")
    res = _drill(b, b.id, "--check", "postgres", check=False)        # an ext4 with no PostgreSQL in it
    assert_cli_error(res, 1, "no PostgreSQL data directory")
    assert_cli_error(b.cli("drill", b.id, env={"BLOCKSNAP_REPO_PASSWORD": "wrong"}, check=False), 1,
                     "wrong password")
    assert_nothing_left(runtime_dir)


def test_xfs_mount_and_drill(tmp_path, runtime_dir):
    """An xfs filesystem (mounted with norecovery,nouuid; drilled with xfs_repair -n)."""
    import shutil

    import blocksnap
    from tests.backup.conftest import Repo

    from .conftest import make_tree, tree
    if not shutil.which("mkfs.xfs"):
        import pytest
        pytest.skip("needs xfsprogs")
    files = tmp_path / "files"
    make_tree(files, seed=11)
    img = tmp_path / "xfs.img"
    subprocess.run(["truncate", "-s", "320M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True)
    fill = tmp_path / "fill"
    fill.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(fill)], check=True)
    try:
        shutil.copytree(files, fill, dirs_exist_ok=True)
    finally:
        subprocess.run(["umount", str(fill)], check=True)
    pool = tmp_path / "pool"
    blocksnap.Pool.create(str(pool), size=512 << 20).close()
    repo = Repo(pool, f"file://{tmp_path / 'repo'}", {})
    repo.cli("volume", "import", "x", str(img))
    img.unlink()
    repo.cli("snapshot", "create", "x@s1")
    bid = repo.backup("x@s1")["id"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    info = json.loads(repo.cli("mount", bid, str(mnt), "--json").stdout)
    try:
        assert info["fstype"] == "xfs" and tree(mnt) == tree(files)
    finally:
        repo.cli("umount", str(mnt))
    res = json.loads(repo.cli("drill", bid, "--check", "fsck", "--json").stdout)
    assert res["ok"] and res["fstype"] == "xfs" and res["checks"][0]["summary"] == "clean", res
    assert_nothing_left(runtime_dir, mnt, res["work_dir"])


def test_run_drill_api(local_backup, runtime_dir):
    """The function the policy agent calls: a dict back, progress reported, recorded."""
    from blocksnap.backup.repo import Repository
    from blocksnap.recovery.drill import drill_results, run_drill
    b = local_backup
    repo, _ = Repository.open(b.repo.url, lambda new: b"correct horse")
    steps = []
    res = run_drill(repo, b.id[:12], ["fsck", "command:exit 3"], progress=lambda d, t: steps.append((d, t)))
    assert not res["ok"] and res["rto_seconds"] is None and res["backup"] == b.id
    assert res["error"] == "check command failed: exit 3" and [c["ok"] for c in res["checks"]] == [True, False]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    res = run_drill(repo, b.id, ["fsck"])
    assert res["ok"] and res["rto_seconds"] > 0 and res["checks"][0]["summary"] == "clean"
    assert [d["ok"] for d in drill_results(repo)] == [False, True]
    assert_nothing_left(runtime_dir, res["work_dir"])
