"""What to freeze around a snapshot (`FreezePlan`) and the error the hooks raise."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlocksnapError, InvalidArgument

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
PG_MODES = ("default", "backup")


class HookError(BlocksnapError):
    """A freeze/hook step failed; the message is one line, without passwords.

    ``record`` holds the freeze record built so far (same format as `run_frozen`'s
    return value) when the error comes from `run_frozen`, else None.
    """

    def __init__(self, message: str, record: dict[str, Any] | None = None):
        super().__init__(" ".join(str(message).split()))
        self.record = record


def _str_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise InvalidArgument(f"{name}: expected non-empty strings")
        out.append(v)
    return out


@dataclass
class FreezePlan:
    """Everything to quiesce around one action (a snapshot).

    fs        mountpoints to freeze with FIFREEZE (each must be a mountpoint)
    pg        PostgreSQL connection strings (libpq keyword string or URI)
    pg_mode   "default": CHECKPOINT before the freeze; "backup": pg_backup_start/stop
    mysql     MySQL/MariaDB URLs: mysql://user[:password]@host[:port]/[?unix_socket=PATH]
    pre/post  generic hook commands (split with shlex unless shell=True)
    timeout   seconds: bound of the freeze window (quiesce..release), and of each hook;
              default 10, hard cap 60
    volume/snapshot  names passed to the hooks (BLOCKSNAP_VOLUME/BLOCKSNAP_SNAPSHOT)
    """

    fs: list[str] = field(default_factory=list)
    pg: list[str] = field(default_factory=list)
    pg_mode: str = "default"
    mysql: list[str] = field(default_factory=list)
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT
    volume: str | None = None
    snapshot: str | None = None
    shell: bool = False

    def __post_init__(self) -> None:
        self.fs = _str_list("fs", self.fs)
        self.pg = _str_list("pg", self.pg)
        self.mysql = _str_list("mysql", self.mysql)
        self.pre = _str_list("pre", self.pre)
        self.post = _str_list("post", self.post)
        if self.pg_mode not in PG_MODES:
            raise InvalidArgument(f"pg mode must be one of {', '.join(PG_MODES)}, not {self.pg_mode!r}")
        try:
            self.timeout = float(self.timeout)
        except (TypeError, ValueError):
            raise InvalidArgument(f"freeze timeout must be a number of seconds, not {self.timeout!r}") from None
        if not math.isfinite(self.timeout) or self.timeout <= 0 or self.timeout > MAX_TIMEOUT:
            raise InvalidArgument(
                f"freeze timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds, not {self.timeout:g}")
        self.shell = bool(self.shell)

    @property
    def has_db(self) -> bool:
        return bool(self.pg or self.mysql)
