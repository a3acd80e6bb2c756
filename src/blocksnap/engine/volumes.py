"""Picks the volume class for a catalog row; the one place that knows both kinds."""
from __future__ import annotations

from .catalog import SnapshotRow, VolumeRow
from .cow import CowVolume
from .row import RowVolume

Volume = RowVolume | CowVolume


def build_volume(pool, row: VolumeRow, snaps: list[SnapshotRow]) -> Volume:
    cls = CowVolume if row.mode == "cow" else RowVolume
    return cls(pool, row, snaps)


def delete_volume(pool, name: str, recursive: bool = False) -> None:
    """Drop a volume (and, with recursive, its snapshots). A cow origin is left as is."""
    from ..errors import Busy
    with pool.lock:
        vol = pool.volume(name)
        if vol.snapshot_rows and not recursive:
            raise Busy(f"volume {name!r} has {len(vol.snapshot_rows)} snapshot(s): "
                       "delete them first or use --recursive")
        vol._drop_all()
        deleted = [(name, s.name) for s in vol.snapshot_rows]
        del pool.volumes_by_name[name]
        vol.deleted = True
        vol._close()
        pool.commit(deleted_volumes=[name], deleted_snapshots=deleted)
