"""Fallback runner for `blocksnap freeze` alone, used by the tests only when the full
command line (blocksnap.cli.main) does not import. Same error contract as the CLI."""
from __future__ import annotations

import sys

import click

from blocksnap.cli.freeze_cmd import freeze
from blocksnap.errors import BlocksnapError


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["freeze"]:
        argv = argv[1:]
    try:
        freeze.main(args=argv, prog_name="blocksnap freeze", standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message().splitlines()[0]}", err=True)
        sys.exit(e.exit_code)
    except BlocksnapError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
