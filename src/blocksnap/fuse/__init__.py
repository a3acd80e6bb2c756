"""FUSE export of a pool: live volumes read-write, every snapshot read-only.

mfusepy picks libfuse2 unless told otherwise, and libfuse2 caps requests at
128 KiB; libfuse3 lets us ask for 1 MiB writes. So the library name is set here,
before anything imports mfusepy.
"""
from __future__ import annotations

import os

# mfusepy's own variable, not a blocksnap setting (those are read in settings.py),
# and the one place blocksnap changes its environment. It must run before mfusepy
# is imported: above the imports of fs.py and mount.py, the only modules that
# import mfusepy (any other must import it through this package too).
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

from .fs import BlocksnapFS
from .mount import run_fuse

__all__ = ["BlocksnapFS", "run_fuse"]
