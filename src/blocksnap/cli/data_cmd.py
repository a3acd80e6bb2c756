"""`blocksnap export|check|scrub`."""
from __future__ import annotations

import os

import click

from ..errors import CorruptionError
from ..service.runner import call
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings
from .progress import progress_bar


@click.command("export")
@click.argument("ref", metavar="VOLUME@NAME")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@json_option
@pass_settings
def export(settings: Settings, ref: str, output: str, force: bool, as_json: bool) -> None:
    """Write a snapshot as a raw image (holes stay holes)."""
    with progress_bar(settings, f"export {ref}") as prog:
        res = call(settings.pool, "export", progress=prog, ref=ref, output=os.path.abspath(output),
                   force=force)
    emit(res, as_json, None if settings.quiet else
         f"exported {ref} to {output} ({format_size(res['size'])}, {format_size(res['written'])} written)")


@click.command("check")
@click.option("--repair", is_flag=True, help="Cut dangling pointers and drop orphan pages.")
@json_option
@pass_settings
def check(settings: Settings, repair: bool, as_json: bool) -> None:
    """Verify the pool's metadata."""
    res = call(settings.pool, "check", repair=repair)
    text = "clean" if res["clean"] else "\n".join(f"problem: {e}" for e in res["errors"])
    for r in res["repaired"]:
        text += f"\nrepaired: {r}"
    emit(res, as_json, text)
    if not res["clean"] and not res["repaired"]:
        click.echo(f"error: the pool's metadata has {len(res['errors'])} problem(s)", err=True)
        raise SystemExit(CorruptionError.exit_code)


@click.command("scrub")
@click.argument("target", metavar="VOLUME[@NAME]")
@json_option
@pass_settings
def scrub(settings: Settings, target: str, as_json: bool) -> None:
    """Read every stored block and verify its checksum."""
    with progress_bar(settings, f"scrub {target}") as prog:
        res = call(settings.pool, "scrub", progress=prog, target=target)
    lines = [f"bad block: {b['where']} offset {b['offset']} (data store offset {b['store_offset']})"
             for b in res["bad"]]
    lines.append(f"scrubbed {res['checked_blocks']} block(s): "
                 + ("clean" if res["clean"] else f"{len(res['bad'])} bad"))
    emit(res, as_json, "\n".join(lines))
    if not res["clean"]:
        # the report above names the blocks; the error contract wants one stderr line
        click.echo(f"error: {target}: {len(res['bad'])} block(s) failed their checksum", err=True)
        raise SystemExit(CorruptionError.exit_code)


COMMANDS = [export, check, scrub]
