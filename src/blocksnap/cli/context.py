"""Global options shared by every command, and JSON/plain output helpers."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from ..settings import Settings as EnvSettings


@dataclass
class Settings:
    """The global options, and the environment's settings (read once, at startup:
    settings.py), which the commands pass down."""

    pool: str
    verbose: int = 0
    quiet: bool = False
    debug: bool = False
    env: EnvSettings = field(default_factory=EnvSettings.from_env)

    @property
    def show_progress(self) -> bool:
        """Progress bars only on a terminal, never with -q."""
        return not self.quiet and sys.stderr.isatty()


pass_settings = click.make_pass_decorator(Settings)

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif text is not None:
        click.echo(text)


def table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return ""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)
