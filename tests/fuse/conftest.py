"""Fixtures for the FUSE/daemon tests: real pools, daemons, loop devices and mounts.

Every test gets its own pool under tmp_path, and teardown takes down whatever the
test left behind (mounts under tmp_path, loop devices backed by files there, the
daemon, the FUSE mount) even when the test failed half-way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.service import loopdev
from tests.conftest import mark_root_dir, root_skip_reason, run_cli

NEEDS = ["losetup", "mount", "umount", "fusermount3", "mkfs.ext4", "e2fsck"]
_REASON = root_skip_reason(NEEDS, "loop devices, mounts")


def pytest_collection_modifyitems(config, items):
    mark_root_dir(items, "fuse", _REASON)


def cleanup_under(base: Path) -> None:
    """Unmount, detach and kill everything a test made under `base`."""
    prefix = str(base.resolve()).rstrip("/") + "/"
    for state in base.rglob("daemon.json"):
        try:
            pid = json.loads(state.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
    for _ in range(3):
        # innermost first: snapshot mounts and filesystems on loop devices, then FUSE
        for m in sorted(loopdev.mounts(), key=lambda m: -len(m.mountpoint)):
            if m.mountpoint.startswith(prefix) or m.source.startswith("/dev/loop") and \
                    (loopdev.backing_file(m.source) or "").startswith(prefix):
                subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
        for dev, f in loopdev.bound_loops().items():
            if f.startswith(prefix):
                subprocess.run(["losetup", "-d", dev], capture_output=True)
    for m in loopdev.mounts():
        if m.mountpoint.startswith(prefix):
            subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)


class Served:
    """A pool with a volume, and helpers to drive the real CLI against it."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.pool = tmp_path / "pool"
        self.mnt = self.pool / "mnt"

    def cli(self, *args: str, check: bool = True, timeout: float = 120):
        return run_cli(self.pool, *args, check=check, timeout=timeout)

    def attach(self, volume: str = "vm1", *extra: str) -> str:
        dev = self.cli("attach", volume, *extra).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        return dev

    def status(self) -> dict:
        return json.loads(self.cli("pool", "status", "--json").stdout)

    def daemon_pid(self) -> int | None:
        try:
            return json.loads((self.pool / "daemon.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        return d


@pytest.fixture
def served(tmp_path: Path):
    """A pool (256 MiB data) with volume vm1 (128 MiB); no daemon yet."""
    s = Served(tmp_path)
    with blocksnap.Pool.create(str(s.pool), size=256 << 20) as p:
        p.create_volume("vm1", size=128 << 20)
    try:
        yield s
    finally:
        if s.daemon_pid():
            run_cli(s.pool, "stop", "--force", timeout=60)
        cleanup_under(tmp_path)


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def wait_for(pred, timeout: float = 10.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
