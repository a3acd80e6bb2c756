"""Drills the policy schedules: the agent brings its newest backup up, fsck passes, the
RTO is recorded in the history, status and the repository; a volume whose data is no
filesystem fails its drill and that is what the status says."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

from .agent_env import LOCAL_REPO, jobs, make_pool, write_policy

POLICY = LOCAL_REPO + """

[[volume]]
match = ["fs", "junk"]
rpo = "1d"
backup = { to = ["local"], every = "1d" }
drill = { every = "7d", check = ["fsck"] }

[metrics]
listen = ""
"""


def _pool_with_ext4(tmp_path: Path, others: dict[str, int]) -> Path:
    """A pool with volume fs, a small ext4 holding hello.txt, and `others` (random data)."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello\n")
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(img), "64M"], check=True)
    pool = make_pool(tmp_path / "pool", others)
    run_cli(pool, "volume", "import", "fs", img, check=True)
    return pool


@pytest.mark.root
@pytest.mark.slow
def test_policy_drills_pass_and_fail_truthfully(tmp_path: Path):
    pool = _pool_with_ext4(tmp_path, {"junk": 8 << 20})
    policy = write_policy(tmp_path, POLICY)
    res = run_cli(pool, "agent", "--policy", policy, "--once", timeout=600)
    assert res.returncode == 0, res.stderr
    drills = {r["volume"]: r for r in jobs(pool) if r["kind"] == "drill"}
    assert drills["fs"]["result"] == "ok" and drills["fs"]["info"]["rto_seconds"] > 0
    assert drills["fs"]["info"]["checks"][0]["name"] == "fsck" and drills["fs"]["info"]["checks"][0]["ok"]
    assert drills["junk"]["result"] == "failed" and drills["junk"]["error"]
    st = json.loads(run_cli(pool, "status", "--policy", policy, "--json", check=True).stdout)
    by = {v["volume"]: v for v in st["volumes"]}
    assert by["fs"]["drill"]["ok"] is True and by["fs"]["drill"]["rto_seconds"] == drills["fs"]["info"]["rto_seconds"]
    assert by["junk"]["drill"]["ok"] is False
    assert run_cli(pool, "status", "--policy", policy, "--check").returncode in (10, 12)
    # nothing left behind: nothing mounted from the drilled backups, no loop device on their images
    mounts = Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for d in drills.values():
        assert d["info"]["backup_id"] not in mounts and d["info"]["backup_id"] not in loops


DAMAGED_POLICY = LOCAL_REPO + """

[[volume]]
match = ["fs"]
rpo = "1d"
backup = { to = ["local"], every = "1d" }
drill = { every = "7d", check = ["fsck"] }

[alerts]
webhook = ["{hook}"]

[metrics]
listen = ""
"""


@pytest.mark.root
@pytest.mark.slow
def test_a_damaged_backup_fails_the_agents_drill_naming_the_block_and_alerts(tmp_path: Path, receiver):
    """The issue's case end to end: a byte flipped in the chunk of the superblock of
    the backup the policy drills; `agent --once` runs the drill, which fails naming
    that chunk and image offset 0, and the webhook gets the drill-failed alert
    saying so; nothing stays mounted."""
    from blocksnap.backup.repo import Repository

    pool = _pool_with_ext4(tmp_path, {})
    policy = write_policy(tmp_path, DAMAGED_POLICY.replace("{hook}", receiver.url()))
    repo_args = ["--repo", f"file://{tmp_path}/repo", "--password-file", str(tmp_path / "pw")]
    run_cli(pool, "snapshot", "create", "fs@first", check=True)
    run_cli(pool, "backup", "fs@first", *repo_args, check=True)
    repo, _ = Repository.open(f"file://{tmp_path}/repo", lambda new: b"agent secret")
    (bid,) = repo.backup_ids()
    m = repo.manifest(bid)
    repo.load_index()
    assert int(m.chunk_numbers()[0]) == 0          # the first stored chunk is the superblock's
    cid = m.ids[0].tobytes()
    pack, off, ln = repo.index.get(cid)
    path = tmp_path / "repo" / "data" / pack
    data = bytearray(path.read_bytes())
    data[off + ln // 2] ^= 0x55
    path.write_bytes(bytes(data))

    res = run_cli(pool, "agent", "--policy", policy, "--once", timeout=600)
    assert res.returncode == 0, res.stderr
    (drill,) = [r for r in jobs(pool) if r["kind"] == "drill"]
    assert drill["result"] == "failed" and cid.hex() in drill["error"] and "image offset 0" in drill["error"]
    alerts = [r.json() for r in receiver.requests]
    hit = [a for a in alerts if a.get("key") == "drill_failed/fs"]
    assert hit and hit[0]["status"] == "firing", alerts
    assert cid.hex() in json.dumps(hit[0]), hit[0]
    mounts = Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert drill["info"]["backup_id"] not in mounts and drill["info"]["backup_id"] not in loops
