"""Connection strings: parse, fill in passwords, and print them without passwords.

PostgreSQL: a libpq keyword string or URI, parsed by psycopg (libpq itself reads
PGPASSWORD and ~/.pgpass at connect time). MySQL/MariaDB:
``mysql://user[:password]@host[:port][/db][?unix_socket=PATH]``; a missing password
comes from MYSQL_PWD, then the [client] section of ~/.my.cnf.
"""
from __future__ import annotations

import configparser
import getpass
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..settings import MYSQL_PWD_ENV, Settings, resolve
from .plan import HookError

SECRET_KEYS = ("password", "sslpassword")
DEFAULT_MYSQL_SOCKETS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock", "/tmp/mysql.sock")


def scrub(text: str, secrets: list[str]) -> str:
    """One line, with every secret replaced by ***."""
    text = " ".join(str(text).split())
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# --------------------------------------------------------------------- PostgreSQL

@dataclass
class PgTarget:
    conninfo: str  # as given (may hold a password: never print it)
    params: dict[str, str]
    redacted: str
    secrets: list[str] = field(default_factory=list)


def parse_pg(dsn: str) -> PgTarget:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception:  # noqa: BLE001 - libpq's message may quote the password back
        raise HookError("invalid PostgreSQL connection string: expected 'key=value ...' "
                        "or 'postgresql://...'") from None
    secrets = [params[k] for k in SECRET_KEYS if params.get(k)]
    shown = {k: v for k, v in params.items() if k not in SECRET_KEYS}
    redacted = make_conninfo(**shown) if shown else "(defaults)"
    return PgTarget(conninfo=dsn, params=params, redacted=redacted, secrets=secrets)


# ------------------------------------------------------------------ MySQL/MariaDB

@dataclass
class MysqlTarget:
    user: str
    password: str | None
    host: str | None
    port: int | None
    unix_socket: str | None
    database: str | None
    redacted: str
    password_source: str | None = None

    @property
    def secrets(self) -> list[str]:
        return [self.password] if self.password else []

    def connect_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"user": self.user, "password": self.password or ""}
        if self.unix_socket:
            kw["unix_socket"] = self.unix_socket
        else:
            kw["host"] = self.host or "127.0.0.1"
            kw["port"] = self.port or 3306
        if self.database:
            kw["database"] = self.database
        return kw


def _strip_quotes(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def read_my_cnf(path: str | None = None) -> dict[str, str]:
    """The [client] section of ~/.my.cnf (MariaDB's [client-mariadb] too), or {}."""
    path = path or os.path.expanduser("~/.my.cnf")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if not ln.lstrip().startswith("!")]  # !include...
    except OSError:
        return {}
    cp = configparser.ConfigParser(allow_no_value=True, strict=False, interpolation=None,
                                   comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    try:
        cp.read_string("".join(lines), source=path)
    except configparser.Error:
        return {}
    out: dict[str, str] = {}
    for section in ("client", "client-server", "client-mariadb", "mysql"):
        if cp.has_section(section):
            for k, v in cp.items(section):
                if v is not None:
                    out.setdefault(k.replace("-", "_"), _strip_quotes(v))
    return out


def parse_mysql(url: str, settings: Settings | None = None) -> MysqlTarget:
    """The target of a --mysql URL. Its password: the URL's, else MYSQL_PWD (in
    `settings`; None: the environment's now), else ~/.my.cnf's."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise HookError("invalid MySQL URL: expected mysql://user[:password]@host[:port]/"
                        "[?unix_socket=PATH]") from None
    if u.scheme not in ("mysql", "mariadb"):
        raise HookError("invalid MySQL URL: expected mysql://user[:password]@host[:port]/"
                        "[?unix_socket=PATH]")
    query = parse_qs(u.query)
    sock = (query.get("unix_socket") or query.get("socket") or [None])[0]
    cnf = read_my_cnf()
    user = unquote(u.username) if u.username else cnf.get("user") or getpass.getuser()
    password: str | None
    source: str | None
    if u.password is not None:
        password, source = unquote(u.password), "url"
    elif (env_pwd := resolve(settings).mysql_pwd) is not None:
        password, source = env_pwd, MYSQL_PWD_ENV
    elif cnf.get("password") is not None:
        password, source = cnf["password"], "~/.my.cnf"
    else:
        password, source = None, None
    host = u.hostname
    if not sock and (host in (None, "", "localhost")) and port is None:
        # like the mysql client: "localhost" means the Unix socket
        sock = cnf.get("socket") or next((s for s in DEFAULT_MYSQL_SOCKETS if os.path.exists(s)),
                                         DEFAULT_MYSQL_SOCKETS[0])
    database = unquote(u.path.lstrip("/")) or None
    shown = f"mysql://{quote(user, safe='')}@{host or 'localhost'}"
    if port is not None:
        shown += f":{port}"
    shown += "/" + (quote(database) if database else "")
    if sock:
        shown += f"?unix_socket={sock}"
    return MysqlTarget(user=user, password=password, host=host, port=port, unix_socket=sock,
                       database=database, redacted=shown, password_source=source)
