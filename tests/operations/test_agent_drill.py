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


@pytest.mark.root
@pytest.mark.slow
def test_policy_drills_pass_and_fail_truthfully(tmp_path: Path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello\n")
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(img), "64M"], check=True)
    pool = make_pool(tmp_path / "pool", {"junk": 8 << 20})
    run_cli(pool, "volume", "import", "fs", img, check=True)
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
