"""Talking to the pool's daemon over its Unix socket (the daemon side lives with serve)."""
from __future__ import annotations

import os
from typing import Any

SOCKET_NAME = "daemon.sock"
NOT_RUNNING = object()


def socket_path(pool_path: str) -> str:
    return os.path.join(os.path.abspath(pool_path), SOCKET_NAME)


def try_remote(pool_path: str, op: str, args: dict[str, Any]) -> Any:
    """Run `op` in the pool's daemon if one serves it; NOT_RUNNING otherwise."""
    return NOT_RUNNING
