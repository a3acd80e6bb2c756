"""The shipped rules file: promtool checks it and unit-tests its expressions, and a
real Prometheus (Debian's) scraping MetricsServer fires and resolves its alerts."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from blocksnap.operations.metrics import MetricsServer
from blocksnap.operations.model import MetricsConfig

from .conftest import RULES, breach_rpo, fail_backup, healthy_report, wait_for

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (.ci/apt-packages-ops.txt)")


@needs_promtool
def test_promtool_checks_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 15 rules found" in out.stdout


def test_the_rules_cover_the_issue():
    text = RULES.read_text()
    names = set(re.findall(r"(?m)^\s+- alert: (\w+)$", text))
    assert {"BlocksnapJobFailed", "BlocksnapRPOBreached", "BlocksnapAgentAbsent", "BlocksnapStorageHigh",
            "BlocksnapVerifyCoverageBehind", "BlocksnapCorruptionFound", "BlocksnapDrillFailed",
            "BlocksnapDrillStale", "BlocksnapFleetAgentStale"} <= names
    severities = re.findall(r"(?m)^\s+severity: (\w+)$", text)
    assert len(severities) == 15 and set(severities) == {"critical", "warning"}


UNIT = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'blocksnap_job_failing{{job="blocksnap",instance="h:9469",volume="vm1",repository="local",exported_job="backup",result="failed"}}'
        values: '_ 1x10 _x5'
      - series: 'blocksnap_rpo_seconds{{job="blocksnap",instance="h:9469",volume="vm1"}}'
        values: '3600x80'
      - series: 'blocksnap_rpo_breached{{job="blocksnap",instance="h:9469",volume="vm1"}}'
        values: '0x80'
      # a recovery point made at t=0 (seconds), so past the 1 h RPO from minute 60
      - series: 'blocksnap_recovery_point_timestamp_seconds{{job="blocksnap",instance="h:9469",volume="vm1"}}'
        values: '0x80'
      - series: 'blocksnap_pool_used_ratio{{job="blocksnap",instance="h:9469"}}'
        values: '0.5 0.95x30'
      - series: 'up{{job="blocksnap",instance="h:9469"}}'
        values: '1x80'
      - series: 'blocksnap_agent_heartbeat_timestamp_seconds{{job="blocksnap",instance="h:9469"}}'
        values: '0+60x10 600x70'
      - series: 'blocksnap_fleet_agent_stale{{job="node",instance="central:9100",repository="file:///srv/b",host="h2",pool="/srv/pool"}}'
        values: '0x5 1x20'
    alert_rule_test:
      - eval_time: 8m
        alertname: BlocksnapFleetAgentStale
        exp_alerts: []
      - eval_time: 12m
        alertname: BlocksnapFleetAgentStale
        exp_alerts:
          - exp_labels: {{severity: critical, job: node, instance: "central:9100", repository: "file:///srv/b",
                          host: h2, pool: /srv/pool}}
            exp_annotations:
              summary: "blocksnap agent of h2 (pool /srv/pool) is silent in repository file:///srv/b"
              description: "The heartbeat h2 writes into file:///srv/b is older than three intervals, or absent."
      - eval_time: 5m
        alertname: BlocksnapJobFailed
        exp_alerts:
          - exp_labels: {{severity: critical, job: blocksnap, instance: "h:9469", volume: vm1, repository: local,
                          exported_job: backup, result: failed}}
            exp_annotations:
              summary: "blocksnap backup of vm1 failed on h:9469"
              description: "A backup run of volume vm1 (repository 'local') failed and none has succeeded since. `blocksnap jobs --volume vm1` shows the error."
      - eval_time: 20m
        alertname: BlocksnapJobFailed
        exp_alerts: []
      - eval_time: 30m
        alertname: BlocksnapRPOBreached
        exp_alerts: []
      - eval_time: 70m
        alertname: BlocksnapRPOBreached
        exp_alerts:
          - exp_labels: {{severity: critical, job: blocksnap, instance: "h:9469", volume: vm1}}
            exp_annotations:
              summary: "blocksnap volume vm1 is past its RPO on h:9469"
              description: "The newest restorable copy of vm1 is older than its recovery point objective."
      - eval_time: 10m
        alertname: BlocksnapStorageHigh
        exp_alerts: []
      - eval_time: 20m
        alertname: BlocksnapStorageHigh
        exp_alerts:
          - exp_labels: {{severity: warning, job: blocksnap, instance: "h:9469"}}
            exp_annotations:
              summary: "blocksnap storage pool over 90 % on h:9469"
              description: "The pool uses 95% of its space."
      - eval_time: 10m
        alertname: BlocksnapAgentAbsent
        exp_alerts: []
      - eval_time: 30m
        alertname: BlocksnapAgentAbsent
        exp_alerts:
          - exp_labels: {{severity: critical, reason: heartbeat, job: blocksnap, instance: "h:9469"}}
            exp_annotations:
              summary: "blocksnap agent on h:9469 has not run for 20m 0s"
              description: "The agent's last loop is 20m 0s old: no snapshots or backups are being made."
"""  # noqa: E501 - promtool series and texts are one line each


@needs_promtool
def test_promtool_unit_tests_of_the_rules(tmp_path: Path):
    """The expressions, `for:` durations and texts, on synthetic series (promtool's
    own rule test runner: no timing involved)."""
    test = tmp_path / "rules_test.yml"
    test.write_text(UNIT.format(rules=RULES))
    out = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _firing(prom) -> dict[tuple[str, str], dict]:
    return {(a["labels"]["alertname"], a["labels"].get("volume", "")): a for a in prom.alerts()}


@pytest.mark.slow
def test_prometheus_fires_and_resolves_the_shipped_alerts(prometheus_for):
    state = {"bad": True}

    def report():
        r = healthy_report(time.time())       # Prometheus compares with its own clock
        if state["bad"]:
            fail_backup(r, "vm1")
            breach_rpo(r, "vm1")
        return r

    server = MetricsServer(MetricsConfig(listen="127.0.0.1:0"), report).start()
    try:
        prom = prometheus_for(f"127.0.0.1:{server.port}")
        rules = {r["name"] for g in prom.api("/api/v1/rules")["groups"] for r in g["rules"]}
        assert "BlocksnapJobFailed" in rules and "BlocksnapCorruptionFound" in rules

        firing = wait_for(lambda: (f := _firing(prom)) and {("BlocksnapJobFailed", "vm1"),
                                                            ("BlocksnapRPOBreached", "vm1")} <= set(f) and f,
                          "the job-failed and RPO alerts to fire")
        assert set(firing) == {("BlocksnapJobFailed", "vm1"), ("BlocksnapRPOBreached", "vm1")}
        failed = firing[("BlocksnapJobFailed", "vm1")]
        assert failed["labels"]["result"] == "failed" and failed["labels"]["repository"] == "local"
        assert failed["annotations"]["summary"] == f"blocksnap backup of vm1 failed on 127.0.0.1:{server.port}"

        state["bad"] = False                  # the retry succeeded, a fresh recovery point
        wait_for(lambda: not _firing(prom), "the alerts to resolve")

        server.stop()                         # the agent is gone: the scrape fails
        absent = wait_for(lambda: [a for a in prom.alerts() if a["labels"]["alertname"] == "BlocksnapAgentAbsent"],
                          "BlocksnapAgentAbsent")
        assert absent[0]["labels"]["reason"] == "scrape"
    finally:
        server.stop()
