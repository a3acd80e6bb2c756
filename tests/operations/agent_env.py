"""A pool, a password file and a policy for agent tests (plain helpers, not fixtures,
so test modules of their own can share them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blocksnap
from tests.conftest import run_cli

M = 1 << 20

# the repository most agent tests back up into ({tmp} and {pw}: see write_policy)
LOCAL_REPO = """\
[[repository]]
name = "local"
url = "file://{tmp}/repo"
password_file = "{pw}"
"""


def make_pool(path: Path, volumes: dict[str, int], seed: int = 1) -> Path:
    """A pool with ROW volumes of the given data sizes (random, incompressible)."""
    import random
    rnd = random.Random(seed)
    with blocksnap.Pool.create(str(path), size=2048 * M) as pool:
        for name, data in volumes.items():
            v = pool.create_volume(name, size=max(data, 16 * M) * 2, block_size=64 << 10)
            for off in range(0, data, 4 * M):
                v.write(off, rnd.randbytes(min(4 * M, data - off)))
    return path


def write_policy(tmp: Path, body: str) -> Path:
    (tmp / "pw").write_text("agent secret\n")
    p = tmp / "policy.toml"
    p.write_text(body.replace("{tmp}", str(tmp)).replace("{pw}", str(tmp / "pw")))
    return p


def jobs(pool: Path) -> list[dict]:
    res = run_cli(pool, "jobs", "--json", check=True)
    return json.loads(res.stdout)


def start_agent(pool: Path, policy: Path, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, **(extra_env or {}))
    env.pop("BLOCKSNAP_POOL", None)
    return subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(pool), "agent", "--policy",
                             str(policy)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_for(pred, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop_daemon(pool: Path) -> None:
    run_cli(pool, "stop", "--force")


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
