"""A repository's storage opened and its key unlocked, without numpy or the engine.

A backup command starts this on a thread as soon as it runs: the key derivation
(scrypt, about 0.08 s of CPU that releases the GIL) then overlaps the imports and
the opening of the pool instead of following them (docs/performance.md, "Backups").
`Repository.open` is this followed by the Repository around it.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from ..errors import NotFound
from .backends import Backend, open_backend
from .crypto import Keys, parse_config


def open_access(url: str, password: Callable[[bool], bytes], endpoint: str | None = None,
                create: bool = False) -> tuple[Backend, Keys, dict, bool]:
    """(backend, keys, config, created): the repository at url, unlocked; created first
    (if asked) when there is none. `password(new)` is asked once, knowing whether the
    repository is new."""
    backend = open_backend(url, endpoint)
    try:
        raw = backend.get("config")
    except NotFound:
        if not create:
            raise NotFound(f"no blocksnap repository at {url}") from None
        keys, config = Keys.create(password(True), os.urandom(16).hex())
        if backend.put_new("config", json.dumps(config, indent=1).encode()):
            return backend, keys, config, True
        raw = backend.get("config")   # another process made it first: use theirs
    config = parse_config(raw, url)
    return backend, Keys.unlock(config, password(False), url), config, False
