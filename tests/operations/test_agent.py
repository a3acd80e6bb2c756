"""The agent on a real pool and real repositories: it snapshots, backs up, keeps its
history, survives kill -9 mid-backup (the job recorded as interrupted, run again,
only the rest stored), and stops a backup whose window closes, continuing it later."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from blocksnap.operations.agent import Agent
from blocksnap.settings import Settings
from tests.conftest import run_cli

from .agent_env import LOCAL_REPO, M, jobs, kill9, make_pool, start_agent, stop_daemon, wait_for, write_policy

POLICY = LOCAL_REPO + """

[[volume]]
match = ["vm*"]
rpo = "1h"
snapshot = { every = "15m" }
keep_snapshots = { last = 2 }
backup = { to = ["local"], every = "1h" }
keep_backups = { last = 5 }

[metrics]
listen = ""
"""


def _packs(repo: Path) -> int:
    return sum(1 for p in (repo / "data").rglob("*") if p.is_file()) if (repo / "data").is_dir() else 0


def _repo_env(tmp: Path) -> dict[str, str]:
    return {"BLOCKSNAP_PASSWORD_FILE": str(tmp / "pw"), "BLOCKSNAP_REPO": f"file://{tmp}/repo"}


def test_agent_once_snapshots_backs_up_and_records(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 8 * M, "vm2": 4 * M, "other": M})
    policy = write_policy(tmp_path, POLICY)
    res = run_cli(pool, "agent", "--policy", policy, "--once")
    assert res.returncode == 0, res.stderr
    rows = jobs(pool)
    kinds = sorted((r["volume"], r["kind"], r["result"]) for r in rows)
    assert kinds == [("vm1", "backup", "ok"), ("vm1", "snapshot", "ok"), ("vm2", "backup", "ok"),
                     ("vm2", "snapshot", "ok")]                 # 'other' is in no policy
    b1 = next(r for r in rows if r["volume"] == "vm1" and r["kind"] == "backup")
    assert b1["bytes_read"] >= 8 * M and b1["bytes_stored"] >= 8 * M and b1["info"]["mode"] == "full"
    # the backup restores to exactly the snapshot it names
    env = _repo_env(tmp_path)
    run_cli(pool, "restore", b1["info"]["backup_id"], tmp_path / "r.img", env=env, check=True)
    run_cli(pool, "export", f"vm1@{b1['info']['snapshot']}", tmp_path / "e.img", check=True)
    assert (tmp_path / "r.img").read_bytes() == (tmp_path / "e.img").read_bytes()
    # status knows the recovery point, from the snapshot's creation time
    st = json.loads(run_cli(pool, "status", "--policy", policy, "--json", check=True).stdout)
    vm1 = next(v for v in st["volumes"] if v["volume"] == "vm1")
    assert vm1["recovery_point"] == pytest.approx(b1["info"]["snapshot_created"])
    assert not vm1["rpo_breached"] and vm1["copies"][0]["backup_id"] == b1["info"]["backup_id"]
    assert vm1["next_runs"]["snapshot"] > time.time() + 10 * 60
    # nothing is due now: a second run does nothing
    assert run_cli(pool, "agent", "--policy", policy, "--once").returncode == 0
    assert len(jobs(pool)) == len(rows)
    text = run_cli(pool, "jobs", "--volume", "vm1", check=True).stdout
    assert "backup" in text and "other" not in text


@pytest.mark.root
@pytest.mark.slow
def test_agent_killed_mid_backup_runs_it_again(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 800 * M})      # long enough for a checkpoint (2 s at least)
    policy = write_policy(tmp_path, POLICY)
    log = tmp_path / "agent.log"
    agent = start_agent(pool, policy, log)
    try:
        wait_for(lambda: any(r["kind"] == "backup" and r["result"] == "running" for r in jobs(pool)),
                 what="a running backup")
        wait_for(lambda: _packs(tmp_path / "repo") >= 3, what="the backup's first packs", timeout=60)
        kill9(agent)
        assert [r["result"] for r in jobs(pool) if r["kind"] == "backup"] == ["running"]   # as the kill left it
        res = run_cli(pool, "agent", "--policy", policy, "--once", timeout=300)
        assert res.returncode == 0, res.stderr
        backups = [r for r in jobs(pool) if r["kind"] == "backup"]
        assert [r["result"] for r in backups] == ["ok", "interrupted"]        # newest first
        assert "interrupted" in backups[1]["error"]
        again = backups[0]
        assert again["bytes_stored"] < 800 * M                  # the first run's packs were kept
        env = _repo_env(tmp_path)
        assert json.loads(run_cli(pool, "verify", "--json", env=env, check=True).stdout)["problems"] == []
        locks = list((tmp_path / "repo" / "locks").iterdir()) if (tmp_path / "repo" / "locks").exists() else []
        assert locks == []
    finally:
        if agent.poll() is None:
            kill9(agent)
        stop_daemon(pool)


@pytest.mark.slow
def test_window_closing_stops_the_backup_and_the_next_window_continues(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 600 * M})
    now = time.localtime()
    start = time.strftime("%H:%M", now)
    end = time.strftime("%H:%M", time.localtime(time.time() + 6 * 3600))
    policy = write_policy(tmp_path, POLICY.replace('every = "1h" }', f'every = "1h", window = "{start}-{end}" }}'))
    shift = [0.0]
    agent = Agent(str(pool), str(policy), Settings.from_env(), once=True, clock=lambda: time.time() + shift[0])
    # cut the window short while the backup runs, once it has stored a few packs: the
    # agent's clock jumps past the window's end
    def close_window() -> None:
        wait_for(lambda: _packs(tmp_path / "repo") >= 3, what="the backup's first packs")
        shift[0] = 6 * 3600 + 60
    timer = threading.Thread(target=close_window)
    timer.start()
    t = threading.Thread(target=agent.run)
    t.start()
    t.join(300)
    timer.join(10)
    first = next(r for r in jobs(pool) if r["kind"] == "backup")
    assert first["result"] == "stopped" and "window" in first["error"], first
    # the next window (the clock back inside it): the same snapshot, only the rest stored
    shift[0] = 24 * 3600
    again = Agent(str(pool), str(policy), Settings.from_env(), once=True, clock=lambda: time.time() + shift[0])
    t = threading.Thread(target=again.run)
    t.start()
    t.join(300)
    second = next(r for r in jobs(pool) if r["kind"] == "backup")
    assert second["result"] == "ok", second
    assert second["info"]["snapshot"] == first["info"]["snapshot"]
    assert second["bytes_stored"] < 600 * M - 32 * M
    assert second["info"]["mode"] == "full"


COPY_POLICY = POLICY.replace('keep_backups = { last = 5 }', '''keep_backups = { last = 5 }
copy = [{ from = "local", to = "second", every = "1d" }]''') + '''
[[repository]]
name = "second"
url = "file://{tmp}/second"
password_file = "{pw}"
'''


@pytest.mark.root
@pytest.mark.slow
def test_agent_killed_mid_copy_copies_again_only_the_rest(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 300 * M})
    policy = write_policy(tmp_path, COPY_POLICY)
    res = run_cli(pool, "agent", "--policy", policy, "--once", timeout=300)    # snapshot, backup, copy
    assert res.returncode == 0, res.stderr
    first = [r for r in jobs(pool) if r["kind"] == "copy"]
    assert [r["result"] for r in first] == ["ok"] and first[0]["bytes_stored"] >= 300 * M
    # the destination emptied, the copy due again at once, and the agent killed while it copies
    import shutil
    shutil.rmtree(tmp_path / "second")
    log = tmp_path / "agent.log"
    agent = start_agent(pool, write_policy(tmp_path, COPY_POLICY.replace('every = "1d" }]', 'every = "1s" }]')),
                        log)
    try:
        wait_for(lambda: any(r["kind"] == "copy" and r["result"] == "running" for r in jobs(pool)),
                 what="a running copy")
        wait_for(lambda: len([p for p in (tmp_path / "second").rglob("*") if p.is_file()]) > 8,
                 what="the copy's first packs")
        kill9(agent)
        res = run_cli(pool, "agent", "--policy", policy, "--once", timeout=300)
        assert res.returncode == 0, res.stderr
        copies = [r for r in jobs(pool) if r["kind"] == "copy"]
        assert [r["result"] for r in copies[:2]] == ["ok", "interrupted"], copies
        assert 0 < copies[0]["bytes_stored"] < 300 * M          # what the killed run sent stayed
        env = {"BLOCKSNAP_PASSWORD_FILE": str(tmp_path / "pw"), "BLOCKSNAP_REPO": f"file://{tmp_path}/second"}
        assert json.loads(run_cli(pool, "verify", "--json", env=env, check=True).stdout)["problems"] == []
        b = next(r for r in jobs(pool) if r["kind"] == "backup" and r["result"] == "ok")
        run_cli(pool, "restore", b["info"]["backup_id"], tmp_path / "r.img", env=env, check=True)
        run_cli(pool, "export", f"vm1@{b['info']['snapshot']}", tmp_path / "e.img", check=True)
        assert (tmp_path / "r.img").read_bytes() == (tmp_path / "e.img").read_bytes()
    finally:
        if agent.poll() is None:
            kill9(agent)
        stop_daemon(pool)


def test_retention_never_takes_the_base_of_the_next_incremental(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 2 * M})
    policy = write_policy(tmp_path, POLICY.replace('snapshot = { every = "15m" }', 'snapshot = { every = "1s" }')
                          .replace("keep_snapshots = { last = 2 }", "keep_snapshots = { last = 1 }"))
    run_cli(pool, "snapshot", "create", "vm1@mine", check=True)          # a user's own: never the agent's to prune
    time.sleep(1.1)             # (so the agent's snapshot is due, and newer: the backup takes the newest)
    assert run_cli(pool, "agent", "--policy", policy, "--once").returncode == 0
    base = next(r for r in jobs(pool) if r["kind"] == "backup")["info"]["snapshot"]
    names = []
    for _ in range(3):                                                    # three more snapshots, no backup due
        time.sleep(1.1)
        assert run_cli(pool, "agent", "--policy", policy, "--once").returncode == 0
        snaps = json.loads(run_cli(pool, "snapshot", "list", "vm1", "--json", check=True).stdout)
        names = [s["name"] for s in snaps]
        assert base in names and "mine" in names
    newest = next(r for r in jobs(pool) if r["kind"] == "snapshot")["info"]["snapshot"]
    assert sorted(names) == sorted({"mine", base, newest})               # the others went, by last = 1
    kept = next(r for r in jobs(pool) if r["kind"] == "snapshot")["info"]["retention"]["kept_as_base"]
    assert kept == [base]


def test_retention_waits_for_the_repository_then_defers(tmp_path: Path, monkeypatch):
    import threading as th

    from blocksnap.backup.repo import Repository
    from blocksnap.operations import jobs as jobs_mod
    from blocksnap.retention import Policy as Keep
    url = f"file://{tmp_path / 'repo'}"
    pool = make_pool(tmp_path / "pool", {"vm1": M})
    run_cli(pool, "snapshot", "create", "vm1@a", check=True)
    run_cli(pool, "backup", "vm1@a", "--repo", url, env={"BLOCKSNAP_REPO_PASSWORD": "x"}, check=True)
    repo, _ = Repository.open(url, lambda _new: b"x")
    other, _ = Repository.open(url, lambda _new: b"x")
    stop = jobs_mod.Stop(float("inf"), th.Event())
    monkeypatch.setattr(jobs_mod, "PRUNE_TRIES", 2)
    with other.lock("backup"):                 # another volume's backup holds the repository
        out = jobs_mod.prune_backups(repo, Keep(last=1), ("h", "p", "vm1"), stop)
    assert "is locked by backup" in out["deferred"]
    assert jobs_mod.prune_backups(repo, Keep(last=1), ("h", "p", "vm1"), stop) == {"removed": [],
                                                                                  "packs_deleted": 0}


def test_two_snapshots_in_one_second_get_two_names(tmp_path: Path):
    from blocksnap.operations import jobs as jobs_mod
    from blocksnap.operations.policy import load
    pool = make_pool(tmp_path / "pool", {"vm1": M})
    policy = load(str(write_policy(tmp_path, POLICY)))
    env = jobs_mod.JobEnv(str(pool), policy, Settings.from_env())
    now = time.time()
    names = [jobs_mod.take_snapshot(env, policy.rule_for("vm1"), "vm1", now)["name"] for _ in range(3)]
    base = jobs_mod.snapshot_name(now)
    assert names == [base, f"{base}-1", f"{base}-2"]
