"""A throwaway one-node Ceph cluster with radosgw, for backup tests against a real
S3 server (tests/backup/test_radosgw.py).

One monitor on 127.0.0.1 at a free port (msgr2 only), cephx keys made with
ceph-authtool, one OSD on memstore (objects live in the OSD's memory, about twice
their size), pools of size 1 with 8 placement groups and no autoscaler, and
radosgw with its beast frontend on two more free ports: plain HTTP, and HTTPS
with a self-signed certificate made here. No manager: radosgw needs none. The
S3 user's keys are made with radosgw-admin. Every daemon runs in the foreground
with `-c` this cluster's own ceph.conf, so nothing touches /etc/ceph, systemd or
another cluster on the machine.

Two settings make it quick and small: `paxos propose interval = 0.1` (the
monitor's default of 1 s between proposals is most of the start-up: each pool
radosgw creates waits for one; 12 s becomes 2 s), and radosgw's garbage
collector freeing deleted objects' data at once rather than after 2 hours
(memstore would keep it all in memory).

`stop()` kills the daemons and removes the directory, and `start()` calls it when
it fails. The daemons also die with the process that started them
(PR_SET_PDEATHSIG), so a killed test run leaves none running.
"""
from __future__ import annotations

import ctypes
import datetime
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-authtool", "monmaptool", "radosgw-admin", "ceph")
PACKAGES = "ceph-mon ceph-osd radosgw ceph-common"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


class CephError(Exception):
    pass


class CephCluster:
    ACCESS_KEY = "blocksnaptest"
    SECRET_KEY = "blocksnaptestsecret0123456789"

    def __init__(self, base: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="blocksnap-ceph-", dir=base))
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.tls_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.tls_endpoint = f"https://127.0.0.1:{self.tls_port}"
        self.ca_file = self.dir / "rgw-cert.pem"     # self-signed: give it to clients as AWS_CA_BUNDLE
        self.conf = self.dir / "ceph.conf"
        self.keyring = self.dir / "keyring"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self._s3 = None

    # -- the pieces ----------------------------------------------------------
    def _run(self, *cmd: str, timeout: float = 60) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
        if res.returncode != 0:
            raise CephError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return res.stdout

    def _ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "20", *args, timeout=timeout)

    def _daemon(self, name: str, *cmd: str) -> None:
        out = open(self.dir / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                cwd=self.dir, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def _write_conf(self) -> None:
        d = self.dir
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {d}
admin socket = {d}/$name.asok
log file = {d}/$name.log
pid file = {d}/$name.pid
crash dir = {d}/crash
exec dir = {d}
mon data = {d}/$name
osd data = {d}/$name
rgw data = {d}/$name
osd objectstore = memstore
memstore device bytes = 1073741824
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.1
rgw gc obj min wait = 0
rgw gc processor period = 2
auth allow insecure global id reclaim = false
rgw rados pool pg num min = 8
""")

    def _keys(self) -> None:
        kr = str(self.keyring)
        self._run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        for name, caps in (("client.admin", ("mon", "allow *", "osd", "allow *", "mgr", "allow *")),
                           ("osd.0", ("mon", "allow profile osd", "osd", "allow *", "mgr", "allow profile osd")),
                           ("client.rgw.a", ("mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"))):
            args = []
            for sub, cap in zip(caps[::2], caps[1::2]):
                args += ["--cap", sub, cap]
            self._run("ceph-authtool", kr, "--gen-key", "-n", name, *args)

    def _mon(self) -> None:
        monmap = str(self.dir / "monmap")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{self.mon_port}]", monmap)
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", str(self.keyring))
        self._daemon("mon.a", "ceph-mon", "-f", "-c", str(self.conf), "-i", "a")

    def _osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        (self.dir / "osd.0").mkdir()
        secret = self._run("ceph-authtool", str(self.keyring), "-p", "-n", "osd.0").strip()
        new = self.dir / "osd-new.json"
        new.write_text(json.dumps({"cephx_secret": secret}))
        # the monitor has osd.0's key from the keyring it was made with: `osd new` checks it is the same
        self._ceph("osd", "new", osd_uuid, "0", "-i", str(new))
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("osd.0", "ceph-osd", "-f", "-c", str(self.conf), "-i", "0")

    def _user(self) -> None:
        self._run("radosgw-admin", "-c", str(self.conf), "user", "create", "--uid", "blocksnap",
                  "--display-name", "blocksnap tests", "--access-key", self.ACCESS_KEY,
                  "--secret-key", self.SECRET_KEY, timeout=120)

    def _cert(self) -> None:
        """A self-signed certificate for 127.0.0.1, for the gateway's TLS endpoint."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / "rgw-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))

    def start_rgw(self, timeout: float = 60) -> None:
        """radosgw with beast on two ports: plain HTTP, and HTTPS with the test certificate."""
        (self.dir / "client.rgw.a").mkdir(exist_ok=True)
        frontend = (f"beast endpoint=127.0.0.1:{self.rgw_port} ssl_endpoint=127.0.0.1:{self.tls_port} "
                    f"ssl_certificate={self.ca_file} ssl_private_key={self.dir / 'rgw-key.pem'}")
        self._daemon("client.rgw.a", "radosgw", "-f", "-c", str(self.conf), "-n", "client.rgw.a",
                     "--rgw-frontends", frontend)
        self.wait_s3(timeout)

    def kill_rgw(self) -> None:
        p = self.procs.pop("client.rgw.a")
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        self._s3 = None     # its pooled connections are dead: retrying on them takes seconds

    def s3(self):
        """A boto3 client for the plain HTTP endpoint, made once."""
        if self._s3 is None:
            import boto3
            self._s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                    aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY)
        return self._s3

    def wait_s3(self, timeout: float) -> None:
        """Until an S3 request gets an answer from the gateway with our user's keys."""
        import boto3
        from botocore.config import Config
        c = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                         aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
                         config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                c.list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.1)
        raise CephError(f"radosgw did not answer S3 requests within {timeout:.0f} s: {last}")

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise CephError(f"{name} exited with {p.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, n: int = 20) -> str:
        out = []
        for f in (self.dir / f"{name}.out", self.dir / f"{name}.log"):
            if f.exists():
                out += f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)

    # -- the whole -----------------------------------------------------------
    def start(self, timeout: float = 120) -> "CephCluster":
        t0 = time.monotonic()
        try:
            self._write_conf()
            self._cert()
            self._keys()
            self._mon()
            self.timings["mon"] = time.monotonic() - t0
            self._osd()
            self.timings["osd"] = time.monotonic() - t0
            self._user()
            self.timings["user"] = time.monotonic() - t0
            self.start_rgw(max(10.0, timeout - (time.monotonic() - t0)))
            self.timings["rgw"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def rss_bytes(self) -> dict[str, int]:
        out = {}
        for name, p in self.procs.items():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
            except OSError:
                pass
        return out

    def stop(self) -> None:
        """Every daemon killed (SIGKILL: nothing of this cluster is worth a clean
        shutdown, and memstore's would write all its objects out), the directory removed."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
