"""Generic pre/post/abort hooks: user commands with BLOCKSNAP_* in their environment."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

OUTPUT_TAIL = 2000  # characters of a failing hook's output kept in the record


def hook_env(phase: str, *, volume: str | None, snapshot: str | None, mountpoints: list[str],
             deadline: float, result: str | None = None, consistency: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSNAP_") or k == "BLOCKSNAP_POOL"}
    env.update({
        "BLOCKSNAP_PHASE": phase,
        "BLOCKSNAP_VOLUME": volume or "",
        "BLOCKSNAP_SNAPSHOT": snapshot or "",
        "BLOCKSNAP_MOUNTPOINTS": ":".join(mountpoints),
        "BLOCKSNAP_DEADLINE": f"{deadline:.3f}",
    })
    if result is not None:
        env["BLOCKSNAP_RESULT"] = result
    if consistency is not None:
        env["BLOCKSNAP_CONSISTENCY"] = consistency
    return env


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _tail(data: bytes | None) -> str:
    if not data:
        return ""
    return data.decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


def run_hook(command: str, *, kind: str, phase: str, shell: bool, timeout: float,
             env_kw: dict) -> dict:
    """Run one hook to completion or until `timeout`; returns its record entry.

    status: "ok" (exit 0), "failed" (non-zero exit or killed by a signal), "timeout"
    (killed, with its process group, at the deadline), "error" (could not be started).
    """
    entry: dict = {"kind": kind, "phase": phase, "target": command}
    deadline = time.time() + timeout
    env = hook_env(phase, deadline=deadline, **env_kw)
    t0 = time.monotonic()
    try:
        argv = ["/bin/sh", "-c", command] if shell else shlex.split(command)
        if not argv:
            raise ValueError("empty command")
    except ValueError as e:
        entry.update(status="error", ms=0.0, error=f"cannot parse command: {e}")
        return entry
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                close_fds=True)
    except OSError as e:
        entry.update(status="error", ms=round((time.monotonic() - t0) * 1000, 3),
                     error=f"cannot run {argv[0]}: {e.strerror}")
        return entry
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            out, _ = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # a grandchild left its own group holding the pipe
            proc.kill()
            out = b""
            if proc.stdout:
                proc.stdout.close()
            proc.wait()
    except BaseException:
        # interrupted (signal): do not leave the hook running
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        raise
    entry["ms"] = round((time.monotonic() - t0) * 1000, 3)
    entry["exit_code"] = proc.returncode
    if timed_out:
        entry.update(status="timeout", error=f"timed out after {timeout:g} s (killed)")
    elif proc.returncode == 0:
        entry["status"] = "ok"
    else:
        entry["status"] = "failed"
        if proc.returncode < 0:
            entry["error"] = f"killed by {_signame(-proc.returncode)}"
        else:
            entry["error"] = f"exit status {proc.returncode}"
    if entry["status"] != "ok":
        tail = _tail(out)
        if tail:
            entry["output"] = tail
            last = [ln for ln in tail.splitlines() if ln.strip()]
            if last:
                entry["error"] += f": {last[-1].strip()[:200]}"
    return entry
