"""`blocksnap backup|restore|backups|verify|prune|unlock`: snapshots in a repository."""
from __future__ import annotations

import os
import socket
import sys
import time

import click

from ..errors import CorruptionError, InvalidArgument, NotFound
from ..service.runner import call
from ..settings import PASSWORD_FILE_ENV, REPO_ENV, REPO_PASSWORD_ENV, S3_ENDPOINT_ENV
from ..units import format_size
from .context import Settings, emit, json_option, pass_settings, table
from .options import keep_options, keep_policy
from .progress import progress_bar


def repo_options(fn):
    fn = click.option("--password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
                      help=f"Read the repository password from this file (else env {REPO_PASSWORD_ENV}, "
                           "else a prompt on a terminal).")(fn)
    fn = click.option("--endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL",
                      help="S3 endpoint for s3:// repositories that are not AWS (MinIO, Ceph RGW...).")(fn)
    return click.option("--repo", "repo_url", envvar=REPO_ENV, required=True, metavar="URL",
                        help=f"file:///PATH or s3://BUCKET[/PREFIX] (env {REPO_ENV}).")(fn)


def _password_source(password_file: str | None, env_password: str | None):
    """The password: from --password-file, else `env_password` (BLOCKSNAP_REPO_PASSWORD), else a prompt."""
    def get(new: bool) -> bytes:
        if password_file:
            try:
                with open(password_file, "rb") as f:
                    pw = f.read().rstrip(b"\r\n")
            except OSError as e:
                raise InvalidArgument(f"{password_file}: {e.strerror}") from None
        elif env_password:
            pw = env_password.encode()
        elif sys.stdin.isatty():
            pw = click.prompt("new repository password" if new else "repository password", hide_input=True,
                              confirmation_prompt=new, err=True).encode()
        else:
            raise InvalidArgument(f"the repository needs a password: set {REPO_PASSWORD_ENV} or use --password-file")
        if not pw:
            raise InvalidArgument("the repository password is empty")
        return pw
    return get


def _open(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
          create: bool = False):
    from ..backup.repo import Repository
    return Repository.open(repo_url, _password_source(password_file, settings.env.repo_password), endpoint, create)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@click.command("backup")
@click.argument("ref", metavar="VOLUME@NAME")
@repo_options
@click.option("--mode", type=click.Choice(["full", "incremental", "differential"]), default="incremental",
              show_default=True, help="Which blocks are read: all, changed since the last backup, "
                                      "or changed since the last full one.")
@json_option
@pass_settings
def backup(settings: Settings, ref: str, repo_url: str, endpoint: str | None, password_file: str | None,
           mode: str, as_json: bool) -> None:
    """Back a snapshot up into a repository (created on first use)."""
    from ..backup.make import make_backup

    def snapshot_created(r: str) -> float | None:
        try:
            return call(settings.pool, "snapshot_show", ref=r)["created"]
        except NotFound:
            return None

    if snapshot_created(ref) is None:    # before a repository is made for nothing
        raise NotFound(f"no snapshot {ref}")
    repo, created = _open(settings, repo_url, endpoint, password_file, create=True)
    if created and not settings.quiet:
        click.echo(f"initialised the repository {repo_url}", err=True)

    with progress_bar(settings, f"backup {ref}") as prog:
        origin = {"host": socket.gethostname(), "pool": os.path.abspath(settings.pool)}
        res = make_backup(repo, origin, ref, mode,
                          lambda fd, base, start: call(settings.pool, "send", ref=ref, fd=fd, base=base,
                                                       start=start),
                          snapshot_created, prog)
    if res.get("note") and not settings.quiet:
        click.echo(f"note: {res['note']}", err=True)
    st = res["stats"]
    emit(res, as_json, None if settings.quiet else
         f"backup {res['id']} of {ref} ({res['mode']}{', on ' + res['base'] if res['base'] else ''}): "
         + (f"resumed at {format_size(st['resumed_from'])} where a run was cut short, " if st.get("resumed_from")
            else "")
         + f"read {format_size(st['read_bytes'])}, stored {st['new_chunks']} new chunks "
         f"({format_size(st['new_bytes'])}) in {st['packs']} packs")


@click.command("restore")
@click.argument("backup_id", metavar="BACKUP_ID")
@click.argument("target", type=click.Path())
@repo_options
@click.option("--verify", is_flag=True, help="Read the target back and check every chunk.")
@json_option
@pass_settings
def restore(settings: Settings, backup_id: str, target: str, repo_url: str, endpoint: str | None,
            password_file: str | None, verify: bool, as_json: bool) -> None:
    """Write a backup to a new raw image file or onto a block device."""
    from ..backup.restore import restore as _restore
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    with progress_bar(settings, f"restore {backup_id}") as prog:
        res = _restore(repo, backup_id, target, verify, prog)
    emit(res, as_json, None if settings.quiet else
         f"restored {res['backup']} to {target} ({format_size(res['size'])}, "
         f"{format_size(res['bytes_fetched'])} fetched{', verified' if res['verified'] else ''})")


@click.command("backups")
@click.argument("volume", required=False)
@repo_options
@json_option
@pass_settings
def backups(settings: Settings, volume: str | None, repo_url: str, endpoint: str | None,
            password_file: str | None, as_json: bool) -> None:
    """List the backups in a repository, oldest first."""
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    items = [m.info for m in repo.manifests() if volume is None or m.volume == volume]
    rows = [{"id": i["id"], "snapshot": f"{i['source']['volume']}@{i['source']['snapshot']}", "mode": i["mode"],
             "time": _when(i["time"]), "size": format_size(i["size"]), "read": format_size(i["stats"]["read_bytes"]),
             "stored": format_size(i["stats"]["new_bytes"]), "base": i["base"] or "-"} for i in items]
    emit(items, as_json, table(rows, ["id", "snapshot", "mode", "time", "size", "read", "stored", "base"]))


@click.command("verify")
@repo_options
@click.option("--read-data", is_flag=True, help="Also download, decrypt and check every chunk.")
@json_option
@pass_settings
def verify(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
           read_data: bool, as_json: bool) -> None:
    """Check that every backup in a repository can be restored."""
    from ..backup.maintain import verify as _verify
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    with progress_bar(settings, "verify") as prog:
        res = _verify(repo, read_data, prog)
    read = f", {res['chunks_read']} read back" if read_data else ""
    found = f"{len(res['problems'])} problems" if res["problems"] else "no problems"
    emit(res, as_json, None if settings.quiet else
         f"{res['backups']} backups, {res['packs']} packs, {res['chunks']} chunks{read}: {found}")
    if res["problems"]:
        for p in res["problems"] if not as_json else []:   # with --json they are in the JSON
            click.echo(f"problem: {p}")
        raise CorruptionError(f"{len(res['problems'])} problems in {repo_url}")


@click.command("prune")
@repo_options
@keep_options
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would go.")
@json_option
@pass_settings
def prune(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
          dry_run: bool, as_json: bool, **keep) -> None:
    """Remove the backups a --keep-* policy does not keep (per volume), then the data
    only they used."""
    from ..backup.maintain import prune as _prune
    policy = keep_policy(keep)
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    res = _prune(repo, policy, dry_run)
    text = None
    if not settings.quiet:
        lines = [f"keep   {bid}  ({', '.join(why)})" for bid, why in sorted(res["kept"].items())]
        lines += [f"{'would remove' if dry_run else 'remove'} {bid}" for bid in res["removed"]]
        if not dry_run:
            lines.append(f"deleted {res['packs_deleted']} packs, rewrote {res['packs_rewritten']}, "
                         f"freed {format_size(res['bytes_freed'])}")
        text = "\n".join(lines)
    emit(res, as_json, text)


@click.command("unlock")
@repo_options
@click.option("--all", "everything", is_flag=True,
              help="Also remove locks of other hosts and of running processes (make sure they are gone).")
@pass_settings
def unlock(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
           everything: bool) -> None:
    """Remove the locks a killed backup, restore or prune left in a repository."""
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    removed, kept = repo.unlock(everything)
    if not settings.quiet:
        click.echo(f"removed {removed} locks" + (f"; kept {kept} held by running processes or other hosts "
                                                 "(--all removes them)" if kept else ""))


COMMANDS = [backup, restore, backups, verify, prune, unlock]
