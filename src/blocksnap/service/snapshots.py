"""Snapshot creation with the consistency hooks wrapped around it.

The hooks run in this (the caller's) process; only the snapshot itself goes to the
pool, so the freeze window holds nothing but one metadata commit.
"""
from __future__ import annotations

from typing import Any

from ..settings import Settings
from ..units import split_snapshot_ref
from .runner import session


def create_snapshot(pool_path: str, ref: str, labels: dict[str, str], *, fs=(), pg=(),
                    pg_mode: str = "default", mysql=(), pre=(), post=(),
                    timeout: float = 10.0, shell: bool = False,
                    settings: Settings | None = None) -> dict[str, Any]:
    vol, name = split_snapshot_ref(ref)
    with session(pool_path, preopen=True) as s:
        if not (fs or pg or mysql or pre or post):
            return s.call("snapshot_create", ref=ref, labels=labels)
        from ..hooks import FreezePlan, run_frozen
        plan = FreezePlan(fs=list(fs), pg=list(pg), pg_mode=pg_mode, mysql=list(mysql),
                          pre=list(pre), post=list(post), timeout=timeout, volume=vol,
                          snapshot=name, shell=shell)
        record = run_frozen(plan, lambda: s.call("snapshot_create", ref=ref, labels=labels)["name"],
                            settings=settings)
        return s.call("snapshot_set_metadata", ref=ref, consistency=record["consistency"],
                      hooks=record)
