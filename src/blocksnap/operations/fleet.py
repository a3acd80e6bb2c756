"""What one repository says of every host and pool backing up into it.

Each agent writes a heartbeat into every repository of its policy
(`agents/<host>-<pool hash>`, sealed like a manifest): who it is, when it last
looked, and each volume's RPO. `status --repo` reads those and the manifests, so a
central machine, or a second host, sees every recovery point in the repository
and notices a host whose agent has stopped (no heartbeat for 3 intervals) or
whose volumes are past their RPO - without the pools being reachable.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from typing import Any

from ..errors import BlocksnapError
from .timetext import format_duration

PREFIX = "agents"
STALE_AFTER = 3          # heartbeat intervals


def heartbeat_key(host: str, pool: str) -> str:
    return f"{PREFIX}/{host}-{hashlib.sha256(pool.encode()).hexdigest()[:12]}"


def write_heartbeat(repo, host: str, pool: str, now: float, interval: float,
                    volumes: dict[str, dict[str, Any]]) -> None:
    key = heartbeat_key(host, pool)
    body = json.dumps({"host": host, "pool": pool, "time": now, "interval": interval, "volumes": volumes}).encode()
    repo.backend.put(key, repo.keys.seal(body, key.encode()))


def read_heartbeats(repo) -> list[dict[str, Any]]:
    out = []
    for key in repo.backend.list(PREFIX):
        try:
            out.append(json.loads(repo.keys.open(repo.backend.get(key), key.encode(), f"{repo.url}: {key}")))
        except (BlocksnapError, ValueError):
            continue       # one damaged heartbeat must not hide the others
    return out


def fleet_report(repo, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for m in repo.manifests():
        groups[(m.info.get("host", ""), m.info.get("pool", ""))][m.volume].append(m.info)
    beats = {(b["host"], b["pool"]): b for b in read_heartbeats(repo)}
    hosts = []
    for hp in sorted(set(groups) | set(beats)):
        beat = beats.get(hp)
        vols = []
        names = set(groups.get(hp, {})) | set((beat or {}).get("volumes", {}))
        for name in sorted(names):
            infos = groups.get(hp, {}).get(name, [])
            newest = max(infos, key=lambda i: i["source"]["created"]) if infos else None
            rpo = (beat or {}).get("volumes", {}).get(name, {}).get("rpo")
            point = newest["source"]["created"] if newest else None
            age = now - point if point else None
            vols.append({"volume": name, "backups": len(infos), "newest_backup": newest["id"] if newest else None,
                         "recovery_point": point, "age": age, "rpo": rpo,
                         "rpo_breached": bool(rpo) and (age is None or age > rpo)})
        stale = beat is None or now - beat["time"] > STALE_AFTER * beat.get("interval", 300)
        hosts.append({"host": hp[0], "pool": hp[1], "heartbeat": beat["time"] if beat else None, "stale": stale,
                      "rpo_breached": any(v["rpo_breached"] for v in vols), "volumes": vols})
    return {"repository": repo.url, "time": now, "hosts": hosts}


def fleet_text(rep: dict[str, Any]) -> str:
    lines = [f"repository {rep['repository']}"]
    for h in rep["hosts"]:
        beat = "no agent heartbeat" if h["heartbeat"] is None else \
            f"agent seen {format_duration(rep['time'] - h['heartbeat'])} ago"
        lines.append(f"{h['host']}:{h['pool']}  {beat}{'  STALE' if h['stale'] else ''}")
        for v in h["volumes"]:
            lines.append(f"  {v['volume']:20} {v['backups']:4} backups  newest {v['newest_backup'] or '-':24} "
                         f"age {format_duration(v['age'])}  rpo {format_duration(v['rpo'])}"
                         + ("  BREACH" if v["rpo_breached"] else ""))
    return "\n".join(lines)
