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
from .dsn import parse_mysql, parse_pg
from .plan import DEFAULT_TIMEOUT, MAX_TIMEOUT, FreezePlan, HookError
from .runner import current_deadline, run_frozen
from .state import recover_stale_freezes

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
