"""`blocksnap volume create|import|list|show|delete|resize`."""
from __future__ import annotations

import os

import click

from ..errors import Busy, InvalidArgument
from ..service.runner import call
from ..settings import PASSWORD_FILE_ENV, REPO_ENV, S3_ENDPOINT_ENV
from ..units import DEFAULT_BLOCK_SIZE, format_size, validate_name
from .backup_cmd import _password_source
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


def _repo_options(fn):
    fn = click.option("--password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
                      help="Read the repository password from this file.")(fn)
    fn = click.option("--endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL", help="S3 endpoint (not AWS).")(fn)
    fn = click.option("--hydrate-rate", type=SIZE, default=0, hidden=True,
                      help="At most this many bytes a second copied in the background (0: no limit).")(fn)
    return fn


@volume.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, help="Volume size (cow: taken from the origin).")
@click.option("--mode", type=click.Choice(["row", "cow"]), default="row", show_default=True)
@click.option("--origin", metavar="IMAGE|DEVICE", help="Existing image or device (cow).")
@click.option("--block-size", type=SIZE, default=DEFAULT_BLOCK_SIZE, show_default=True)
@click.option("--from-backup", "backup_id", metavar="ID",
              help="Instant recovery: a ROW volume usable at once, hydrating from this backup (with --repo).")
@click.option("--repo", "repo_url", envvar=REPO_ENV, metavar="URL", help="Repository of --from-backup.")
@_repo_options
@json_option
@pass_settings
def create(settings: Settings, name: str, size, mode, origin, block_size, backup_id, repo_url, endpoint,
           password_file, hydrate_rate, as_json) -> None:
    """Create a thin ROW volume, or a COW volume over an existing origin, or (with
    --from-backup) a ROW volume restored instantly from a backup."""
    if backup_id is not None:
        if size is not None or origin or mode != "row":
            raise InvalidArgument("--from-backup takes the size and block size from the backup: "
                                  "no --size, --origin or --mode cow")
        if not repo_url:
            raise InvalidArgument(f"--from-backup needs --repo (or {REPO_ENV})")
        info = create_from_backup(settings, name, backup_id, repo_url, endpoint, password_file, hydrate_rate)
        h = info["hydration"]
        emit(info, as_json, None if settings.quiet else
             f"created row volume {name} ({format_size(info['size'])}) from backup {h['backup']}: usable now, "
             f"hydrating ({format_size(h['pending'] * info['block_size'])} to copy, hydrator pid {h['pid']})")
        return
    info = call(settings.pool, "volume_create", name=name, size=size, mode=mode,
                origin=os.path.abspath(origin) if origin else None, block_size=block_size)
    emit(info, as_json, None if settings.quiet else
         f"created {info['mode']} volume {name} ({format_size(info['size'])})")


def _manifest(repo_url: str, endpoint: str | None, password: bytes, backup_id: str):
    from ..backup.repo import Repository
    repo, _ = Repository.open(repo_url, lambda new: password, endpoint)
    return repo.manifest(backup_id)


def create_from_backup(settings: Settings, name: str, backup_id: str, repo_url: str, endpoint: str | None,
                       password_file: str | None, rate: int) -> dict:
    """Check everything, make the volume, start its hydrator; undo the volume if that fails."""
    from ..recovery import hydrate
    validate_name(name, "volume name")
    password = _password_source(password_file, settings.env.repo_password)(False)
    m = _manifest(repo_url, endpoint, password, backup_id)     # a wrong password, an unknown ID stop here
    hyd = {"backup": m.id, "repo": repo_url, "endpoint": endpoint, "volume": m.volume,
           "snapshot": m.info["source"].get("snapshot")}
    info = call(settings.pool, "volume_create_from_backup", name=name, size=int(m.info["size"]),
                block_size=int(m.info["chunk_size"]), hydration=hyd,
                starts=m.starts.astype(int).tolist(), counts=m.counts.astype(int).tolist())
    try:
        pid = hydrate.start(settings.pool, name, repo=repo_url, endpoint=endpoint, password=password,
                            backup=m.id, rate=rate)
    except BaseException:
        call(settings.pool, "volume_delete", name=name)
        raise
    info["hydration"]["pid"] = pid
    return info


@volume.command("hydrate")
@click.argument("name")
@_repo_options
@click.option("--stop", is_flag=True, help="End the volume's hydrator (it can be started again).")
@json_option
@pass_settings
def hydrate_(settings: Settings, name: str, endpoint, password_file, hydrate_rate, stop: bool, as_json) -> None:
    """Start the hydrator of a volume restored with --from-backup again (after a reboot,
    a kill, or --stop): with the repository's password, from where it was."""
    from ..recovery import hydrate
    info = call(settings.pool, "volume_show", name=name)
    h = info.get("hydration")
    if not h or h.get("state") != "hydrating":
        raise InvalidArgument(f"volume {name} is not hydrating from a backup"
                              + (f" (hydrated from {h['backup']})" if h else ""))
    if stop:
        stopped = hydrate.stop(settings.pool, name)
        emit({"stopped": stopped}, as_json, None if settings.quiet else
             f"{'stopped' if stopped else 'no'} hydrator of {name}")
        return
    if hydrate.running(settings.pool, name) is not None:
        raise Busy(f"volume {name} already has a hydrator running (pid {hydrate.running(settings.pool, name)})")
    endpoint = endpoint or h.get("endpoint")
    password = _password_source(password_file, settings.env.repo_password)(False)
    _manifest(h["repo"], endpoint, password, h["backup"])
    pid = hydrate.start(settings.pool, name, repo=h["repo"], endpoint=endpoint, password=password,
                        backup=h["backup"], rate=hydrate_rate)
    emit({"pid": pid, **h}, as_json, None if settings.quiet else
         f"hydrating {name} from backup {h['backup']} ({h.get('pending', 0)} blocks to copy, pid {pid})")


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
