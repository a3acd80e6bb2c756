"""`status --repo`: one repository tells of every pool backing up into it, notices the
one whose agent has gone quiet, and writes the same as Prometheus metrics."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from blocksnap.backup.repo import Repository
from blocksnap.operations.fleet import write_heartbeat
from blocksnap.operations.status import read_agent_state
from tests.conftest import run_cli

from .agent_env import M, make_pool


def test_status_repo_sees_every_pool_and_a_silent_agent(tmp_path: Path):
    url = f"file://{tmp_path / 'repo'}"
    env = {"BLOCKSNAP_REPO": url, "BLOCKSNAP_REPO_PASSWORD": "fleet"}
    pools = [make_pool(tmp_path / f"pool{i}", {"vm1": M, f"db{i}": M}, seed=i) for i in (1, 2)]
    for p in pools:
        for vol in ("vm1", f"db{p.name[-1]}"):
            run_cli(p, "snapshot", "create", f"{vol}@s", check=True)
            run_cli(p, "backup", f"{vol}@s", env=env, check=True)
    repo, _ = Repository.open(url, lambda _new: b"fleet")
    now = time.time()
    write_heartbeat(repo, socket.gethostname(), str(pools[0]), now, 300, {"vm1": {"rpo": 3600}, "db1": {"rpo": 1}})
    time.sleep(1.1)
    prom = tmp_path / "fleet.prom"
    res = run_cli(None, "status", "--repo", url, "--json", "--textfile", prom, env=env, check=True)
    hosts = {h["pool"]: h for h in json.loads(res.stdout)["hosts"]}
    assert set(hosts) == {str(p) for p in pools}
    one, two = hosts[str(pools[0])], hosts[str(pools[1])]
    assert not one["stale"] and two["stale"]                  # pool2's agent never wrote a heartbeat
    vols = {v["volume"]: v for v in one["volumes"]}
    assert vols["vm1"]["backups"] == 1 and not vols["vm1"]["rpo_breached"]
    assert vols["db1"]["rpo_breached"] and vols["db1"]["age"] > 1 and one["rpo_breached"]   # an RPO of 1 s
    assert [v["volume"] for v in two["volumes"]] == ["db2", "vm1"]
    samples = {(s.name, s.labels.get("pool"), s.labels.get("volume")): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    assert samples[("blocksnap_fleet_agent_stale", str(pools[1]), None)] == 1
    assert samples[("blocksnap_fleet_agent_stale", str(pools[0]), None)] == 0
    assert samples[("blocksnap_fleet_rpo_seconds", str(pools[0]), "vm1")] == 3600
    assert samples[("blocksnap_fleet_recovery_point_age_seconds", str(pools[1]), "db2")] > 0
    # for a monitor: a stale agent (or a breach) is exit 11
    assert run_cli(None, "status", "--repo", url, "--check", env=env).returncode == 11
    text = run_cli(None, "status", "--repo", url, env=env, check=True).stdout
    assert "STALE" in text and "vm1" in text
    # without a policy or an agent, status of a pool still lists its volumes
    out = run_cli(pools[0], "status", check=True).stdout
    assert "vm1" in out and "no agent has run" in out
    assert read_agent_state(str(pools[0] / "agent")) == (None, None)


def test_textfile_needs_repo(tmp_path: Path):
    res = run_cli(tmp_path / "pool", "status", "--textfile", tmp_path / "x.prom")
    assert res.returncode == 1 and "--textfile goes with --repo" in res.stderr
