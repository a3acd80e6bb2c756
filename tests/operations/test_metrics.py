"""Metrics from a Report: scraped over HTTP from MetricsServer and parsed with
prometheus_client's own parser, and written as a node_exporter textfile."""
from __future__ import annotations

import errno
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blocksnap.errors import InvalidArgument
from blocksnap.operations.metrics import MetricsServer, build_registry, render, write_textfile
from blocksnap.operations.model import MetricsConfig

from .conftest import NOW, breach_rpo, fail_backup, healthy_report, vol

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} and the family types, from the text format."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def types(text: str) -> dict[str, str]:
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(server: MetricsServer) -> tuple[str, str]:
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def test_scraped_metrics_say_what_the_report_says():
    report = healthy_report()
    failed = fail_backup(report, "vm1")
    failed.failures_total = 7                 # from the history: not a counter reset at start
    breach_rpo(report, "vm1")
    with MetricsServer(MetricsConfig(listen="127.0.0.1:0"), lambda: report) as server:
        assert server.port > 0
        text, ctype = scrape(server)
    assert ctype.startswith("text/plain")
    s = parse(text)
    t = types(text)

    local = {"volume": "vm1", "repository": "", "job": "snapshot"}
    assert value(s, "blocksnap_last_success_timestamp_seconds", **local) == NOW - 300
    assert value(s, "blocksnap_last_success_timestamp_seconds", volume="db", repository="local",
                 job="backup") == NOW - 1800
    assert value(s, "blocksnap_job_duration_seconds", volume="db", repository="cloud", job="copy") == 100.0
    backup = {"volume": "vm1", "repository": "local", "job": "backup"}
    assert value(s, "blocksnap_job_failures_total", **backup) == 7
    assert t["blocksnap_job_failures"] == "counter"
    assert value(s, "blocksnap_job_runs_total", **backup) == 21
    assert value(s, "blocksnap_job_last_result", **backup, result="failed") == 1
    assert value(s, "blocksnap_job_last_result", **backup, result="ok") == 0
    assert value(s, "blocksnap_job_last_result", volume="db", repository="local", job="backup", result="ok") == 1

    assert value(s, "blocksnap_rpo_seconds", volume="vm1") == 3600
    # measured from the snapshot's creation, not from when the backup ended
    assert value(s, "blocksnap_recovery_point_age_seconds", volume="vm1") == 3 * 3600
    assert value(s, "blocksnap_recovery_point_timestamp_seconds", volume="vm1") == NOW - 3 * 3600
    assert value(s, "blocksnap_rpo_breached", volume="vm1") == 1
    assert value(s, "blocksnap_rpo_breached", volume="db") == 0
    assert value(s, "blocksnap_copies", volume="db") == 3
    assert value(s, "blocksnap_copies_media", volume="db") == 2
    assert value(s, "blocksnap_copies_offsite", volume="db") == 1
    assert value(s, "blocksnap_copy_recovery_point_timestamp_seconds", volume="db", repository="cloud") == NOW - 3800
    assert value(s, "blocksnap_next_run_timestamp_seconds", volume="db", repository="local", job="backup") == NOW + 1800
    assert value(s, "blocksnap_next_run_timestamp_seconds", volume="db", repository="", job="snapshot") == NOW + 600
    assert value(s, "blocksnap_last_drill_success_timestamp_seconds", volume="vm1") == NOW - 86400
    assert value(s, "blocksnap_drill_rto_seconds", volume="vm1") == 42
    assert value(s, "blocksnap_drill_failed", volume="vm1") == 0

    assert value(s, "blocksnap_pool_used_ratio") == 0.4
    assert value(s, "blocksnap_pool_bytes", kind="used") == 40 << 30
    assert value(s, "blocksnap_pool_bytes", kind="size") == 100 << 30
    assert value(s, "blocksnap_pool_full_in_seconds") == 120 * 86400       # base units: the report's days
    assert value(s, "blocksnap_repository_full_in_seconds", repository="cloud") == 300 * 86400
    assert value(s, "blocksnap_repository_bytes", repository="cloud") == 8 << 30
    assert value(s, "blocksnap_repository_used_ratio", repository="cloud") == 0.08
    assert ("blocksnap_repository_used_ratio", frozenset({("repository", "local")})) not in s   # no quota
    assert value(s, "blocksnap_verify_coverage_ratio", repository="cloud") == 0.97
    assert value(s, "blocksnap_corruption_found", repository="cloud") == 0
    assert value(s, "blocksnap_repository_up", repository="local") == 1
    assert value(s, "blocksnap_agent_heartbeat_timestamp_seconds") == NOW - 2
    assert value(s, "blocksnap_policy_error") == 0


def test_each_scrape_reads_the_report_anew():
    reports = [healthy_report()]
    with MetricsServer(MetricsConfig(listen="127.0.0.1:0"), lambda: reports[-1]) as server:
        first = parse(scrape(server)[0])
        changed = healthy_report(NOW + 60)
        changed.policy_error = "policy.toml:3: unknown key 'evry'"
        vol(changed, "db").drill.ok = False
        changed.repositories[1].corruption = ["pack 1f3a: chunk 9c0e checksum mismatch"]
        reports.append(changed)
        second = parse(scrape(server)[0])
    assert value(first, "blocksnap_policy_error") == 0
    assert value(second, "blocksnap_policy_error") == 1
    assert value(second, "blocksnap_drill_failed", volume="db") == 1
    assert value(second, "blocksnap_corruption_found", repository="cloud") == 1
    assert value(second, "blocksnap_report_timestamp_seconds") == NOW + 60


def test_a_failing_report_answers_500_not_stale_figures():
    def broken():
        raise RuntimeError("catalog unreadable")

    with MetricsServer(MetricsConfig(listen="127.0.0.1:0"), broken) as server:
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(server)
    assert e.value.code == 500


def test_unknown_values_are_left_out_not_zero():
    report = healthy_report()
    report.agent_heartbeat = None
    report.pool = None
    v = vol(report, "vm1")
    v.rpo = None
    v.recovery_point = v.recovery_point_age = None
    v.drill.ok = v.drill.time = v.drill.last_success = v.drill.rto_seconds = None
    v.jobs[0].last_success = None
    names = {name for name, _ in parse(render(report).decode())}
    s = parse(render(report).decode())
    assert "blocksnap_agent_heartbeat_timestamp_seconds" not in names
    assert "blocksnap_pool_used_ratio" not in names
    assert ("blocksnap_rpo_seconds", frozenset({("volume", "vm1")})) not in s
    assert ("blocksnap_rpo_breached", frozenset({("volume", "vm1")})) not in s
    assert ("blocksnap_recovery_point_age_seconds", frozenset({("volume", "vm1")})) not in s
    assert ("blocksnap_drill_failed", frozenset({("volume", "vm1")})) not in s
    assert ("blocksnap_last_success_timestamp_seconds",
            frozenset({("volume", "vm1"), ("repository", ""), ("job", "snapshot")})) not in s
    assert value(s, "blocksnap_rpo_seconds", volume="db") == 3600


def test_textfile_is_replaced_whole(tmp_path: Path):
    path = tmp_path / "textfile" / "blocksnap.prom"
    write_textfile(str(path), healthy_report())
    inode = os.stat(path).st_ino
    report = healthy_report(NOW + 5)
    fail_backup(report, "db")
    write_textfile(str(path), report)
    assert os.stat(path).st_ino != inode          # renamed into place, not rewritten in place
    assert os.listdir(path.parent) == ["blocksnap.prom"]
    s = parse(path.read_text())
    assert value(s, "blocksnap_job_last_result", volume="db", repository="local", job="backup", result="failed") == 1
    assert value(s, "blocksnap_report_timestamp_seconds") == NOW + 5


def test_names_follow_conventions_and_are_documented():
    report = healthy_report()
    fail_backup(report)
    text = render(report).decode()
    docs = DOCS.read_text()
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert re.fullmatch(r"blocksnap_[a-z0-9_]+", name)
        if fam.type == "counter":
            assert name.endswith("_total")
        if "timestamp" in name or name.endswith("_age_seconds"):
            assert name.endswith("_seconds")
        assert f"`{name}`" in docs, f"{name} is not in docs/operations.md"


def test_registry_is_fresh_each_time():
    a, b = build_registry(healthy_report()), build_registry(healthy_report(NOW + 1))
    assert a is not b
    assert a.get_sample_value("blocksnap_report_timestamp_seconds") == NOW
    assert b.get_sample_value("blocksnap_report_timestamp_seconds") == NOW + 1


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "host:port"])
def test_bad_listen_is_one_error(listen):
    with pytest.raises(InvalidArgument, match="metrics listen"):
        MetricsServer(MetricsConfig(listen=listen), healthy_report).start()


def test_port_in_use_raises_oserror_for_the_agent_to_log():
    with MetricsServer(MetricsConfig(listen="127.0.0.1:0"), healthy_report) as first:
        second = MetricsServer(MetricsConfig(listen=f"127.0.0.1:{first.port}"), healthy_report)
        with pytest.raises(OSError) as e:
            second.start()
        assert e.value.errno == errno.EADDRINUSE
        assert first.url == f"http://127.0.0.1:{first.port}/metrics"


def test_no_listen_serves_nothing():
    server = MetricsServer(MetricsConfig(listen=None), healthy_report).start()
    with pytest.raises(RuntimeError):
        _ = server.port
    server.stop()


def test_a_failing_job_stays_failing_through_its_retry():
    from prometheus_client import generate_latest
    report = healthy_report()
    j = fail_backup(report, "vm1")
    j.last_failure, j.last_failure_result = j.last_end, "failed"
    key = ("blocksnap_job_failing", frozenset({"volume": "vm1", "repository": "local", "job": "backup",
                                               "result": "failed"}.items()))
    assert parse(generate_latest(build_registry(report)).decode())[key] == 1
    j.last_result, j.last_start, j.last_end = "running", report.time - 5, None     # the retry, in progress
    assert parse(generate_latest(build_registry(report)).decode())[key] == 1
    j.last_result, j.last_end, j.last_success = "ok", report.time, report.time    # it succeeded
    assert key not in parse(generate_latest(build_registry(report)).decode())
