"""`blocksnap pool init|status`."""
from __future__ import annotations

import click

from ..engine import Pool
from ..service.runner import call
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings, table
from .options import SIZE


@click.group("pool")
def pool() -> None:
    """Create and inspect pools."""


@pool.command("init")
@click.option("--data", "data", metavar="FILE|DEVICE", help="Existing image file or block device for the data store.")
@click.option("--size", type=SIZE, help="Data store size (default: sparse file as large as the host filesystem).")
@json_option
@pass_settings
def init(settings: Settings, data: str | None, size: int | None, as_json: bool) -> None:
    """Create a pool in the --pool directory."""
    with Pool.create(settings.pool, data=data, size=size) as p:
        st = p.status()
    emit(st, as_json, f"created pool {st['pool']} ({format_size(st['size'])}, data {st['data']})"
         if not settings.quiet else None)


@pool.command("status")
@json_option
@pass_settings
def status(settings: Settings, as_json: bool) -> None:
    """Space, volumes and health."""
    st = call(settings.pool, "pool_status")
    if as_json:
        emit(st, True)
        return
    lines = [f"pool:      {st['pool']}", f"data:      {st['data']}",
             f"size:      {format_size(st['size'])}",
             f"used:      {format_size(st['used'])} ({st['used_percent']}%)",
             f"free:      {format_size(st['free'])}",
             f"volumes:   {st['volumes']}", f"snapshots: {st['snapshots']}",
             f"direct:    {st.get('direct_reads', 0)} reads, {st.get('direct_writes', 0)} writes"
             " served without Python (since the pool opened)",
             f"health:    {st['health']}"]
    rows = [{"name": v["name"], "mode": v["mode"], "size": format_size(v["size"]),
             "allocated": format_size(v["allocated"]), "snapshots": len(v["snapshots"])}
            for v in st["volume_list"]]
    if rows:
        lines += ["", table(rows, ["name", "mode", "size", "allocated", "snapshots"])]
    click.echo("\n".join(lines))


COMMANDS = [pool]
