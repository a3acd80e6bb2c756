"""`blocksnap snapshot create|list|show|delete|prune|rollback|clone|diff`."""
from __future__ import annotations

import time

import click

from ..errors import BlocksnapError
from ..service.runner import call
from ..service.snapshots import create_snapshot
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings, table
from .options import keep_options, keep_policy, parse_labels
from .progress import progress_bar


@click.group("snapshot")
def snapshot() -> None:
    """Create, list, roll back, clone and diff snapshots."""


@snapshot.command("create")
@click.argument("ref", metavar="VOLUME@NAME")
@click.option("--freeze", "fs", multiple=True, metavar="MOUNTPOINT", help="Freeze this filesystem (FIFREEZE).")
@click.option("--pg", multiple=True, metavar="DSN", help="Quiesce this PostgreSQL server.")
@click.option("--pg-mode", type=click.Choice(["default", "backup"]), default="default", show_default=True)
@click.option("--mysql", multiple=True, metavar="DSN", help="Quiesce this MySQL/MariaDB server.")
@click.option("--pre", multiple=True, metavar="CMD", help="Command run before quiescing.")
@click.option("--post", multiple=True, metavar="CMD", help="Command run after release.")
@click.option("--shell", is_flag=True, help="Run --pre/--post through /bin/sh.")
@click.option("--freeze-timeout", type=click.FloatRange(0.1, 60.0), default=10.0, show_default=True,
              metavar="SECONDS")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@json_option
@pass_settings
def create(settings: Settings, ref, fs, pg, pg_mode, mysql, pre, post, shell, freeze_timeout,
           labels, as_json) -> None:
    """Take a snapshot; with hooks, application- or filesystem-consistent."""
    info = create_snapshot(settings.pool, ref, parse_labels(labels), fs=fs, pg=pg, pg_mode=pg_mode,
                           mysql=mysql, pre=pre, post=post, timeout=freeze_timeout, shell=shell,
                           settings=settings.env)
    text = None
    if not settings.quiet:
        text = f"created snapshot {info['ref']} ({info['consistency']})"
        freeze_ms = info.get("hooks", {}).get("freeze_ms")
        if freeze_ms is not None:
            text += f", frozen {freeze_ms:.1f} ms"
    emit(info, as_json, text)


def _row(s: dict) -> dict:
    labels = ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items()))
    return {"snapshot": s["ref"], "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])),
            "size": format_size(s["size"]), "consistency": s["consistency"], "labels": labels}


@snapshot.command("list")
@click.argument("volume", required=False)
@json_option
@pass_settings
def list_(settings: Settings, volume: str | None, as_json: bool) -> None:
    snaps = call(settings.pool, "snapshot_list", volume=volume)
    emit(snaps, as_json, table([_row(s) for s in snaps],
                               ["snapshot", "created", "size", "consistency", "labels"]))


@snapshot.command("show")
@click.argument("ref", metavar="VOLUME@NAME")
@json_option
@pass_settings
def show(settings: Settings, ref: str, as_json: bool) -> None:
    s = call(settings.pool, "snapshot_show", ref=ref)
    text = "\n".join(f"{k + ':':13} {v}" for k, v in _row(s).items())
    if s["hooks"]:
        text += f"\nhooks:        {len(s['hooks'].get('hooks', []))} recorded (see --json)"
    emit(s, as_json, text)


@snapshot.command("delete")
@click.argument("ref", metavar="VOLUME@NAME")
@pass_settings
def delete(settings: Settings, ref: str) -> None:
    call(settings.pool, "snapshot_delete", ref=ref)
    if not settings.quiet:
        click.echo(f"deleted snapshot {ref}")


@snapshot.command("prune")
@click.argument("volume")
@keep_options
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would go.")
@json_option
@pass_settings
def prune(settings: Settings, volume: str, dry_run: bool, as_json: bool, **keep) -> None:
    """Delete the volume's snapshots a --keep-* policy does not keep (as for backups)."""
    from ..retention import decide
    policy = keep_policy(keep)
    snaps = call(settings.pool, "snapshot_list", volume=volume)
    d = decide([(s["ref"], s["created"]) for s in snaps], policy)
    removed, failed = [], []
    for ref in d.remove if not dry_run else []:
        try:
            call(settings.pool, "snapshot_delete", ref=ref)
            removed.append(ref)
        except BlocksnapError as e:   # a clone's origin, a mounted snapshot: say so, go on
            failed.append({"snapshot": ref, "error": str(e)})
    res = {"kept": d.keep, "removed": removed if not dry_run else d.remove, "failed": failed, "dry_run": dry_run}
    lines = [f"keep   {ref}  ({', '.join(why)})" for ref, why in sorted(d.keep.items())]
    lines += [f"{'would delete' if dry_run else 'deleted'} {ref}" for ref in res["removed"]]
    emit(res, as_json, None if settings.quiet else "\n".join(lines))
    for f in failed:
        click.echo(f"warning: kept {f['snapshot']}: {f['error']}", err=True)
    if failed:
        raise BlocksnapError(f"{len(failed)} of {len(d.remove)} snapshots could not be deleted")


@snapshot.command("rollback")
@click.argument("ref", metavar="VOLUME@NAME")
@pass_settings
def rollback(settings: Settings, ref: str) -> None:
    """Make the live volume the snapshot again (newer snapshots are kept)."""
    call(settings.pool, "snapshot_rollback", ref=ref)
    if not settings.quiet:
        click.echo(f"rolled back to {ref}")


@snapshot.command("clone")
@click.argument("ref", metavar="VOLUME@NAME")
@click.argument("new_volume", metavar="NEWVOLUME")
@json_option
@pass_settings
def clone(settings: Settings, ref: str, new_volume: str, as_json: bool) -> None:
    """A writable ROW volume that shares the snapshot's blocks."""
    with progress_bar(settings, f"clone {ref}") as prog:
        info = call(settings.pool, "snapshot_clone", progress=prog, ref=ref, new_volume=new_volume)
    emit(info, as_json, None if settings.quiet else f"cloned {ref} as volume {new_volume}")


@snapshot.command("diff")
@click.argument("a", metavar="VOLUME@A")
@click.argument("b", metavar="[VOLUME@B]", required=False)
@json_option
@pass_settings
def diff(settings: Settings, a: str, b: str | None, as_json: bool) -> None:
    """Changed extents between two snapshots, or a snapshot and the live volume."""
    d = call(settings.pool, "snapshot_diff", a=a, b=b)
    lines = [f"{e['offset']}\t{e['length']}" for e in d["extents"]]
    lines.append(f"# {len(d['extents'])} extent(s), {format_size(d['changed_bytes'])} changed")
    emit(d, as_json, "\n".join(lines))


COMMANDS = [snapshot]
