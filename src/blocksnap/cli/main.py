"""Entry point: the click group, global options and the one-line error contract."""
from __future__ import annotations

import importlib
import sys
import traceback

import click

from ..errors import BlocksnapError
from ..settings import DEFAULT_POOL, POOL_ENV
from .context import EnvSettings, Settings

# Which module defines each command. A command's module is imported only when the
# command runs (or for --help): a `backup` no longer imports the recovery, policy
# and freeze commands with their dependencies (about 0.05 s of a start, more with
# cold caches). tests/cli/test_cli.py checks this against every module's COMMANDS.
# mount and umount are recovery_cmd's: they pass snapshots on to serve_cmd's.
COMMAND_MODULES = {
    "pool": "pool_cmd", "volume": "volume_cmd", "snapshot": "snapshot_cmd",
    "export": "data_cmd", "check": "data_cmd", "scrub": "data_cmd",
    "send": "stream_cmd", "receive": "stream_cmd", "freeze": "freeze_cmd",
    "serve": "serve_cmd", "attach": "serve_cmd", "detach": "serve_cmd", "stop": "serve_cmd",
    "mount": "recovery_cmd", "umount": "recovery_cmd", "drill": "recovery_cmd", "drills": "recovery_cmd",
    "backup": "backup_cmd", "restore": "backup_cmd", "backups": "backup_cmd", "verify": "backup_cmd",
    "prune": "backup_cmd", "unlock": "backup_cmd",
    "policy": "ops_cmd", "agent": "ops_cmd", "status": "ops_cmd", "jobs": "ops_cmd",
}


class LazyGroup(click.Group):
    """The command group whose commands are imported when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 - click's signature
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:  # noqa: ARG002
        if name not in self.commands and name in COMMAND_MODULES:
            mod = importlib.import_module(f"{__package__}.{COMMAND_MODULES[name]}")
            self.commands[name] = next(c for c in mod.COMMANDS if c.name == name)
        return self.commands.get(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pool", envvar=POOL_ENV, default=DEFAULT_POOL, show_default=True,
              help=f"Pool directory (env {POOL_ENV}).")
@click.option("-v", "--verbose", count=True, help="More output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, less output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="blocksnap")
@click.pass_context
def cli(ctx: click.Context, pool: str, verbose: int, quiet: bool, debug: bool) -> None:
    """blocksnap: block-level snapshots, FUSE export, freeze hooks and backups."""
    env = EnvSettings.from_env()   # the environment, read once (a bad value: error: NAME=...)
    ctx.obj = Settings(pool=pool, verbose=verbose, quiet=quiet, debug=debug, env=env)
    if verbose or debug:
        import logging
        logging.basicConfig(level=logging.DEBUG if verbose > 1 or debug else logging.INFO,
                            format="blocksnap: %(name)s: %(message)s")
    _rethaw_stale_freezes(env)


def _rethaw_stale_freezes(env: EnvSettings) -> None:
    """A blocksnap killed while a filesystem was frozen left a record: thaw it now."""
    try:
        from ..hooks.state import recover_stale_freezes
        for item in recover_stale_freezes(env):
            if item.get("status") == "thawed":
                click.echo(f"warning: thawed {item['path']}, left frozen by blocksnap pid "
                           f"{item.get('pid')}", err=True)
    except Exception:  # noqa: BLE001 - never block a command on this
        pass


# The flag that mends an error, by the parameter the engine says is at fault: the
# engine speaks of sizes and origins, the command line of --size and --origin.
FLAG_HINTS = {
    "size": "give --size SIZE",
    "origin": "give --origin IMAGE|DEVICE",
    "mode": "--origin needs --mode cow",
    "force": "use --force to overwrite",
    "recursive": "use --recursive",
    "shrink": "use --shrink",
}


def describe(e: BlocksnapError) -> str:
    """The error's one line, with the flag that fixes it when there is one."""
    hint = FLAG_HINTS.get(e.param or "")
    return f"{e} ({hint})" if hint else str(e)


def run(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors become `error: ...` with the error class's exit code
    (1 in general, 3-8 for the classes in errors.py; docs/usage.md), usage errors exit 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = cli.main(args=argv, prog_name="blocksnap", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        # usage errors: one line, exit 2
        msg = e.format_message().splitlines()[0] if e.format_message() else str(e)
        click.echo(f"error: {msg}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BlocksnapError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {describe(e)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - last resort: never a traceback without --debug
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    run()
