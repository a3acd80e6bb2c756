"""Consistency hooks: freeze filesystems and quiesce databases around a snapshot.

    from blocksnap.hooks import FreezePlan, run_frozen, HookError
    plan = FreezePlan(fs=["/mnt/data"], pg=["host=/run/postgresql dbname=app"],
                      mysql=["mysql://root@localhost/"], pre=["/usr/local/bin/pre"],
                      timeout=10.0, volume="vm1", snapshot="s1")
    record = run_frozen(plan, lambda: take_snapshot())

Order (fixed): pre hooks -> database quiesce -> filesystem freeze -> action -> thaw ->
database release -> post hooks (reverse order). On failure before the action
everything done so far is undone in reverse, the post hooks run as abort hooks, and
HookError is raised. See docs/hooks.md.

Independent of the block engine: this package only needs the standard library,
psycopg and PyMySQL, and blocksnap.errors.
"""
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): every command checks for stale freezes at its
# start (hooks.state), and should not pay for the DSN parsers and the runner.
_WHERE = {
    "parse_mysql": "dsn", "parse_pg": "dsn",
    "DEFAULT_TIMEOUT": "plan", "MAX_TIMEOUT": "plan", "FreezePlan": "plan", "HookError": "plan",
    "current_deadline": "runner", "run_frozen": "runner", "recover_stale_freezes": "state",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
    "FreezePlan",
    "HookError",
    "current_deadline",
    "parse_mysql",
    "parse_pg",
    "recover_stale_freezes",
    "run_frozen",
]
