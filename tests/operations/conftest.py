"""Fixtures for the monitoring tests: hand-built status Reports, and real servers
started here (an HTTP receiver, an aiosmtpd SMTP server with STARTTLS and AUTH, a
Prometheus process)."""
from __future__ import annotations

import datetime
import email
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blocksnap.operations.report import (
    Drill,
    JobStat,
    PoolReport,
    RepoCopy,
    Report,
    RepositoryReport,
    VolumeReport,
)

NOW = 1_800_000_000.0      # a fixed "now" for reports; 2027-01-15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], what: str, deadline: float = 60.0, step: float = 0.2):
    """Poll until `predicate()` is truthy; its value. Fails with `what` past the deadline
    (a safety net for a hung server, not a timing assertion)."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(step)


def healthy_report(now: float = NOW) -> Report:
    """Two volumes meeting their RPO, a pool and two repositories well under their
    limits, verification covered, the last drill good: no condition holds."""
    def jobs(vol: str) -> list[JobStat]:
        return [
            JobStat(vol, "snapshot", "", "ok", now - 310, now - 300, 10.0, now - 300, None, 0, 40),
            JobStat(vol, "backup", "local", "ok", now - 1900, now - 1800, 100.0, now - 1800, None, 2, 20),
            JobStat(vol, "copy", "cloud", "ok", now - 3700, now - 3600, 100.0, now - 3600, None, 0, 3),
        ]

    def volume(vol: str) -> VolumeReport:
        return VolumeReport(
            volume=vol, rpo=3600.0, newest_snapshot=f"{vol}@auto-1", newest_snapshot_created=now - 300,
            recovery_point=now - 1900, recovery_point_age=1900.0, rpo_breached=False,
            copies=[RepoCopy("local", "file:///srv/backup", "disk", False, "b1", now - 1900, now - 1800, 5),
                    RepoCopy("cloud", "s3://b/p", "object", True, "b0", now - 3800, now - 3600, 3)],
            copies_ok=3, media=2, offsite=1, rule_321_met=True,
            next_runs={"snapshot": now + 600, "backup:local": now + 1800, "copy:cloud": now + 80000},
            jobs=jobs(vol),
            drill=Drill(now - 86400, True, 42.0, "b0", None, now - 86400), rto_target=600.0)

    return Report(
        time=now, host="host1",
        pool=PoolReport("/srv/pool", size=100 << 30, used=40 << 30, used_ratio=0.4, days_until_full=120.0),
        volumes=[volume("vm1"), volume("db")],
        repositories=[
            RepositoryReport("local", "file:///srv/backup", "disk", False, True, None, 10 << 30, None, None, None,
                             1.0, 30 * 86400.0, []),
            RepositoryReport("cloud", "s3://b/p", "object", True, True, None, 8 << 30, 100 << 30, 0.08, 300.0,
                             0.97, 30 * 86400.0, []),
        ],
        agent_heartbeat=now - 2, policy_error=None)


def job(report: Report, volume: str, kind: str) -> JobStat:
    v = next(v for v in report.volumes if v.volume == volume)
    return next(j for j in v.jobs if j.kind == kind)


def vol(report: Report, volume: str) -> VolumeReport:
    return next(v for v in report.volumes if v.volume == volume)


def fail_backup(report: Report, volume: str = "vm1", error: str = "repository local: disk full") -> JobStat:
    j = job(report, volume, "backup")
    j.last_result, j.last_error = "failed", error
    j.last_start, j.last_end = report.time - 120, report.time - 60
    j.failures_total += 1
    j.runs_total += 1
    return j


def breach_rpo(report: Report, volume: str = "vm1") -> VolumeReport:
    v = vol(report, volume)
    v.recovery_point = report.time - 3 * 3600
    v.recovery_point_age = 3 * 3600.0
    v.rpo_breached = True
    return v


# -- an HTTP receiver --------------------------------------------------------------

@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class HttpReceiver:
    """A local HTTP server in a thread that records every request. `status` is what
    it answers; `on_request` runs before it answers (a test kills a process there)."""

    port: int
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    on_request: Callable[[Received], None] | None = None
    server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                r = Received(self.command, self.path, dict(self.headers.items()), self.rfile.read(n))
                if receiver.on_request:
                    receiver.on_request(r)
                receiver.requests.append(r)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def receiver():
    r = HttpReceiver(0).start()
    yield r
    r.stop()


# -- an SMTP server (aiosmtpd) with STARTTLS and AUTH ---------------------------------

def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (cryptography), and its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class SmtpServer:
    port: int
    user: str
    password: str
    messages: list[email.message.Message] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    tls_sessions: int = 0


@pytest.fixture
def smtp_server(tmp_path: Path, monkeypatch):
    """aiosmtpd on a free port, requiring STARTTLS (a self-signed certificate the
    client trusts through SSL_CERT_FILE) and AUTH as user 'agent'."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    state = SmtpServer(free_port(), "agent", "s3cret pass")

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            if session.ssl is not None:
                state.tls_sessions += 1
            state.messages.append(email.message_from_bytes(envelope.content))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login.decode() == state.user and auth_data.password.decode() == state.password
        if ok:
            state.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    controller = Controller(Handler(), hostname="127.0.0.1", port=state.port, tls_context=ctx,
                            require_starttls=True, authenticator=authenticator, auth_required=True,
                            auth_require_tls=True)
    controller.start()
    yield state
    controller.stop()


# -- Prometheus --------------------------------------------------------------------

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "blocksnap-rules.yml"


def rules_without_for(directory: Path) -> Path:
    """A copy of the shipped rules with every `for:` at 0s, so alerts fire on the
    first evaluation that sees their condition."""
    import re

    text = re.sub(r"(?m)^(\s+for:\s*)\S+\s*$", r"\g<1>0s", RULES.read_text())
    out = directory / "rules.yml"
    out.write_text(text)
    return out


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen

    def api(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self, state: str = "firing") -> list[dict]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["state"] == state]


@pytest.fixture
def prometheus_for(tmp_path: Path):
    """prometheus_for(target 'host:port') -> a Prometheus scraping it every second,
    evaluating the shipped rules (with `for: 0s`) every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (.ci/apt-packages-ops.txt)")
    procs: list[subprocess.Popen] = []

    def start(target: str) -> Prometheus:
        rules = rules_without_for(tmp_path)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n"
            "  - job_name: blocksnap\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        procs.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc)

        def ready():
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(ready, "prometheus to be ready")
        return prom

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
