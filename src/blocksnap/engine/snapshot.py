"""A snapshot handle: read-only view, clone, delete, export, metadata."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import Busy
from ..units import validate_name
from .catalog import SnapshotRow, VolumeRow
from .radix import levels_for

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

    def info(self) -> dict[str, Any]:
        return {
            "volume": self.volume.name, "name": self.name, "ref": self.ref,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "size": self.size, "block_size": self.volume.block_size, "mode": self.volume.mode,
            "consistency": self.consistency, "labels": self.labels, "hooks": self.hooks,
            "seq": self.row.seq,
        }

    # -- data -----------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return self.volume._snap_read(self.row, offset, length, self._check)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset` (the FUSE read path: no allocation per request)."""
        self.volume._snap_read(self.row, offset, len(out), self._check, out)

    def export(self, output: str, progress: Callable[[int, int], None] | None = None,
               force: bool = False) -> dict[str, int]:
        from .transfer import export_snapshot
        return export_snapshot(self, output, progress, force)

    def set_metadata(self, *, consistency: str | None = None, hooks: dict | None = None,
                     labels: dict | None = None) -> None:
        """Record what the freeze hooks did, after the snapshot exists."""
        from ..errors import InvalidArgument
        from .volume_base import CONSISTENCY
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
            self.volume._delete_snapshot(self.row)

    def clone(self, name: str, progress: Callable[[int, int], None] | None = None):
        """A new writable ROW volume with this snapshot's content, sharing its blocks."""
        from .volumes import build_volume
        vol = self.volume
        pool = vol.pool
        validate_name(name, "volume name")
        with pool.lock:
            self._check()
            if name in pool.volumes_by_name:
                from ..errors import AlreadyExists
                raise AlreadyExists(f"volume {name!r} already exists")
            nblocks = -(-self.size // vol.block_size)
            row = VolumeRow(name=name, mode="row", size=self.size, block_size=vol.block_size,
                            origin=None, root=0, levels=levels_for(nblocks), created=time.time(),
                            info={"cloned_from": self.ref})
            row = vol._clone_into(self.row, row, progress)
            new = build_volume(pool, row, [])
            pool.volumes_by_name[name] = new
            pool.commit(volumes=[new])
            return new
