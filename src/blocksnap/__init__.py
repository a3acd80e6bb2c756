"""blocksnap: block-level snapshots for volumes and VM images.

    import blocksnap
    with blocksnap.Pool.create(path) as pool:
        vol = pool.create_volume("vm1", size=10 << 30)
"""
from .engine import Pool, Snapshot
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

__all__ = ["Pool", "Snapshot", "BlocksnapError", "AlreadyExists", "Busy", "CorruptionError",
           "InvalidArgument", "NotAPool", "NotFound", "OutOfSpace"]
__version__ = "0.1.0"
