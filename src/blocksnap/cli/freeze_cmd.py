"""`blocksnap freeze ... -- COMMAND`: quiesce, run COMMAND (the snapshot taken elsewhere:
LVM, a cloud API, a storage array), thaw. Needs no pool."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import click

from ..errors import InvalidArgument
from ..hooks import (
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    FreezePlan,
    HookError,
    current_deadline,
    recover_stale_freezes,
    run_frozen,
)
from .context import EnvSettings, Settings, emit, json_option

TIMEOUT_EXIT = 124  # like timeout(1)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run_command(command: list[str]) -> dict:
    """The action: run COMMAND, kill it at the freeze deadline."""
    deadline = current_deadline()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(command)
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return {"command": command, "exit_code": code, "timed_out": False,
                "error": f"cannot run {command[0]}: {e.strerror}", "ms": 0.0}
    timed_out = False
    try:
        left = None if deadline is None else max(0.0, deadline - time.time())
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (signal): do not leave it running while we thaw
            try:
                proc.send_signal(signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
    out = {"command": command, "exit_code": TIMEOUT_EXIT if timed_out else _exit_status(proc.returncode),
           "timed_out": timed_out, "ms": round((time.monotonic() - t0) * 1000, 3)}
    if timed_out:
        out["error"] = "killed at the freeze deadline"
    return out


def _summary(record: dict) -> str:
    hooks = record.get("hooks", [])
    n_fs = sum(1 for h in hooks if h.get("kind") == "fs")
    n_db = sum(1 for h in hooks if h.get("kind") in ("pg", "mysql"))
    result = record.get("result") or {}
    parts = [f"consistency {record.get('consistency')}",
             f"freeze {record.get('freeze_ms', 0):.1f} ms",
             f"{n_fs} filesystem{'s' if n_fs != 1 else ''}",
             f"{n_db} database{'s' if n_db != 1 else ''}"]
    if "exit_code" in result:
        killed = " (killed at the deadline)" if result.get("timed_out") else ""
        parts.append(f"command exit {result['exit_code']}{killed}")
    lines = ["freeze: " + ", ".join(parts)]
    for h in hooks:
        if h.get("kind") in ("pg", "mysql"):
            keys = [k for k in ("wal_lsn", "checkpoint_lsn", "backup_start_lsn", "backup_stop_lsn",
                                "binlog_file", "binlog_position", "gtid_executed", "gtid_binlog_pos")
                    if h.get(k) not in (None, "")]
            detail = " ".join(f"{k}={h[k]}" for k in keys)
            lines.append(f"  {h['kind']} {h.get('target')}: {h.get('status')}" + (f" {detail}" if detail else ""))
    for err in record.get("errors", []):
        lines.append(f"warning: {err}")
    return "\n".join(lines)


@click.command("freeze", context_settings={"allow_interspersed_args": False})
@click.option("--fs", "fs", multiple=True, metavar="MOUNTPOINT", help="Filesystem to freeze (FIFREEZE); repeatable.")
@click.option("--pg", multiple=True, metavar="DSN", help="PostgreSQL libpq string or URI; repeatable.")
@click.option("--pg-mode", type=click.Choice(["default", "backup"]), default="default", show_default=True,
              help="default: CHECKPOINT; backup: pg_backup_start/pg_backup_stop.")
@click.option("--mysql", multiple=True, metavar="DSN",
              help="mysql://user[:password]@host[:port]/ or mysql://user@localhost/?unix_socket=PATH; repeatable.")
@click.option("--pre", multiple=True, metavar="CMD", help="Command run before quiescing; repeatable.")
@click.option("--post", multiple=True, metavar="CMD", help="Command run after release (reverse order); repeatable.")
@click.option("--shell", is_flag=True, help="Run --pre/--post through /bin/sh -c.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT), default=DEFAULT_TIMEOUT,
              show_default=True, metavar="S", help=f"Freeze timeout in seconds (at most {MAX_TIMEOUT:g}).")
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def freeze(ctx: click.Context, fs, pg, pg_mode, mysql, pre, post, shell, timeout, as_json, command) -> None:
    """Quiesce databases and freeze filesystems, run COMMAND, thaw.

    Exits with COMMAND's exit status, 124 if COMMAND was killed at the timeout.
    Example: blocksnap freeze --fs /srv --pg 'host=/run/postgresql' -- lvcreate -s -n snap vg/srv
    """
    settings = ctx.find_object(Settings)
    if settings is None:   # `freeze` run alone (tests/hooks/freeze_cli.py), without the group
        env = EnvSettings.from_env()
        settings = Settings(pool=env.pool, env=env)
    for r in recover_stale_freezes(settings.env):
        if r.get("status") == "thawed":
            click.echo(f"warning: thawed {r['path']}, left frozen by blocksnap pid {r.get('pid')}", err=True)
    command = list(command)
    # check COMMAND before freezing anything
    if os.sep in command[0]:
        if not (os.path.isfile(command[0]) and os.access(command[0], os.X_OK)):
            raise InvalidArgument(f"command not found or not executable: {command[0]}")
    elif shutil.which(command[0]) is None:
        raise InvalidArgument(f"command not found: {command[0]}")
    plan = FreezePlan(fs=list(fs), pg=list(pg), pg_mode=pg_mode, mysql=list(mysql), pre=list(pre),
                      post=list(post), timeout=timeout, shell=shell)
    try:
        record = run_frozen(plan, lambda: _run_command(command),
                            succeeded=lambda r: r.get("exit_code") == 0, settings=settings.env)
    except HookError as e:
        if as_json and e.record is not None:
            emit(e.record, True)
        raise
    result = record.get("result") or {}
    if as_json:
        emit(record, True)
    elif not settings.quiet or record.get("errors"):
        click.echo(_summary(record), err=True)
    if result.get("error") and not result.get("timed_out"):
        click.echo(f"error: {result['error']}", err=True)
    # sys.exit, not ctx.exit: with standalone_mode=False click turns ctx.exit into a
    # return value, which the runner does not pass on.
    sys.exit(int(result.get("exit_code", 1)))


COMMANDS = [freeze]
