"""A snapshot handle: read-only view, clone, delete, export, metadata.

A handle names one catalog row of its volume; what it does to the pool (a clone
registers a new volume) goes through the pool, which owns that.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import Busy, InvalidArgument
from .catalog import CONSISTENCY, SnapshotRow
from .transfer import export_snapshot

if TYPE_CHECKING:
    from .volume_base import VolumeBase


class Snapshot:
    def __init__(self, volume: "VolumeBase", row: SnapshotRow):
        self.volume = volume
        self.row = row

    # -- metadata -------------------------------------------------------------
    name = property(lambda self: self.row.name)
    created = property(lambda self: self.row.created)
    size = property(lambda self: self.row.size)
    labels = property(lambda self: dict(self.row.labels))
    consistency = property(lambda self: self.row.consistency)
    hooks = property(lambda self: dict(self.row.hooks))

    @property
    def ref(self) -> str:
        return f"{self.volume.name}@{self.row.name}"

    def __repr__(self) -> str:
        return f"<Snapshot {self.ref}>"

    def _check(self) -> None:
        self.volume._check()
        if self.row not in self.volume.snapshot_rows:
            raise Busy(f"snapshot {self.ref} was deleted")

    @property
    def seq(self) -> int:
        """Order of creation within the volume (a larger seq is newer)."""
        return self.row.seq

    def info(self) -> dict[str, Any]:
        return {
            "volume": self.volume.name, "name": self.name, "ref": self.ref,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "size": self.size, "block_size": self.volume.block_size, "mode": self.volume.mode,
            "consistency": self.consistency, "labels": self.labels, "hooks": self.hooks,
            "seq": self.row.seq,
        }

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) byte ranges that may hold data, from the maps alone; the
        rest of the snapshot reads as zeros. Clipped to the snapshot's size."""
        vol = self.volume
        bs = vol.block_size
        with vol.pool.lock:
            self._check()
            return [(s * bs, min(c * bs, self.size - s * bs)) for s, c in vol._snap_runs(self.row)]

    # -- data -----------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return self.volume._snap_read(self.row, offset, length, self._check)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset` (the FUSE read path: no allocation per request)."""
        self.volume._snap_read(self.row, offset, len(out), self._check, out)

    def export(self, output: str, progress: Callable[[int, int], None] | None = None,
               force: bool = False) -> dict[str, int]:
        return export_snapshot(self, output, progress, force)

    def set_metadata(self, *, consistency: str | None = None, hooks: dict | None = None,
                     labels: dict | None = None) -> None:
        """Record what the freeze hooks did, after the snapshot exists."""
        with self.volume.pool.lock:
            self._check()
            if consistency is not None:
                if consistency not in CONSISTENCY:
                    raise InvalidArgument(f"invalid consistency {consistency!r}")
                self.row.consistency = consistency
            if hooks is not None:
                self.row.hooks = dict(hooks)
            if labels is not None:
                self.row.labels = dict(labels)
            self.volume.pool.commit(snapshots=[self.row])

    # -- lifecycle --------------------------------------------------------------
    def delete(self) -> None:
        with self.volume.pool.lock:
            self._check()
            self.volume.pool.direct.revoke_all()   # (a COW volume's newest snapshot may change)
            self.volume._delete_snapshot(self.row)

    def clone(self, name: str, progress: Callable[[int, int], None] | None = None):
        """A new writable ROW volume with this snapshot's content, sharing its blocks."""
        return self.volume.pool.clone_snapshot(self, name, progress)
