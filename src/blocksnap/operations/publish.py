"""What the agent tells after each look: metrics, alerts, its state, heartbeats, growth.

Everything here reads the one Report the agent built (status.py), so the metrics
endpoint, the textfile, the alerts and `status` never disagree. A failure to
tell (a dead webhook, a full textfile directory, an unreachable repository) is
logged and retried next time; it never stops the agent's jobs.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..errors import BlocksnapError
from . import usage
from .fleet import write_heartbeat
from .report import Report
from .schedule import Due
from .status import write_agent_state

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("blocksnap.agent")
HEARTBEAT_RETRY = 60.0       # seconds before a failed heartbeat is written again


class Publisher:
    def __init__(self, agent: Agent):
        from .agent import state_dir
        self.dir = state_dir(agent.pool)
        self.server = None
        self.listen: str | None = None
        self.alerts = None
        self.alerts_config = None
        self.usage_path = os.path.join(self.dir, "usage.json")
        self.usage = usage.load(self.usage_path)
        self.beats: dict[str, float] = {}     # repository -> when its heartbeat was last written
        self._configure(agent)

    def _configure(self, agent: Agent) -> None:
        """(Re)start what depends on the policy: the metrics listener, the alert channels."""
        from .metrics import MetricsServer
        m = agent.policy.metrics
        if m.listen != self.listen:
            if self.server:
                self.server.stop()
                self.server = None
            self.listen = m.listen
            if m.listen and not agent.once:      # --once exits at once: nothing would scrape it
                try:
                    self.server = MetricsServer(m, lambda: agent.report).start()
                except OSError as e:
                    log.error("metrics: cannot listen on %s: %s", m.listen, e.strerror)
                except BlocksnapError as e:      # (policy check refuses a bad listen first)
                    log.error("metrics: %s", e)
        if agent.policy.alerts is not self.alerts_config:
            from .alerts import AlertManager
            self.alerts_config = agent.policy.alerts
            if self.alerts is None:
                self.alerts = AlertManager(self.alerts_config, os.path.join(self.dir, "alerts.json"),
                                           agent.report_host)
            else:
                self.alerts.configure(self.alerts_config)

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server else None

    def publish(self, agent: Agent, report: Report, now: float) -> None:
        self._configure(agent)
        write_agent_state(self.dir, now, agent.policy_error, os.getpid())
        if agent.policy.metrics.textfile:
            from .metrics import write_textfile
            try:
                write_textfile(agent.policy.metrics.textfile, report)
            except OSError as e:
                log.error("metrics textfile %s: %s", agent.policy.metrics.textfile, e.strerror)
        self._alerts(report, now)
        self._usage(report, now)
        self._heartbeats(agent, report, now)

    def _alerts(self, report: Report, now: float) -> None:
        if self.alerts is None:
            return
        try:
            self.alerts.check(report, now)
        except (OSError, BlocksnapError) as e:
            log.error("alerts: %s", e)

    def _usage(self, report: Report, now: float) -> None:
        changed = False
        if report.pool:
            changed |= usage.add(self.usage, "pool", now, report.pool.used)
        for r in report.repositories:
            if r.bytes is not None:
                changed |= usage.add(self.usage, "repo:" + r.name, now, r.bytes)
        if changed:
            try:
                usage.save(self.usage_path, self.usage)
            except OSError as e:
                log.error("usage samples: %s", e.strerror)

    def _heartbeats(self, agent: Agent, report: Report, now: float) -> None:
        from .jobs import open_repository
        vols = {v.volume: {"rpo": v.rpo, "recovery_point": v.recovery_point} for v in report.volumes}
        for repo in agent.policy.repositories.values():
            if now - self.beats.get(repo.name, -1e18) < agent.heartbeat_every:
                continue
            try:
                write_heartbeat(open_repository(repo), report.host, os.path.abspath(agent.pool), now,
                                agent.heartbeat_every, vols)
                self.beats[repo.name] = now
            except BlocksnapError as e:            # tried again in a minute (the alerts say it is unreachable)
                self.beats[repo.name] = now - agent.heartbeat_every + HEARTBEAT_RETRY
                log.info("heartbeat to %s: %s", repo.name, e)

    def repository_changed(self, name: str) -> None:
        """A job wrote there (perhaps made it): its heartbeat goes at the next look."""
        self.beats.pop(name, None)

    def ping(self, agent: Agent, d: Due, event: str, message: str = "") -> None:
        if not agent.policy.alerts.ping:
            return
        from .channels import ping
        ping(agent.policy.alerts, d.kind, d.volume or d.target, event, message)

    def close(self) -> None:
        if self.server:
            self.server.stop()
