"""Where alerts go: webhooks (json, alertmanager, ntfy, slack), email over SMTP, a
command, and healthchecks-style pings. Stdlib only (urllib, smtplib, subprocess).

A channel's `send` raises on failure, and the AlertManager keeps the notification
for the next evaluation; `ping` only logs, since a missed ping is what the pinged
service is there to notice. docs/operations.md describes every format.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from email.header import Header
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, Protocol

from .model import AlertsConfig, EmailConfig, WebhookTarget

if TYPE_CHECKING:
    from .alerts import Notification

log = logging.getLogger("blocksnap.alerts")

HTTP_TIMEOUT = 10.0
SMTP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
FORMATS = ("json", "alertmanager", "ntfy", "slack")
PING_EVENTS = {"start": "/start", "success": "", "fail": "/fail"}

# The alertname an alert key's kind gets in the Alertmanager format, the same as the
# Prometheus rule for the same condition in deploy/prometheus/blocksnap-rules.yml.
ALERT_NAMES = {
    "job_failed": "BlocksnapJobFailed",
    "job_late": "BlocksnapJobLate",
    "rpo_breached": "BlocksnapRPOBreached",
    "storage": "BlocksnapStorageHigh",
    "corruption": "BlocksnapCorruptionFound",
    "drill_failed": "BlocksnapDrillFailed",
    "policy_refused": "BlocksnapPolicyRefused",
    "repository_unreachable": "BlocksnapRepositoryUnreachable",
}


class ChannelError(Exception):
    """A channel did not take a notification (the message says why, on one line)."""


class Channel(Protocol):
    id: str         # stable across restarts: names the channel's outbox in the state file
    name: str       # for log lines: no tokens or passwords

    def send(self, n: Notification) -> None: ...


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def redact(url: str) -> str:
    """scheme://host/… : webhook URLs (Slack's, ntfy topics) are secrets."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{p.scheme}://{host}{f':{p.port}' if p.port else ''}/…"


def alert_name(n: Notification) -> str:
    return ALERT_NAMES.get(n.condition.kind, "Blocksnap" + n.condition.kind.title().replace("_", ""))


def json_payload(n: Notification, host: str) -> dict[str, Any]:
    """blocksnap's own webhook schema (format = "json"), version 1."""
    c = n.condition
    return {"version": 1, "status": n.status, "key": c.key, "alertname": alert_name(n), "severity": c.severity,
            "summary": c.summary, "description": c.description, "labels": c.labels, "host": host,
            "time": rfc3339(n.time), "started": rfc3339(n.started), "reminder": n.reminder}


def alertmanager_payload(n: Notification, host: str, remind: float) -> list[dict[str, Any]]:
    """The body of Alertmanager's POST /api/v2/alerts. A firing alert's endsAt lies
    two reminder intervals ahead (each reminder refreshes it), since Alertmanager
    resolves an alert whose endsAt passed; a resolved one ends when it cleared."""
    c = n.condition
    labels = {"alertname": alert_name(n), "severity": c.severity, "host": host, "key": c.key,
              "source": "blocksnap-agent"}
    labels.update({k: v for k, v in c.labels.items() if v})
    ends = n.time if n.status == "resolved" else n.time + 2 * remind
    return [{"labels": labels, "annotations": {"summary": c.summary, "description": c.description},
             "startsAt": rfc3339(n.started), "endsAt": rfc3339(ends)}]


def title(n: Notification, host: str) -> str:
    state = "RESOLVED" if n.status == "resolved" else ("REMINDER" if n.reminder else "FIRING")
    return f"[{state}] {n.condition.summary} ({host})"


def _header_value(text: str) -> str:
    """HTTP header values are latin-1; ntfy decodes RFC 2047 encoded words."""
    try:
        text.encode("ascii")
        return text
    except UnicodeEncodeError:
        return Header(text, "utf-8").encode()


def ntfy_request(n: Notification, host: str) -> tuple[bytes, dict[str, str]]:
    resolved = n.status == "resolved"
    critical = n.condition.severity == "critical"
    priority = "2" if resolved else ("5" if critical else "4")
    tags = "white_check_mark" if resolved else ("rotating_light" if critical else "warning")
    headers = {"Title": _header_value(title(n, host)), "Priority": priority, "Tags": f"{tags},blocksnap",
               "Content-Type": "text/plain; charset=utf-8"}
    return n.condition.description.encode(), headers


def slack_payload(n: Notification, host: str) -> dict[str, str]:
    icon = ":white_check_mark:" if n.status == "resolved" else (
        ":rotating_light:" if n.condition.severity == "critical" else ":warning:")
    return {"text": f"{icon} *{title(n, host)}*\n{n.condition.description}"}


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float = HTTP_TIMEOUT) -> int:
    """POST and return the status; a non-2xx answer or no answer raises ChannelError."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(65536)
            return resp.status
    except urllib.error.HTTPError as e:
        raise ChannelError(f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ChannelError(str(reason)) from e


class WebhookChannel:
    def __init__(self, target: WebhookTarget, host: str, remind: float, timeout: float = HTTP_TIMEOUT):
        if target.format not in FORMATS:
            raise ValueError(f"webhook format {target.format!r}: expected one of {', '.join(FORMATS)}")
        self.target, self.host, self.remind, self.timeout = target, host, remind, timeout
        self.id = f"webhook:{target.format}:{target.url}"
        self.name = f"webhook ({target.format}) {redact(target.url)}"

    def request(self, n: Notification) -> tuple[bytes, dict[str, str]]:
        fmt = self.target.format
        if fmt == "ntfy":
            return ntfy_request(n, self.host)
        if fmt == "alertmanager":
            body: Any = alertmanager_payload(n, self.host, self.remind)
        elif fmt == "slack":
            body = slack_payload(n, self.host)
        else:
            body = json_payload(n, self.host)
        return json.dumps(body).encode(), {"Content-Type": "application/json"}

    def send(self, n: Notification) -> None:
        body, headers = self.request(n)
        http_post(self.target.url, body, {"User-Agent": "blocksnap-agent", **headers}, self.timeout)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text.strip("[]"), default_port
    return host.strip("[]"), int(port)


def read_password(path: str) -> str:
    """The first line of a password file, without its newline."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise ChannelError(f"password file {path}: {e.strerror or e}") from e


class EmailChannel:
    """One message per notification, over SMTP (STARTTLS when asked, then login)."""

    def __init__(self, config: EmailConfig, host: str, timeout: float = SMTP_TIMEOUT):
        self.config, self.host, self.timeout = config, host, timeout
        self.id = f"email:{config.smtp}:{','.join(config.to)}"
        self.name = f"email via {config.smtp}"

    def message(self, n: Notification) -> EmailMessage:
        c = n.condition
        msg = EmailMessage()
        msg["Subject"] = f"[blocksnap] {title(n, self.host)}"
        msg["From"] = self.config.sender or f"blocksnap@{self.host}"
        msg["To"] = ", ".join(self.config.to)
        msg["Date"] = formatdate(n.time)
        msg["Message-ID"] = make_msgid("blocksnap")
        msg["X-Blocksnap-Alert-Key"] = c.key
        msg["X-Blocksnap-Alert-Status"] = n.status
        labels = "".join(f"  {k}: {v}\n" for k, v in sorted(c.labels.items()) if v)
        msg.set_content(f"{c.description}\n\nstatus: {n.status}{' (reminder)' if n.reminder else ''}\n"
                        f"severity: {c.severity}\nkey: {c.key}\nhost: {self.host}\n"
                        f"since: {rfc3339(n.started)}\ntime: {rfc3339(n.time)}\n"
                        + (f"labels:\n{labels}" if labels else ""))
        return msg

    def send(self, n: Notification) -> None:
        cfg = self.config
        server, port = split_host_port(cfg.smtp, 25)
        try:
            with smtplib.SMTP(server, port, timeout=self.timeout, local_hostname=self.host or None) as smtp:
                if cfg.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if cfg.username:
                    smtp.login(cfg.username, read_password(cfg.password_file) if cfg.password_file else "")
                smtp.send_message(self.message(n))
        except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
            raise ChannelError(f"SMTP {cfg.smtp}: {e}") from e


def command_env(n: Notification, host: str) -> dict[str, str]:
    """The variables a command channel is given (on top of the agent's environment)."""
    c = n.condition
    return {"BLOCKSNAP_ALERT_STATUS": n.status, "BLOCKSNAP_ALERT_KEY": c.key, "BLOCKSNAP_ALERT_NAME": alert_name(n),
            "BLOCKSNAP_ALERT_SEVERITY": c.severity, "BLOCKSNAP_ALERT_SUMMARY": c.summary,
            "BLOCKSNAP_ALERT_DESCRIPTION": c.description, "BLOCKSNAP_ALERT_LABELS": json.dumps(c.labels),
            "BLOCKSNAP_ALERT_STARTED": rfc3339(n.started), "BLOCKSNAP_ALERT_TIME": rfc3339(n.time),
            "BLOCKSNAP_ALERT_REMINDER": "1" if n.reminder else "0", "BLOCKSNAP_HOST": host}


class CommandChannel:
    """Runs the command (split like a shell line, no shell) with BLOCKSNAP_* variables
    and the json payload on stdin; exit 0 within the timeout means delivered."""

    def __init__(self, command: str, host: str, timeout: float = COMMAND_TIMEOUT):
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("alert command is empty")
        self.host, self.timeout = host, timeout
        self.id = f"command:{command}"
        self.name = f"command {os.path.basename(self.argv[0])}"

    def send(self, n: Notification) -> None:
        env = {**os.environ, **command_env(n, self.host)}
        stdin = json.dumps(json_payload(n, self.host)).encode()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            raise ChannelError(f"{self.argv[0]}: {e.strerror or e}") from e
        try:
            _, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired as e:
            os.killpg(proc.pid, signal.SIGKILL)     # its children too: it has its own session
            proc.communicate()
            raise ChannelError(f"{self.argv[0]}: killed after {self.timeout:g} s") from e
        if proc.returncode != 0:
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise ChannelError(f"{self.argv[0]}: exit {proc.returncode} {last[0][:200]}".rstrip())


def build_channels(config: AlertsConfig, host: str) -> list[Channel]:
    """The channels the [alerts] table names, in a fixed order."""
    channels: list[Channel] = [WebhookChannel(t, host, config.remind) for t in config.webhooks]
    if config.email is not None:
        channels.append(EmailChannel(config.email, host))
    if config.command:
        channels.append(CommandChannel(config.command, host))
    return channels


def ping_url(base: str, kind: str, volume: str, event: str) -> str:
    """base (with {kind} and {volume} filled in) + '/start', '' or '/fail'."""
    if event not in PING_EVENTS:
        raise ValueError(f"ping event {event!r}: expected start, success or fail")
    quote = urllib.parse.quote
    url = base.replace("{kind}", quote(kind, safe="")).replace("{volume}", quote(volume, safe=""))
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/") + PING_EVENTS[event]
    return urllib.parse.urlunsplit(parts._replace(path=path))


def ping(config: AlertsConfig, kind: str, volume: str, event: str, message: str = "",
         timeout: float = HTTP_TIMEOUT) -> bool:
    """A healthchecks-style ping for a job's start, success or failure: a POST whose
    body is one line (the job, or its error). Never raises; True when delivered."""
    if not config.ping:
        return False
    url = ping_url(config.ping, kind, volume, event)
    body = (message or f"{kind} {volume} {event}").encode()[:10000]
    try:
        http_post(url, body, {"Content-Type": "text/plain; charset=utf-8", "User-Agent": "blocksnap-agent"},
                  timeout)
        return True
    except (ChannelError, socket.timeout, ValueError) as e:
        log.warning("ping %s %s %s to %s failed: %s", kind, volume, event, redact(url), e)
        return False
