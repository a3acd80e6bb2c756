"""`blocksnap backup|backup copy|restore|backups|verify|prune|unlock`: snapshots in a repository."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import click

from ..errors import CorruptionError, InvalidArgument, NotFound
from ..settings import PASSWORD_FILE_ENV, REPO_ENV, REPO_PASSWORD_ENV, S3_ENDPOINT_ENV
from ..units import format_size, parse_size
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


def _password_source(password_file: str | None, env_password: str | None, label: str = "repository"):
    """The password: from --password-file, else `env_password` (BLOCKSNAP_REPO_PASSWORD), else a
    prompt (naming `label`: which repository, when a command opens two)."""
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
            pw = click.prompt(f"new {label} password" if new else f"{label} password", hide_input=True,
                              confirmation_prompt=new, err=True).encode()
        else:
            raise InvalidArgument(f"the {label} needs a password: set {REPO_PASSWORD_ENV} or use --password-file")
        if not pw:
            raise InvalidArgument(f"the {label} password is empty")
        return pw
    return get


def _open(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
          create: bool = False):
    from ..backup.repo import Repository
    return Repository.open(repo_url, _password_source(password_file, settings.env.repo_password), endpoint, create)


def _open_early(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None):
    """Start unlocking an existing repository on a thread, and return a call that gives
    (repository, False), or None when there is none yet (the caller then creates it,
    once it knows the snapshot exists). The thread needs neither numpy nor the engine,
    so the key derivation (scrypt: 0.08 s of CPU, without the GIL) overlaps their
    loading and the opening of the pool instead of following them. A password that
    must be prompted for is not asked here (the call gives None). Errors are raised by
    the call, so they come in the same order as without it."""
    if not (password_file or settings.env.repo_password):
        return lambda: None
    from ..backup.access import open_access
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["access"] = open_access(repo_url, _password_source(password_file, settings.env.repo_password),
                                        endpoint)
        except NotFound:
            box["access"] = None
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, name="repo-open", daemon=True)
    t.start()

    def result():
        t.join()
        if "error" in box:
            raise box["error"].with_traceback(None)
        if box["access"] is None:
            return None
        from ..backup.repo import Repository
        backend, keys, config, _ = box["access"]
        return Repository(backend, keys, config), False
    return result


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class BackupGroup(click.Group):
    """`backup VOLUME@NAME ...` and `backup copy ...`: the first word picks a subcommand,
    and anything else (a snapshot reference, an option) is the snapshot backup, so the
    command line of before the subcommands keeps working."""

    default = "snapshot"     # the snapshot backup, hidden under this name

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "VOLUME@NAME --repo URL [OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        snap = self.commands[self.default]
        with click.Context(snap, info_name=ctx.info_name, parent=ctx.parent) as sub:
            snap.format_options(sub, formatter)
        self.format_commands(ctx, formatter)


@click.group("backup", cls=BackupGroup)
def backup_group() -> None:
    """Back a snapshot up into a repository (created on first use), or copy backups
    between repositories (`backup copy --help`)."""


@backup_group.command("snapshot", hidden=True)
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
    early = _open_early(settings, repo_url, endpoint, password_file)   # first: see its docstring
    from ..backup.make import direct, make_backup, piped
    from ..service.runner import session
    with session(settings.pool) as pool:     # one opening of the pool (or the daemon) for all of it
        def snapshot_created(r: str) -> float | None:
            try:
                return pool.call("snapshot_show", ref=r)["created"]
            except NotFound:
                return None

        if snapshot_created(ref) is None:    # before a repository is made for nothing
            raise NotFound(f"no snapshot {ref}")
        repo, created = early() or _open(settings, repo_url, endpoint, password_file, create=True)
        if created and not settings.quiet:
            click.echo(f"initialised the repository {repo_url}", err=True)

        with progress_bar(settings, f"backup {ref}") as prog:
            origin = {"host": socket.gethostname(), "pool": os.path.abspath(settings.pool)}
            source = direct(pool.pool, ref) if pool.pool is not None else \
                piped(lambda fd, base, start: pool.call("send", ref=ref, fd=fd, base=base, start=start))
            res = make_backup(repo, origin, ref, mode, source, snapshot_created, prog)
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
    early = _open_early(settings, repo_url, endpoint, password_file)   # while numpy loads
    from ..backup.restore import restore as _restore
    repo, _ = early() or _open(settings, repo_url, endpoint, password_file)
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
@click.option("--list-packs", is_flag=True, help="Also list every pack to check that each one an index names "
                                                 "is there and whole (--read-data does it too).")
@click.option("--budget", metavar="SIZE", help="Also read back this many bytes of packs: those never read, "
                                               "then those read longest ago (run it daily).")
@click.option("--cycle", metavar="DURATION", help="With --budget: every pack should be read within this "
                                                  "(e.g. 30d; default 30d); coverage is reported over it.")
@json_option
@pass_settings
def verify(settings: Settings, repo_url: str, endpoint: str | None, password_file: str | None,
           read_data: bool, list_packs: bool, budget: str | None, cycle: str | None, as_json: bool) -> None:
    """Check that every backup in a repository can be restored: its manifest opens and
    every chunk it names is indexed (the indexes say which packs exist; --list-packs
    checks them against the storage, --read-data and --budget read them back)."""
    from ..backup.coverage import DEFAULT_CYCLE
    from ..backup.maintain import verify as _verify
    from ..retention import parse_duration
    if cycle is not None and budget is None:
        raise click.UsageError("--cycle goes with --budget SIZE")
    if read_data and budget is not None:
        raise click.UsageError("--read-data reads every pack: give it or --budget, not both")
    nbytes = parse_size(budget) if budget is not None else None
    seconds = parse_duration(cycle) if cycle is not None else DEFAULT_CYCLE
    repo, _ = _open(settings, repo_url, endpoint, password_file)
    with progress_bar(settings, "verify") as prog:
        res = _verify(repo, read_data, prog, nbytes, seconds, list_packs=list_packs)
    read = f", {res['chunks_read']} read back" if read_data or nbytes is not None else ""
    found = f"{len(res['problems'])} problems" if res["problems"] else "no problems"
    text = f"{res['backups']} backups, {res['packs']} packs, {res['chunks']} chunks{read}: {found}"
    if nbytes is not None:
        cov = res["coverage"]
        text += (f"\nread {res['packs_read']} packs ({format_size(res['bytes_read'])}); coverage "
                 f"{cov['coverage_ratio']:.1%} of {format_size(cov['stored_bytes'])} read within "
                 f"{cycle or '30d'}" + (f", never read: {cov['never_verified_packs']} packs" if
                                        cov["never_verified_packs"] else "")
                 + ("" if cov["budget_enough"] else
                    f"; the budget is too small for the cycle (it needs "
                    f"{format_size(cov['bytes_per_day_needed'] + cov['largest_pack_bytes'])} a run, daily)"))
    emit(res, as_json, None if settings.quiet else text)
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


@backup_group.command("copy")
@click.argument("backup_ids", nargs=-1, metavar="BACKUP_ID...")
@click.option("--all", "everything", is_flag=True, help="Copy every backup of the source.")
@click.option("--from", "from_url", envvar=REPO_ENV, required=True, metavar="URL",
              help=f"The repository to copy from (env {REPO_ENV}).")
@click.option("--from-endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL",
              help=f"S3 endpoint of the source (env {S3_ENDPOINT_ENV}).")
@click.option("--from-password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
              help=f"The source's password (else env {PASSWORD_FILE_ENV}, {REPO_PASSWORD_ENV}, a prompt).")
@click.option("--to", "to_url", required=True, metavar="URL",
              help="The repository to copy into (created on first use, with its own password and key).")
@click.option("--to-endpoint", envvar=S3_ENDPOINT_ENV, metavar="URL",
              help=f"S3 endpoint of the destination (env {S3_ENDPOINT_ENV}).")
@click.option("--to-password-file", envvar=PASSWORD_FILE_ENV, type=click.Path(dir_okay=False),
              help=f"The destination's password (else env {PASSWORD_FILE_ENV}, {REPO_PASSWORD_ENV}, a prompt).")
@json_option
@pass_settings
def copy(settings: Settings, backup_ids: tuple[str, ...], everything: bool, from_url: str,
         from_endpoint: str | None, from_password_file: str | None, to_url: str, to_endpoint: str | None,
         to_password_file: str | None, as_json: bool) -> None:
    """Copy backups into another repository (3-2-1), sending only the chunks it lacks.

    Killed or cut off, a copy run again goes on where it stopped. A copy restores
    like the original and is listed there under the same backup ID."""
    from ..backup.copy import copy_backups, same_repository
    from ..backup.repo import Repository
    if everything == bool(backup_ids):
        raise click.UsageError("give BACKUP_ID... or --all (not both)")
    env_pw = settings.env.repo_password
    src, _ = Repository.open(from_url, _password_source(from_password_file, env_pw, "source repository"),
                             from_endpoint)
    listed = src.backup_ids()
    for ident in backup_ids:      # an unknown one fails before the destination is made
        src.resolve(ident, listed)
    dst_pw = _password_source(to_password_file, env_pw, "destination repository")
    dst, created = Repository.open(to_url, dst_pw, to_endpoint, create=True)
    if same_repository(src, dst):    # before a lock is taken on either
        raise InvalidArgument(f"--from and --to are the same repository ({from_url})")
    if created and not settings.quiet:
        click.echo(f"initialised the repository {to_url}", err=True)
    with progress_bar(settings, "copy") as prog:
        res = copy_backups(src, dst, None if everything else list(backup_ids), prog)
    emit(res, as_json, None if settings.quiet else
         f"copied {len(res['copied'])} backups to {to_url}"
         + (f", {len(res['skipped'])} already there" if res["skipped"] else "")
         + f": fetched {format_size(res['bytes_fetched'])}, sent {res['chunks_sent']} chunks "
           f"({format_size(res['bytes_sent'])}), {res['chunks_present']} were there")


COMMANDS = [backup_group, restore, backups, verify, prune, unlock]
