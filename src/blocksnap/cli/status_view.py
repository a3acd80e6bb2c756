"""`blocksnap status` as text: a rich table on a terminal, plain columns when piped."""
from __future__ import annotations

import time

from ..operations.report import Report
from ..operations.timetext import format_duration
from ..units import format_size
from .context import table


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%m-%d %H:%M", time.localtime(t))


def volume_rows(rep: Report) -> list[dict[str, str]]:
    rows = []
    for v in rep.volumes:
        nxt = min(v.next_runs.items(), key=lambda kv: kv[1]) if v.next_runs else None
        failed = [j for j in v.jobs if j.last_result in ("failed", "interrupted")]
        copies = " ".join(f"{c.repository}:" + (format_duration(rep.time - c.snapshot_created)
                                                 if c.snapshot_created else "none") for c in v.copies) or "-"
        rows.append({
            "volume": v.volume,
            "newest snapshot": v.newest_snapshot or "-",
            "rpo": format_duration(v.rpo),
            "lag": format_duration(v.recovery_point_age) + (" BREACH" if v.rpo_breached else ""),
            "copies (age)": copies,
            "3-2-1": f"{v.copies_ok}/{v.media}/{v.offsite}" + (" ok" if v.rule_321_met else ""),
            "next": f"{nxt[0]} {_when(nxt[1])}" if nxt else "-",
            "drill": ("-" if v.drill.ok is None else ("ok" if v.drill.ok else "FAILED"))
                     + (f" rto {v.drill.rto_seconds:.0f}s" if v.drill.rto_seconds else ""),
            "rto hot/cold": "/".join(format_duration(v.rto_expected.get(k)) for k in ("hot", "cold")),
            "failed": ", ".join(f"{j.kind}{':' + j.target if j.target else ''}" for j in failed) or "-",
            "hydration": _hydration(v.hydration),
        })
    return rows


def _hydration(h: dict | None) -> str:
    if not h:
        return "-"
    if h.get("state") == "done" or h.get("finished"):
        return "done"
    pct = h.get("percent")
    return f"{h.get('state', 'hydrating')} {pct:.0f}%" if isinstance(pct, (int, float)) else str(h.get("state"))


def storage_rows(rep: Report) -> list[dict[str, str]]:
    rows = []
    if rep.pool:
        p = rep.pool
        rows.append({"store": "pool " + p.path, "used": format_size(p.used), "size": format_size(p.size),
                     "used %": f"{100 * p.used_ratio:.1f}", "days to full": _days(p.days_until_full),
                     "verified": "-"})
    for r in rep.repositories:
        rows.append({"store": f"{r.name} ({r.medium}{', off site' if r.offsite else ''})",
                     "used": format_size(r.bytes) if r.bytes is not None else ("unreachable" if not r.reachable
                                                                              else "-"),
                     "size": format_size(r.quota) if r.quota else "-",
                     "used %": f"{100 * r.used_ratio:.1f}" if r.used_ratio is not None else "-",
                     "days to full": _days(r.days_until_full),
                     "verified": f"{100 * r.verify_coverage:.0f}%" if r.verify_coverage is not None else "-"})
    return rows


def _days(d: float | None) -> str:
    return "-" if d is None else f"{d:.0f}"


def render(rep: Report, terminal: bool) -> None:
    vols, stores = volume_rows(rep), storage_rows(rep)
    notes = []
    if rep.agent_heartbeat is None:
        notes.append("no agent has run for this pool")
    elif rep.time - rep.agent_heartbeat > 300:
        notes.append(f"the agent's last sign of life was {format_duration(rep.time - rep.agent_heartbeat)} ago")
    if rep.policy_error:
        notes.append(rep.policy_error)
    if terminal:
        from rich.console import Console
        from rich.table import Table
        console = Console()
        for title, rows in (("volumes", vols), ("storage", stores)):
            if not rows:
                continue
            t = Table(title=title, title_justify="left")
            for col in rows[0]:
                t.add_column(col)
            for r in rows:
                style = "red" if "BREACH" in r.get("lag", "") or r.get("failed", "-") != "-" else None
                t.add_row(*r.values(), style=style)
            console.print(t)
        for n in notes:
            console.print(f"[yellow]note:[/] {n}")
        return
    for rows in (vols, stores):
        if rows:
            print(table(rows, list(rows[0])))
            print()
    for n in notes:
        print(f"note: {n}")
