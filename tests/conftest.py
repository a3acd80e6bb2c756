"""Shared fixtures for the blocksnap test suite: real pools in temporary directories,
and a runner for the real command line (a subprocess, as a user would call it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import blocksnap

# Pools in tests always get an explicit size: without one, a pool's data file is a
# sparse file as large as the host filesystem and its in-memory space map with it.
TEST_POOL_SIZE = 64 << 20

# Tests that check the engine's logic rather than the disk (the model, the simulated
# power cuts) may put their many short-lived pools on a tmpfs, where thousands of
# fsyncs stay cheap on a busy machine. BLOCKSNAP_TEST_TMP overrides; None = default tmp.
FAST_TMP = os.environ.get("BLOCKSNAP_TEST_TMP") or (
    "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    return tmp_path / "pool"


@pytest.fixture
def fast_tmp_path(tmp_path: Path):
    """Like tmp_path, but on FAST_TMP when there is one; removed afterwards."""
    if FAST_TMP is None:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="blocksnap-test-", dir=FAST_TMP))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pool(pool_dir: Path):
    """An open pool of TEST_POOL_SIZE, closed (committed) at the end of the test."""
    p = blocksnap.Pool.create(str(pool_dir), size=TEST_POOL_SIZE)
    yield p
    if not p.closed:
        p.close()


def run_cli(pool_path: str | os.PathLike | None, *args: str, input: bytes | None = None,
            env: dict | None = None, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m blocksnap --pool POOL ARGS...` with text output captured."""
    cmd = [sys.executable, "-m", "blocksnap"]
    if pool_path is not None:
        cmd += ["--pool", str(pool_path)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.pop("BLOCKSNAP_POOL", None)
    if env:
        full_env.update(env)
    res = subprocess.run(cmd, input=input, capture_output=True, env=full_env, timeout=timeout,
                         check=False)
    res.stdout = res.stdout.decode(errors="replace")
    res.stderr = res.stderr.decode(errors="replace")
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed with {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def assert_cli_error(res: subprocess.CompletedProcess, code: int = 1, *needles: str) -> str:
    """The error contract: exit code, exactly one stderr line `error: ...`, no traceback."""
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {res.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.fixture
def cli():
    return run_cli


def root_skip_reason(tools: list[str], why: str) -> str | None:
    """Why tests that need root, /dev/fuse and these tools cannot run here (or None)."""
    if os.geteuid() != 0:
        return f"needs root ({why})"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    missing = [c for c in tools if shutil.which(c) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def mark_root_dir(items, directory: str, reason: str | None) -> None:
    """Mark the tests under tests/<directory> as root tests, skipped with `reason`."""
    for item in items:
        if f"tests/{directory}" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def history_pool(path: Path, size: int = 24 << 20) -> Path:
    """A pool with ROW volume v and three snapshots: s1 (data), s2 (partial overwrites,
    zeros over data, a discard, new data), s3 (after a resize, data in the grown part)."""
    import random
    M = 1 << 20

    def rand(n: int, seed: int) -> bytes:
        return random.Random(seed).randbytes(n)

    with blocksnap.Pool.create(str(path), size=256 * M) as pool:
        v = pool.create_volume("v", size=size, block_size=64 << 10)
        v.write(0, rand(3 * M + 1000, 1))
        v.write(10 * M + 4096, rand(200_000, 2))
        v.write(20 * M, b"\xff" * 65536)
        v.snapshot("s1", labels={"why": "test"})
        v.write(1 * M + 512, rand(300_000, 3))      # partial blocks
        v.write(2 * M, bytes(M))                    # zeros over data
        v.discard(10 * M, 512 << 10)                # unmapped
        v.write(15 * M, rand(M, 4))                 # new data
        v.snapshot("s2")
        v.resize(size + 4 * M)
        v.write(size + M, rand(65536 + 7, 5))       # in the grown part
        v.snapshot("s3")
    return path
