"""The engine: pool, volumes, snapshots, block maps and their crash-safe commit.

Its declared public surface is what this module exports; streams, backup, FUSE and
the service use nothing else of it (tests/engine/test_surface.py checks that no
engine module imports another in a cycle and that code outside reaches no
underscore name of the engine):

- Pool: create/open a pool; it owns the registry of volumes (create_volume,
  clone_snapshot, import_volume, delete_volume, volume, volumes, has_volume), the
  lock that serialises engine calls, commit(), status() and check().
- Volume: the protocol every volume kind satisfies (engine/api.py).
- Snapshot: a read-only handle (read, data_extents, export, clone, delete).
- JobLog / JobRow: the job history the agent keeps in the catalog (pool.jobs).
- scrub, CONSISTENCY, and the two mask helpers streams and backups share.
"""
from .api import Volume
from .blockio import mask_runs, nonzero_blocks
from .catalog import CONSISTENCY
from .check import scrub
from .job_log import JobLog, JobRow
from .pool import Pool
from .snapshot import Snapshot

__all__ = ["CONSISTENCY", "JobLog", "JobRow", "Pool", "Snapshot", "Volume", "mask_runs", "nonzero_blocks", "scrub"]
