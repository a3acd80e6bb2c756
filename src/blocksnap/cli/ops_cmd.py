"""`blocksnap policy check|agent|status|jobs`: the policy, carried out and reported."""
from __future__ import annotations

import sys
import time

import click

from ..errors import InvalidArgument
from ..service.runner import call
from ..settings import POLICY_ENV
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings, table

DEFAULT_POLICY = "/etc/blocksnap/policy.toml"

# status --check: the most serious condition found decides the exit status
CHECK_OK, CHECK_WARNING, CHECK_RPO, CHECK_FAILED, CHECK_CAPACITY = 0, 10, 11, 12, 13


def policy_option(required: bool):
    return click.option("--policy", "policy_path", envvar=POLICY_ENV, required=required,
                        default=None if required else None, type=click.Path(dir_okay=False), metavar="FILE",
                        help=f"The policy file (env {POLICY_ENV}; status also looks at {DEFAULT_POLICY}).")


def _load_policy(path: str):
    from ..operations.policy import PolicyError, load
    try:
        return load(path)
    except PolicyError as e:
        for extra in e.problems[1:]:
            click.echo(f"also: {extra}")   # stdout: the one error line stays the first problem
        raise InvalidArgument(e.problems[0]) from None


@click.group("policy")
def policy() -> None:
    """Check a policy file."""


@policy.command("check")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@json_option
@pass_settings
def policy_check(settings: Settings, path: str, as_json: bool) -> None:
    """Validate a policy: every problem as file:line: what is wrong."""
    p = _load_policy(path)
    summary = {"policy": p.path, "repositories": sorted(p.repositories), "volume_rules": len(p.volumes),
               "ok": True}
    emit(summary, as_json, None if settings.quiet else
         f"{path}: ok ({len(p.repositories)} repositories, {len(p.volumes)} volume rules)")


@click.command("agent")
@policy_option(required=True)
@click.option("--once", is_flag=True, help="Run what is due now, then exit (for cron).")
@pass_settings
def agent(settings: Settings, policy_path: str, once: bool) -> None:
    """Carry the policy out: snapshots, backups, copies, verification, drills, alerts, metrics."""
    import logging

    from ..operations.agent import Agent
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if settings.quiet else logging.INFO,
                            format="blocksnap agent: %(message)s", stream=sys.stderr)
    a = Agent(settings.pool, policy_path, settings.env, once=once)
    a.run()


def _policy_or_none(path: str | None):
    import os
    if path is None and os.path.exists(DEFAULT_POLICY):
        path = DEFAULT_POLICY
    return _load_policy(path) if path else None


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _age(seconds: float | None) -> str:
    from ..operations.timetext import format_duration
    return format_duration(seconds)


def check_status(report, policy) -> tuple[int, str]:
    """The exit status of `status --check` and its one line."""
    from ..operations.alerts import conditions
    from ..operations.model import AlertsConfig
    found = conditions(report, policy.alerts if policy else AlertsConfig(), report.time)
    order = [("rpo_breached", CHECK_RPO), ("job_failed", CHECK_FAILED), ("storage", CHECK_CAPACITY)]
    for prefix, code in order:
        hits = [c for k, c in found.items() if k.startswith(prefix)]
        if hits:
            return code, f"{prefix.upper().replace('_', ' ')}: " + "; ".join(c.summary for c in hits[:3])
    if found:
        return CHECK_WARNING, "WARNING: " + "; ".join(c.summary for c in list(found.values())[:3])
    return CHECK_OK, "OK: every volume within its RPO, no failed job, storage below the threshold"


@click.command("status")
@policy_option(required=False)
@click.option("--repo", "repo_url", metavar="URL", help="Report from this repository alone (every host and pool).")
@click.option("--endpoint", metavar="URL", help="S3 endpoint, with --repo.")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Repository password, with --repo.")
@click.option("--textfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --repo: also write the fleet's figures as Prometheus metrics (node_exporter textfile).")
@click.option("--check", "check", is_flag=True,
              help=f"Exit {CHECK_OK} ok, {CHECK_WARNING} warning, {CHECK_RPO} RPO breached, {CHECK_FAILED} job "
                   f"failed, {CHECK_CAPACITY} storage over the threshold (Nagios-style monitors).")
@json_option
@pass_settings
def status(settings: Settings, policy_path: str | None, repo_url: str | None, endpoint: str | None,
           password_file: str | None, textfile: str | None, check: bool, as_json: bool) -> None:
    """Per volume: recovery point and RPO, copies (3-2-1), next runs, drills; storage."""
    if textfile and not repo_url:
        raise InvalidArgument("--textfile goes with --repo (the agent writes its own: [metrics] textfile)")
    if repo_url:
        from ..operations.fleet import fleet_report, fleet_text
        from .backup_cmd import _open
        repo, _ = _open(settings, repo_url, endpoint, password_file)
        rep = fleet_report(repo)
        if textfile:
            from ..operations.fleet_metrics import write_fleet_textfile
            try:
                write_fleet_textfile(textfile, rep)
            except OSError as e:
                raise InvalidArgument(f"{textfile}: {e.strerror}") from None
        emit(rep, as_json, fleet_text(rep))
        if check and any(h["stale"] or h["rpo_breached"] for h in rep["hosts"]):
            sys.exit(CHECK_RPO)
        return
    from ..operations.agent import state_dir
    from ..operations.status import build_report, read_agent_state
    from .status_view import render
    pol = _policy_or_none(policy_path)
    heartbeat, policy_error = read_agent_state(state_dir(settings.pool))
    rep = build_report(settings.pool, pol, heartbeat=heartbeat, policy_error=policy_error)
    if check:
        code, line = check_status(rep, pol)
        emit(dict(rep.to_json(), check={"code": code, "line": line}), as_json, line)
        sys.exit(code)
    if as_json:
        emit(rep.to_json(), True)
    else:
        render(rep, sys.stdout.isatty())


@click.command("jobs")
@click.option("--volume", metavar="V", help="Only this volume's jobs.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
@pass_settings
def jobs_cmd(settings: Settings, volume: str | None, limit: int, as_json: bool) -> None:
    """The agent's job history, newest first."""
    rows = call(settings.pool, "job_list", volume=volume, limit=limit)
    if as_json:
        emit(rows, True)
        return
    out = [{"id": r["id"], "volume": r["volume"] or "-", "kind": r["kind"], "target": r["target"] or "-",
            "start": _when(r["started"]), "end": _when(r["ended"]), "result": r["result"],
            "read": format_size(r["bytes_read"]), "stored": format_size(r["bytes_stored"]),
            "error": (r["error"] or "")[:60]} for r in rows]
    text = table(out, ["id", "volume", "kind", "target", "start", "end", "result", "read", "stored", "error"])
    emit(rows, False, text or "no jobs recorded")


jobs_cmd.name = "jobs"
COMMANDS = [policy, agent, status, jobs_cmd]
