"""`status --repo URL --textfile FILE`: the fleet's figures as Prometheus metrics.

On a central machine (or a second host), a cron job writes what one repository
says of every host and pool backing up into it as a textfile for node_exporter's
collector, so the same Prometheus that scrapes the agents notices a host whose
agent died (its heartbeat ages, no scrape needed from that host) or whose
recovery points fall behind. Names are those of the agent's metrics with
`blocksnap_fleet_` in front and the host and pool as labels.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile


def fleet_registry(rep: dict[str, Any]) -> CollectorRegistry:
    reg = CollectorRegistry()
    labels = ["repository", "host", "pool"]
    beat = Gauge("blocksnap_fleet_agent_heartbeat_timestamp_seconds",
                 "When the host's agent last wrote its heartbeat into the repository", labels, registry=reg)
    stale = Gauge("blocksnap_fleet_agent_stale", "1 when the host's heartbeat is older than 3 intervals (or absent)",
                  labels, registry=reg)
    age = Gauge("blocksnap_fleet_recovery_point_age_seconds",
                "Age of the newest backup's snapshot of a volume in this repository", labels + ["volume"],
                registry=reg)
    rpo = Gauge("blocksnap_fleet_rpo_seconds", "The volume's RPO, as its agent reported it", labels + ["volume"],
                registry=reg)
    breached = Gauge("blocksnap_fleet_rpo_breached", "1 when the volume's newest backup is older than its RPO",
                     labels + ["volume"], registry=reg)
    backups = Gauge("blocksnap_fleet_backups", "Backups of the volume in this repository", labels + ["volume"],
                    registry=reg)
    for h in rep["hosts"]:
        base = [rep["repository"], h["host"], h["pool"]]
        if h["heartbeat"] is not None:
            beat.labels(*base).set(h["heartbeat"])
        stale.labels(*base).set(1 if h["stale"] else 0)
        for v in h["volumes"]:
            lab = base + [v["volume"]]
            backups.labels(*lab).set(v["backups"])
            breached.labels(*lab).set(1 if v["rpo_breached"] else 0)
            if v["age"] is not None:
                age.labels(*lab).set(v["age"])
            if v["rpo"] is not None:
                rpo.labels(*lab).set(v["rpo"])
    return reg


def write_fleet_textfile(path: str, rep: dict[str, Any]) -> None:
    """Atomically (prometheus_client writes a temporary file and renames it)."""
    write_to_textfile(path, fleet_registry(rep))
