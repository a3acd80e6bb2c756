"""`blocksnap volume create|import|list|show|delete|resize`."""
from __future__ import annotations

import os

import click

from ..service.runner import call
from ..units import DEFAULT_BLOCK_SIZE, format_size
from .context import Settings, emit, json_option, pass_settings, table
from .options import SIZE
from .progress import progress_bar


def _row(v: dict) -> dict:
    return {"name": v["name"], "mode": v["mode"], "size": format_size(v["size"]),
            "block": format_size(v["block_size"]), "allocated": format_size(v["allocated"]),
            "snapshots": len(v["snapshots"]), "origin": v["origin"] or ""}


@click.group("volume")
def volume() -> None:
    """Create, import and manage volumes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, help="Volume size (cow: taken from the origin).")
@click.option("--mode", type=click.Choice(["row", "cow"]), default="row", show_default=True)
@click.option("--origin", metavar="IMAGE|DEVICE", help="Existing image or device (cow).")
@click.option("--block-size", type=SIZE, default=DEFAULT_BLOCK_SIZE, show_default=True)
@json_option
@pass_settings
def create(settings: Settings, name: str, size, mode, origin, block_size, as_json) -> None:
    """Create a thin ROW volume, or a COW volume over an existing origin."""
    info = call(settings.pool, "volume_create", name=name, size=size, mode=mode,
                origin=os.path.abspath(origin) if origin else None, block_size=block_size)
    emit(info, as_json, None if settings.quiet else
         f"created {info['mode']} volume {name} ({format_size(info['size'])})")


@volume.command("import")
@click.argument("name")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["row"]), default="row", show_default=True)
@click.option("--block-size", type=SIZE, default=DEFAULT_BLOCK_SIZE, show_default=True)
@json_option
@pass_settings
def import_(settings: Settings, name, source, mode, block_size, as_json) -> None:  # noqa: ARG001 - mode: row only
    """Copy an image or device into a new ROW volume (holes and zero blocks stay holes)."""
    with progress_bar(settings, f"import {name}") as prog:
        info = call(settings.pool, "volume_import", progress=prog, name=name,
                    source=os.path.abspath(source), block_size=block_size)
    emit(info, as_json, None if settings.quiet else
         f"imported {source} as {name} ({format_size(info['size'])}, "
         f"{format_size(info['allocated'])} allocated)")


@volume.command("list")
@json_option
@pass_settings
def list_(settings: Settings, as_json: bool) -> None:
    vols = call(settings.pool, "volume_list")
    emit(vols, as_json, table([_row(v) for v in vols],
                              ["name", "mode", "size", "block", "allocated", "snapshots", "origin"]))


@volume.command("show")
@click.argument("name")
@json_option
@pass_settings
def show(settings: Settings, name: str, as_json: bool) -> None:
    v = call(settings.pool, "volume_show", name=name)
    emit(v, as_json, "\n".join(f"{k + ':':12} {val}" for k, val in _row(v).items()))


@volume.command("delete")
@click.argument("name")
@click.option("--recursive", "-r", is_flag=True, help="Also delete the volume's snapshots.")
@pass_settings
def delete(settings: Settings, name: str, recursive: bool) -> None:
    """Delete a volume (a cow origin is left untouched)."""
    call(settings.pool, "volume_delete", name=name, recursive=recursive)
    if not settings.quiet:
        click.echo(f"deleted volume {name}")


@volume.command("resize")
@click.argument("name")
@click.argument("size", type=SIZE)
@click.option("--shrink", is_flag=True, help="Allow a smaller size (the data past it is lost).")
@json_option
@pass_settings
def resize(settings: Settings, name: str, size: int, shrink: bool, as_json: bool) -> None:
    """Grow a ROW volume, or shrink it with --shrink (dropping the data past the new
    end). Sizes are whole blocks: another size is rounded up, and a note says so."""
    info = call(settings.pool, "volume_resize", name=name, size=size, shrink=shrink)
    if "rounded_up_from" in info and not settings.quiet:
        click.echo(f"note: {format_size(size)} rounded up to {format_size(info['size'])} "
                   f"(whole blocks of {format_size(info['block_size'])})", err=True)
    emit(info, as_json, None if settings.quiet else f"resized {name} to {format_size(info['size'])}")


COMMANDS = [volume]
