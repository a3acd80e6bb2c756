"""`blocksnap mount --repo|umount|drill|drills`: backups browsed and tested without a restore.

`mount` and `umount` also keep their pool meaning: `mount VOLUME@NAME DIR` (a
snapshot, through the pool's daemon) is passed on to serve_cmd's command, and
`umount DIR` undoes whichever kind of mount DIR has. A backup ID never holds an
`@`, so the first argument tells the two apart.
"""
from __future__ import annotations

import click
from click.core import ParameterSource

from ..errors import CorruptionError, InvalidArgument
from ..settings import PASSWORD_FILE_ENV, REPO_ENV, S3_ENDPOINT_ENV
from ..units import format_size
from . import serve_cmd
from .backup_cmd import _open, _password_source
from .context import Settings, emit, json_option, pass_settings, table
from .options import SIZE
from .progress import progress_bar

DEFAULT_CACHE = 512 << 20


def _repo_options(fn):
    """--repo (optional here: a snapshot mount needs none), --endpoint, --password-file."""
    fn = click.option("--password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
                      help="Read the repository password from this file.")(fn)
    fn = click.option("--endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL", help="S3 endpoint (not AWS).")(fn)
    return click.option("--repo", "repo_url", envvar=REPO_ENV, metavar="URL",
                        help=f"Repository of the backup: file:///PATH or s3://BUCKET[/PREFIX] (env {REPO_ENV}).")(fn)


@click.command("mount")
@click.argument("what", metavar="VOLUME@NAME|BACKUP_ID")
@click.argument("directory", type=click.Path())
@_repo_options
@click.option("--cache", "cache_size", type=SIZE, default=DEFAULT_CACHE, show_default="512M",
              help="Local cache of decrypted chunks (LRU, an unnamed file in /var/tmp).")
@click.option("--image-only", is_flag=True, help="Only serve DIRECTORY/<id>.img (the raw image), no filesystem.")
@json_option
@pass_settings
@click.pass_context
def mount(ctx: click.Context, settings: Settings, what: str, directory: str, repo_url: str | None,
          endpoint: str | None, password_file: str | None, cache_size: int, image_only: bool,
          as_json: bool) -> None:
    """Mount a snapshot's (VOLUME@NAME) or a backup's (BACKUP_ID, with --repo) filesystem
    read-only on DIRECTORY. A backup is read on demand, never restored."""
    if "@" in what:
        if ctx.get_parameter_source("repo_url") == ParameterSource.COMMANDLINE or image_only:
            raise InvalidArgument(f"{what} is a snapshot of the pool: --repo and --image-only are for backup IDs")
        ctx.invoke(serve_cmd.mount, ref=what, directory=directory, as_json=as_json)
        return
    if not repo_url:
        raise InvalidArgument(f"mounting backup {what} needs --repo URL (or {REPO_ENV})")
    if cache_size < (1 << 20):
        raise InvalidArgument("--cache must be at least 1M")
    from ..recovery.mount import check_directory, mount_backup
    check_directory(directory, settings.env)      # before a password is asked for
    password = _password_source(password_file, settings.env.repo_password)(False)
    res = mount_backup(repo_url, password, what, directory, endpoint=endpoint, cache_size=cache_size,
                       image_only=image_only, settings=settings.env)
    emit(res, as_json, None if settings.quiet else
         f"served {res['image']}" if image_only else
         f"mounted backup {res['backup']} of {res['volume']} ({res['fstype']}, {format_size(res['size'])}) "
         f"read-only on {res['dir']} via {res['device']}")


@click.command("umount")
@click.argument("directory", type=click.Path(file_okay=False))
@pass_settings
@click.pass_context
def umount(ctx: click.Context, settings: Settings, directory: str) -> None:
    """Unmount what `blocksnap mount` (or a killed drill) left on DIRECTORY, and free
    everything it used."""
    from ..recovery.mount import find, unmount
    if find(directory, settings.env) is None:
        ctx.invoke(serve_cmd.umount, directory=directory)
        return
    res = unmount(directory, settings.env)
    for line in res["damaged"]:
        click.echo(f"warning: read a damaged chunk: {line}", err=True)
    if not settings.quiet:
        click.echo(f"unmounted backup {res['backup']} from {res['dir']}", err=True)


def _parse_checks(checks: tuple[str, ...], sql: str | None, expect: str | None, pgdata: str | None) -> list[dict]:
    from ..recovery.checks import parse_check
    if not checks:
        checks = ("fsck",)
    out = [parse_check(c, sql=sql, expect=expect, datadir=pgdata) for c in checks]
    if (sql or expect) and not any(c["kind"] in ("postgres", "mariadb") for c in out):
        raise InvalidArgument("--sql and --expect go with --check postgres or --check mariadb")
    return out


@click.command("drill")
@click.argument("backup_id", required=False, metavar="[BACKUP_ID]")
@click.option("--repo", "repo_url", envvar=REPO_ENV, required=True, metavar="URL",
              help=f"file:///PATH or s3://BUCKET[/PREFIX] (env {REPO_ENV}).")
@click.option("--endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL", help="S3 endpoint (not AWS).")
@click.option("--password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
              help="Read the repository password from this file.")
@click.option("--volume", help="Drill the newest backup of this volume.")
@click.option("--check", "checks", multiple=True, metavar="fsck|postgres|mariadb|command:CMD",
              help="What must pass (repeatable; default fsck).")
@click.option("--sql", help="Query the database check runs (instead of pg_amcheck / mariadb-check).")
@click.option("--expect", help="What --sql must print (its output, trimmed).")
@click.option("--datadir", "pgdata", metavar="PATH",
              help="The database's data directory inside the filesystem (default: found).")
@json_option
@pass_settings
def drill(settings: Settings, backup_id: str | None, repo_url: str, endpoint: str | None,
          password_file: str | None, volume: str | None, checks: tuple[str, ...], sql: str | None,
          expect: str | None, pgdata: str | None, as_json: bool) -> None:
    """Bring a backup up on a throwaway overlay, run checks, measure the RTO, record it."""
    from ..recovery.drill import DrillFailed, newest_backup, run_drill
    if bool(backup_id) == bool(volume):
        raise InvalidArgument("give a BACKUP_ID or --volume VOLUME (one of them)")
    specs = _parse_checks(checks, sql, expect, pgdata)
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    ident = backup_id or newest_backup(repo, volume)
    with progress_bar(settings, f"drill {ident}") as prog:
        res = run_drill(repo, ident, specs, progress=prog, settings=settings.env)
    if as_json:
        emit(res, True)
    elif not settings.quiet:
        for c in res["checks"]:
            click.echo(f"{c['name']}: {'ok' if c['ok'] else 'FAILED'} ({c['seconds']:.1f} s)"
                       + (f": {c['summary']}" if c.get("summary") else ""))
        if res["ok"]:
            click.echo(f"drill of {res['backup']} passed: RTO {res['rto_seconds']:.1f} s")
    if not res["ok"]:
        raise (CorruptionError if res["damaged"] else DrillFailed)(f"drill of {res['backup']} failed: {res['error']}")


@click.command("drills")
@click.option("--repo", "repo_url", envvar=REPO_ENV, required=True, metavar="URL")
@click.option("--endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL")
@click.option("--password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False))
@click.option("--volume", help="Only this volume's drills.")
@json_option
@pass_settings
def drills(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
           volume: str | None, as_json: bool) -> None:
    """List the drills recorded in a repository, oldest first."""
    import time

    from ..recovery.drill import drill_results
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    items = drill_results(repo, volume)
    rows = [{"time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["time"])), "backup": d["backup"],
             "volume": d.get("volume"), "host": d.get("host"), "result": "ok" if d["ok"] else "FAILED",
             "rto": f"{d['rto_seconds']:.1f}s" if d.get("rto_seconds") is not None else "-",
             "checks": ",".join(c["name"] for c in d.get("checks", []))} for d in items]
    emit(items, as_json, table(rows, ["time", "backup", "volume", "host", "result", "rto", "checks"]))


COMMANDS = [mount, umount, drill, drills]
