"""Prometheus metrics, built from the status Report and nothing else.

Every scrape (and every textfile write) builds its families afresh from a Report,
so the numbers are what the job history and the pool say now: after an agent
restart a counter such as `blocksnap_job_failures_total` carries the history's
count, never a zero that a long-lived in-process counter would restart from.
docs/operations.md lists each metric.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import InvalidArgument
from .model import MetricsConfig
from .report import Report

log = logging.getLogger("blocksnap.metrics")

# The results a job's last run can have (report.JobStat.last_result); each is one
# series of blocksnap_job_last_result, 1 for the current one and 0 for the others.
RESULTS = ("ok", "failed", "interrupted", "stopped", "running")

JOB_LABELS = ["volume", "repository", "job"]


def split_run_key(key: str) -> tuple[str, str]:
    """A VolumeReport.next_runs key ('backup:local', 'snapshot') as (job kind, repository)."""
    kind, _, target = key.partition(":")
    return kind, target


class _Families:
    """The families of one collection, created on first use so that a metric with no
    sample at all (no repositories, no drills) is left out rather than shown empty."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def add(self, name: str, doc: str, labels: dict[str, str], value: float | None,
            counter: bool = False) -> None:
        if value is None:
            return
        family = self._by_name.get(name)
        if family is None:
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            family = cls(name, doc, labels=list(labels))
            self._by_name[name] = family
        family.add_metric(list(labels.values()), float(value))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(bool(value))


def _days(days: float | None) -> float | None:
    """Prometheus wants base units: the report's days as seconds."""
    return None if days is None else days * 86400.0


def _volume_metrics(f: _Families, report: Report) -> None:
    for v in report.volumes:
        vol = {"volume": v.volume}
        f.add("blocksnap_rpo_seconds", "Recovery point objective of the volume (policy).", vol, v.rpo)
        f.add("blocksnap_recovery_point_timestamp_seconds",
              "Creation time of the volume's newest restorable copy (snapshot time, not job end).",
              vol, v.recovery_point)
        f.add("blocksnap_recovery_point_age_seconds",
              "Age of the newest restorable copy at report time, from the snapshot's creation.",
              vol, v.recovery_point_age)
        f.add("blocksnap_rpo_breached", "1 when the recovery point is older than the RPO.",
              vol, _flag(v.rpo_breached) if v.rpo is not None else None)
        f.add("blocksnap_newest_snapshot_timestamp_seconds", "Creation time of the newest local snapshot.",
              vol, v.newest_snapshot_created)
        f.add("blocksnap_copies", "3-2-1: copies of the volume counted (the live data is one).", vol, v.copies_ok)
        f.add("blocksnap_copies_media", "3-2-1: distinct media among the copies.", vol, v.media)
        f.add("blocksnap_copies_offsite", "3-2-1: copies off site.", vol, v.offsite)
        f.add("blocksnap_rule_321_met", "1 when the volume has 3 copies on 2 media, 1 off site.",
              vol, _flag(v.rule_321_met))
        for c in v.copies:
            f.add("blocksnap_copy_recovery_point_timestamp_seconds",
                  "Creation time of the snapshot held by the newest backup in each repository.",
                  {"volume": v.volume, "repository": c.repository}, c.snapshot_created)
            f.add("blocksnap_copy_backups", "Backups of the volume a repository holds.",
                  {"volume": v.volume, "repository": c.repository}, c.backups)
        for key, due in sorted(v.next_runs.items()):
            kind, target = split_run_key(key)
            f.add("blocksnap_next_run_timestamp_seconds", "When the scheduler plans the job's next run.",
                  {"volume": v.volume, "repository": target, "job": kind}, due)
        d = v.drill
        f.add("blocksnap_last_drill_timestamp_seconds", "Time of the newest restore drill.", vol, d.time)
        f.add("blocksnap_last_drill_success_timestamp_seconds", "Time of the newest successful restore drill.",
              vol, d.last_success)
        f.add("blocksnap_drill_failed", "1 when the newest restore drill failed.", vol,
              None if d.ok is None else float(not d.ok))
        f.add("blocksnap_drill_rto_seconds", "Restore time the newest drill measured.", vol, d.rto_seconds)
        f.add("blocksnap_rto_seconds", "Recovery time objective of the volume (policy).", vol, v.rto_target)
        _job_metrics(f, v.jobs)


def _job_metrics(f: _Families, jobs) -> None:
    for j in jobs:
        lab = {"volume": j.volume, "repository": j.target, "job": j.kind}
        f.add("blocksnap_last_success_timestamp_seconds", "End of the job's newest successful run.",
              lab, j.last_success)
        f.add("blocksnap_job_last_start_timestamp_seconds", "Start of the job's newest run.", lab, j.last_start)
        f.add("blocksnap_job_last_end_timestamp_seconds", "End of the job's newest finished run.", lab, j.last_end)
        f.add("blocksnap_job_duration_seconds", "Duration of the job's newest finished run.", lab, j.last_duration)
        f.add("blocksnap_job_failures_total", "Failed or interrupted runs of the job in the history.",
              lab, j.failures_total, counter=True)
        f.add("blocksnap_job_runs_total", "Runs of the job in the history.", lab, j.runs_total, counter=True)
        if j.failing:
            f.add("blocksnap_job_failing", "1 while the job's newest failure is newer than its newest success "
                  "(a retry in progress does not clear it).",
                  {**lab, "result": j.last_result if j.last_result in ("failed", "interrupted")
                   else j.last_failure_result or "failed"}, 1.0)
        f.add("blocksnap_last_failure_timestamp_seconds", "End of the job's newest failed or interrupted run.",
              lab, j.last_failure)
        if j.last_result is not None:
            for result in RESULTS:
                f.add("blocksnap_job_last_result", "1 for the result of the job's newest run, 0 for the others.",
                      {**lab, "result": result}, float(j.last_result == result))


def _storage_metrics(f: _Families, report: Report) -> None:
    p = report.pool
    if p is not None:
        f.add("blocksnap_pool_used_ratio", "Share of the pool's space in use.", {}, p.used_ratio)
        f.add("blocksnap_pool_bytes", "Pool space by kind: used, size.", {"kind": "used"}, p.used)
        f.add("blocksnap_pool_bytes", "Pool space by kind: used, size.", {"kind": "size"}, p.size)
        f.add("blocksnap_pool_full_in_seconds", "Time until the pool is full at recent growth.", {},
              _days(p.days_until_full))
    for r in report.repositories:
        lab = {"repository": r.name}
        f.add("blocksnap_repository_up", "1 when the repository could be read for this report.", lab,
              _flag(r.reachable))
        f.add("blocksnap_repository_bytes", "Bytes stored in the repository (packs).", lab, r.bytes)
        f.add("blocksnap_repository_quota_bytes", "The repository's quota from the policy.", lab, r.quota)
        f.add("blocksnap_repository_used_ratio", "Share of the repository's quota in use.", lab, r.used_ratio)
        f.add("blocksnap_repository_full_in_seconds", "Time until the quota is reached at recent growth.", lab,
              _days(r.days_until_full))
        f.add("blocksnap_verify_coverage_ratio", "Share of stored bytes read back within the verify cycle.",
              lab, r.verify_coverage)
        f.add("blocksnap_verify_cycle_seconds", "The verify cycle from the policy.", lab, r.verify_cycle)
        f.add("blocksnap_corruption_found", "Problems verification found in the repository (0: none).",
              lab, len(r.corruption) if r.reachable or r.corruption else None)


class ReportCollector(Collector):
    """Yields the metrics of one Report, or of `source()` called at each collection."""

    def __init__(self, source: Report | Callable[[], Report]):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        report = self._source() if callable(self._source) else self._source
        f = _Families()
        f.add("blocksnap_report_timestamp_seconds", "When the figures below were computed.", {}, report.time)
        f.add("blocksnap_agent_heartbeat_timestamp_seconds", "The agent's last loop.", {}, report.agent_heartbeat)
        f.add("blocksnap_policy_error", "1 when a policy reload was refused and the old policy is in force.", {},
              float(report.policy_error is not None))
        f.add("blocksnap_storage_threshold_ratio", "Usage share past which storage alerts fire.", {},
              report.storage_threshold)
        _volume_metrics(f, report)
        _storage_metrics(f, report)
        yield from f


def build_registry(report: Report | Callable[[], Report]) -> CollectorRegistry:
    """A fresh registry holding only blocksnap's metrics for `report` (or a callable
    giving the Report to use at each collection, as the HTTP endpoint does)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(report))
    return registry


def render(report: Report) -> bytes:
    """The metrics of `report` in the Prometheus text format."""
    return generate_latest(build_registry(report))


def write_textfile(path: str, report: Report) -> None:
    """For node_exporter's textfile collector: written aside and renamed, so the
    collector reads the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_to_textfile(path, build_registry(report))


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' as (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics listen {listen!r}: expected host:port", param="listen")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """/metrics over HTTP in a daemon thread; each scrape asks `get_report()` anew.

    A scrape whose report cannot be made answers 500, so Prometheus records `up == 0`
    (BlocksnapAgentAbsent) rather than figures that are no longer true."""

    def __init__(self, config: MetricsConfig, get_report: Callable[[], Report]):
        self.config = config
        self._get_report = get_report
        self._httpd = None
        self._thread: threading.Thread | None = None

    def _report(self) -> Report:
        try:
            return self._get_report()
        except Exception:
            log.exception("metrics: the status report failed")
            raise

    @property
    def port(self) -> int:
        """The bound port (the real one when the config asked for port 0)."""
        if self._httpd is None:
            raise RuntimeError("metrics server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0] if self._httpd else ""
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Listen on config.listen (nothing when it is None); OSError if it cannot bind."""
        if self._httpd is not None or not self.config.listen:
            return self
        host, port = parse_listen(self.config.listen)      # a malformed one: InvalidArgument
        # A port in use raises OSError, which the agent logs and carries on without.
        self._httpd, self._thread = start_http_server(port, addr=host, registry=build_registry(self._report))
        log.info("metrics: serving %s", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
