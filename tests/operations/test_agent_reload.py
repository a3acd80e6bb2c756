"""The running agent reloads its policy on SIGHUP and on a changed file; a bad one is
refused with its file:line, the old one kept and the refusal shown, until mended."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

from .agent_env import LOCAL_REPO, M, jobs, kill9, make_pool, start_agent, stop_daemon, wait_for, write_policy

POLICY = LOCAL_REPO + """

[[volume]]
match = ["vm1"]
snapshot = { every = "1h" }
backup = { to = ["local"], every = "1h" }

[metrics]
listen = ""
"""


def _state(pool: Path) -> dict:
    try:
        return json.loads((pool / "agent" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.root
@pytest.mark.slow
def test_reload_refuses_a_bad_policy_and_keeps_the_old(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": 2 * M, "vm2": 2 * M})
    policy = write_policy(tmp_path, POLICY)
    agent = start_agent(pool, policy, tmp_path / "agent.log")
    try:
        wait_for(lambda: {(r["volume"], r["kind"], r["result"]) for r in jobs(pool)} >=
                 {("vm1", "snapshot", "ok"), ("vm1", "backup", "ok")}, what="vm1's first jobs")
        # a bad policy (an unknown key) by SIGHUP: refused, the agent goes on
        policy.write_text(policy.read_text().replace('match = ["vm1"]', 'match = ["vm1", "vm2"]\nspeed = 3'))
        os.kill(agent.pid, signal.SIGHUP)
        st = wait_for(lambda: _state(pool) if _state(pool).get("policy_error") else None, what="the refusal")
        line = policy.read_text().splitlines().index("speed = 3") + 1
        assert f"{policy}:{line}: unknown key 'speed'" in st["policy_error"]
        assert agent.poll() is None
        out = run_cli(pool, "status", "--policy", str(tmp_path / "missing-is-fine.toml"))
        assert out.returncode != 0          # (a missing policy file is an error of its own)
        text = run_cli(pool, "status", check=True).stdout
        assert "refused" in text
        time.sleep(2)
        assert not any(r["volume"] == "vm2" for r in jobs(pool))     # the old policy still rules
        # mended (the file changed again: read without a signal): vm2 is now protected too
        policy.write_text(policy.read_text().replace("speed = 3\n", ""))
        wait_for(lambda: any(r["volume"] == "vm2" and r["kind"] == "backup" and r["result"] == "ok"
                             for r in jobs(pool)), what="vm2 backed up under the new policy")
        assert _state(pool).get("policy_error") is None
        # SIGTERM: a clean exit
        os.kill(agent.pid, signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        if agent.poll() is None:
            kill9(agent)
        stop_daemon(pool)


def test_one_agent_per_pool(tmp_path: Path):
    pool = make_pool(tmp_path / "pool", {"vm1": M})
    policy = write_policy(tmp_path, POLICY)
    from blocksnap.operations.agent import AgentLock
    lock = AgentLock(str(pool))
    try:
        res = run_cli(pool, "agent", "--policy", policy, "--once")
        assert res.returncode == 5 and "another agent runs for this pool" in res.stderr
        assert res.stderr.count("\n") == 1
    finally:
        lock.release()
    bad = tmp_path / "bad.toml"
    bad.write_text("[[volume]]\nmatch = 3\n")
    res = run_cli(pool, "agent", "--policy", bad, "--once")
    assert res.returncode == 1 and res.stderr.startswith(f"error: {bad}:2: ")


@pytest.mark.root
@pytest.mark.slow
def test_agent_outlives_its_daemon(tmp_path: Path):
    from blocksnap.service import daemon_spawn
    pool = make_pool(tmp_path / "pool", {"vm1": 2 * M})
    policy = write_policy(tmp_path, POLICY.replace('snapshot = { every = "1h" }', 'snapshot = { every = "2s" }'))
    agent = start_agent(pool, policy, tmp_path / "agent.log")
    try:
        wait_for(lambda: any(r["kind"] == "backup" and r["result"] == "ok" for r in jobs(pool)), what="a backup")
        pid = daemon_spawn.status(str(pool))["pid"]
        os.kill(pid, signal.SIGKILL)
        before = len(jobs(pool))
        # the agent starts the daemon again and goes on snapshotting
        wait_for(lambda: (daemon_spawn.status(str(pool)) or {}).get("pid") not in (None, pid), what="a new daemon")
        wait_for(lambda: len([r for r in jobs(pool) if r["result"] == "ok"]) > before + 1, what="jobs going on")
        assert agent.poll() is None
        assert "Traceback" not in (tmp_path / "agent.log").read_text()
    finally:
        if agent.poll() is None:
            kill9(agent)
        stop_daemon(pool)
