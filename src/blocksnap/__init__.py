"""blocksnap: block-level snapshots for volumes and VM images.

    import blocksnap
    with blocksnap.Pool.create(path) as pool:
        vol = pool.create_volume("vm1", size=10 << 30)

`Pool` and `Snapshot` load the engine (and numpy) when first used, so a command
that needs neither, or that starts work of its own first (a backup unlocks its
repository while the engine loads), does not wait for them.
"""
import os as _os
from typing import TYPE_CHECKING, Any

from .errors import (
                     AlreadyExists,
                     BlocksnapError,
                     Busy,
                     CorruptionError,
                     InvalidArgument,
                     NotAPool,
                     NotFound,
                     OutOfSpace,
)

# blocksnap does no linear algebra, but numpy loads OpenBLAS, whose threads (one per
# core) spin when they start: on a 2-core host that took a core from every short
# command (a cold incremental backup: 0.68 s -> 0.63 s, docs/performance.md). A
# value the user set is kept; it must be set before numpy is first imported.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
    from .engine import Pool, Snapshot

__all__ = ["Pool", "Snapshot", "BlocksnapError", "AlreadyExists", "Busy", "CorruptionError",
           "InvalidArgument", "NotAPool", "NotFound", "OutOfSpace"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """PEP 562: the engine's classes, imported on first use."""
    if name in ("Pool", "Snapshot"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'blocksnap' has no attribute {name!r}")
