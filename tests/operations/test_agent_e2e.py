"""The whole practice at once, with real parts: the agent snapshots and backs up to a
local repository, copies to S3 (moto's server) for 3-2-1, verifies both, serves true
metrics, posts an alert to a webhook when a backup to a dead endpoint fails, writes
heartbeats that `status --repo` reads from the S3 repository alone."""
from __future__ import annotations

import http.server
import json
import socket
import threading
import urllib.request
from pathlib import Path

import boto3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.backup.conftest import S3_ENV, s3_server  # noqa: F401 - the fixture, for this module
from tests.conftest import run_cli

from .agent_env import LOCAL_REPO, M, jobs, kill9, make_pool, start_agent, stop_daemon, wait_for, write_policy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


POLICY = LOCAL_REPO + """

[[repository]]
name = "cloud"
url = "s3://{bucket}/bs"
endpoint = "{s3}"
password_file = "{pw}"
medium = "object"
offsite = true

[[repository]]
name = "dead"
url = "s3://nowhere/bs"
endpoint = "http://127.0.0.1:{dead}"
password_file = "{pw}"

[[volume]]
match = ["vm1"]
rpo = "1h"
snapshot = { every = "15m" }
backup = { to = ["local"], every = "1h" }
copy = [{ from = "local", to = "cloud", every = "1d" }]
verify = { cycle = "30d", budget = "1G" }

[[volume]]
match = ["vm2"]
rpo = "1h"
backup = { to = ["dead"], every = "1h" }

[alerts]
webhook = ["http://127.0.0.1:{hook}/hook"]

[metrics]
listen = "127.0.0.1:{metrics}"
"""


@pytest.mark.root
@pytest.mark.slow
def test_agent_protects_copies_verifies_alerts_and_reports(tmp_path: Path, s3_server: str):  # noqa: F811
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="agent-e2e")
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    metrics_port = _free_port()
    pool = make_pool(tmp_path / "pool", {"vm1": 6 * M, "vm2": M})
    policy = write_policy(tmp_path, POLICY.replace("{bucket}", "agent-e2e").replace("{s3}", s3_server)
                          .replace("{dead}", str(_free_port())).replace("{hook}", str(hook.server_address[1]))
                          .replace("{metrics}", str(metrics_port)))
    agent = start_agent(pool, policy, tmp_path / "agent.log", S3_ENV)
    try:
        def done() -> bool:
            ok = {(r["volume"], r["kind"], r["target"]) for r in jobs(pool) if r["result"] == "ok"}
            return {("vm1", "snapshot", ""), ("vm1", "backup", "local"), ("vm1", "copy", "cloud"),
                    ("", "verify", "local"), ("", "verify", "cloud")} <= ok
        wait_for(done, timeout=180, what="snapshot, backup, copy and both verifications")
        failed = wait_for(lambda: [r for r in jobs(pool) if r["volume"] == "vm2" and r["result"] == "failed"],
                          what="vm2's backup to the dead endpoint failing")
        assert failed[0]["kind"] == "backup" and failed[0]["error"]
        # the alert, once, as JSON
        hit = wait_for(lambda: [a for a in Receiver.got if a.get("key") == "job_failed/vm2/backup/dead"],
                       what="the job-failed alert")
        assert hit[0]["status"] == "firing"
        # true metrics, scraped over HTTP
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("blocksnap_last_success_timestamp_seconds",
                        (("job", "backup"), ("repository", "local"), ("volume", "vm1")))] > 0
        assert samples[("blocksnap_rpo_seconds", (("volume", "vm1"),))] == 3600
        assert samples[("blocksnap_recovery_point_age_seconds", (("volume", "vm1"),))] < 600
        assert samples[("blocksnap_verify_coverage_ratio", (("repository", "local"),))] == 1.0
        assert samples[("blocksnap_job_failures_total",
                        (("job", "backup"), ("repository", "dead"), ("volume", "vm2")))] >= 1
        # 3-2-1: the live volume, local disk, the object store off site
        st = json.loads(run_cli(pool, "status", "--policy", policy, "--json", env=S3_ENV, check=True).stdout)
        vm1 = next(v for v in st["volumes"] if v["volume"] == "vm1")
        assert (vm1["copies_ok"], vm1["media"], vm1["offsite"], vm1["rule_321_met"]) == (3, 2, 1, True)
        rto = vm1["rto_expected"]              # cold: the backup's data at the rate verification read it
        assert rto["bytes"] >= 6 * M and rto["rate"] > 0 and rto["cold"] == pytest.approx(rto["bytes"] / rto["rate"])
        res = run_cli(pool, "status", "--policy", policy, "--check", env=S3_ENV)
        assert res.returncode == 12 and "JOB FAILED" in res.stdout     # vm2's backup
        # the S3 repository alone knows this host, its volume and the agent's heartbeat
        fleet = run_cli(None, "status", "--repo", "s3://agent-e2e/bs", "--endpoint", s3_server, "--password-file",
                        tmp_path / "pw", "--json", env=S3_ENV, check=True)
        hosts = json.loads(fleet.stdout)["hosts"]
        assert len(hosts) == 1 and not hosts[0]["stale"] and hosts[0]["pool"] == str(pool)
        assert [v["volume"] for v in hosts[0]["volumes"] if v["backups"]] == ["vm1"]
        # the copy restores like the original
        b = next(r for r in jobs(pool) if r["kind"] == "backup" and r["volume"] == "vm1" and r["result"] == "ok")
        env = dict(S3_ENV, BLOCKSNAP_PASSWORD_FILE=str(tmp_path / "pw"))
        run_cli(pool, "restore", "--repo", "s3://agent-e2e/bs", "--endpoint", s3_server, b["info"]["backup_id"],
                tmp_path / "c.img", env=env, check=True)
        run_cli(pool, "export", f"vm1@{b['info']['snapshot']}", tmp_path / "e.img", check=True)
        assert (tmp_path / "c.img").read_bytes() == (tmp_path / "e.img").read_bytes()
    finally:
        if agent.poll() is None:
            kill9(agent)
        stop_daemon(pool)
        hook.shutdown()
