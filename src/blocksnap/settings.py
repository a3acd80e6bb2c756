"""Every environment variable blocksnap reads, read in one place.

`Settings.from_env()` reads them all at once, parses and checks each (a bad value
is an InvalidArgument that names the variable) and returns a frozen dataclass. The
command line calls it once at startup (cli/main.py) and passes the values down:
to the daemon and its FUSE tree, the freeze record, the repository password.
A library function that takes `settings=None` calls `Settings.from_env()` itself
when it runs, so a script or a test that sets a variable before the call sees it
honoured, and `import blocksnap` alone reads nothing.

docs/usage.md, "Environment", lists the same variables as VARIABLES below
(tests/cli/test_settings.py checks that the two agree).

Not read here, on purpose:
* FUSE_LIBRARY_NAME is mfusepy's, not ours: fuse/__init__.py sets it (to load
  libfuse3) before mfusepy is imported.
* The BLOCKSNAP_* variables a hook command gets are written for it, never read
  back (hooks/generic.py); a child process inherits the rest of the environment.
* Variables used only by the test suite (BLOCKSNAP_TEST_*) are read by the tests.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from .errors import InvalidArgument

DEFAULT_POOL = "/var/lib/blocksnap"
DEFAULT_DAEMON_TIMEOUT = 60.0

# Read by click, as the defaults of the options they stand for (cli/main.py,
# cli/backup_cmd.py); the pool is also a field below, for entry points without them.
POOL_ENV = "BLOCKSNAP_POOL"
REPO_ENV = "BLOCKSNAP_REPO"
S3_ENDPOINT_ENV = "BLOCKSNAP_S3_ENDPOINT"
PASSWORD_FILE_ENV = "BLOCKSNAP_PASSWORD_FILE"
# Read by Settings.from_env().
REPO_PASSWORD_ENV = "BLOCKSNAP_REPO_PASSWORD"
DAEMON_TIMEOUT_ENV = "BLOCKSNAP_DAEMON_TIMEOUT"
LOOP_DIRECT_IO_ENV = "BLOCKSNAP_LOOP_DIRECT_IO"
WRITE_BEHIND_ENV = "BLOCKSNAP_WRITE_BEHIND"
FAST_IO_ENV = "BLOCKSNAP_FAST_IO"
RUNTIME_DIR_ENV = "BLOCKSNAP_RUNTIME_DIR"
PURE_PYTHON_ENV = "BLOCKSNAP_PURE_PYTHON"
POLICY_ENV = "BLOCKSNAP_POLICY"
# Not ours, read with the meaning their owners give them.
XDG_RUNTIME_DIR_ENV = "XDG_RUNTIME_DIR"   # freedesktop: the user's runtime directory
MYSQL_PWD_ENV = "MYSQL_PWD"               # the mysql client's password variable

# Every variable above, in the order of docs/usage.md's table.
VARIABLES = (POOL_ENV, REPO_ENV, S3_ENDPOINT_ENV, REPO_PASSWORD_ENV, PASSWORD_FILE_ENV, DAEMON_TIMEOUT_ENV,
             LOOP_DIRECT_IO_ENV, WRITE_BEHIND_ENV, FAST_IO_ENV, RUNTIME_DIR_ENV, PURE_PYTHON_ENV, POLICY_ENV,
             XDG_RUNTIME_DIR_ENV, MYSQL_PWD_ENV)

_ON = ("1", "on", "yes", "true")
_OFF = ("0", "off", "no", "false")


def parse_switch(name: str, value: str | None, default: bool) -> bool:
    """An on/off variable: on/off, 1/0, yes/no, true/false (any case); unset or
    empty gives `default`; anything else is an InvalidArgument naming `name`."""
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise InvalidArgument(f"{name}={value!r}: expected on or off (also 1/0, yes/no, true/false)")


def parse_seconds(name: str, value: str | None, default: float) -> float:
    """A positive number of seconds; unset or empty gives `default`."""
    if value is None or not value.strip():
        return default
    try:
        s = float(value)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and s > 0):
        raise InvalidArgument(f"{name}={value!r}: expected a number of seconds greater than 0")
    return s


def _text(value: str | None) -> str | None:
    """A string variable: unset and empty are the same (None)."""
    return value if value else None


@dataclass(frozen=True)
class Settings:
    """What the environment asks of blocksnap (docs/usage.md, "Environment")."""

    pool: str = DEFAULT_POOL                       # BLOCKSNAP_POOL (click reads it for --pool)
    repo_password: str | None = field(default=None, repr=False)   # BLOCKSNAP_REPO_PASSWORD
    daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT  # BLOCKSNAP_DAEMON_TIMEOUT: seconds, > 0
    loop_direct_io: bool = True                    # BLOCKSNAP_LOOP_DIRECT_IO
    write_behind: bool = True                      # BLOCKSNAP_WRITE_BEHIND
    fast_io: bool = True                           # BLOCKSNAP_FAST_IO
    runtime_dir: str | None = None                 # BLOCKSNAP_RUNTIME_DIR
    pure_python: bool = False                      # BLOCKSNAP_PURE_PYTHON
    xdg_runtime_dir: str | None = None             # XDG_RUNTIME_DIR
    mysql_pwd: str | None = field(default=None, repr=False)   # MYSQL_PWD ("" is a password)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable from `environ` (default: this process's environment)."""
        env = os.environ if environ is None else environ
        return cls(
            pool=_text(env.get(POOL_ENV)) or DEFAULT_POOL,
            repo_password=_text(env.get(REPO_PASSWORD_ENV)),
            daemon_timeout=parse_seconds(DAEMON_TIMEOUT_ENV, env.get(DAEMON_TIMEOUT_ENV), DEFAULT_DAEMON_TIMEOUT),
            loop_direct_io=parse_switch(LOOP_DIRECT_IO_ENV, env.get(LOOP_DIRECT_IO_ENV), True),
            write_behind=parse_switch(WRITE_BEHIND_ENV, env.get(WRITE_BEHIND_ENV), True),
            fast_io=parse_switch(FAST_IO_ENV, env.get(FAST_IO_ENV), True),
            runtime_dir=_text(env.get(RUNTIME_DIR_ENV)),
            pure_python=parse_switch(PURE_PYTHON_ENV, env.get(PURE_PYTHON_ENV), False),
            xdg_runtime_dir=_text(env.get(XDG_RUNTIME_DIR_ENV)),
            mysql_pwd=env.get(MYSQL_PWD_ENV),
        )


def resolve(settings: Settings | None) -> Settings:
    """`settings`, or the environment's now: for functions that take `settings=None`."""
    return Settings.from_env() if settings is None else settings
