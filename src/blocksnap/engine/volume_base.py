"""What every volume kind shares: identity, bounds, the snapshot catalog, reporting."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..units import validate_name
from .blockio import mask_runs
from .catalog import SnapshotRow, VolumeRow
from .layout import UNIT

if TYPE_CHECKING:
    from .pool import Pool
    from .snapshot import Snapshot

CONSISTENCY = ("crash", "filesystem", "application")


class VolumeBase:
    mode = "?"

    def __init__(self, pool: "Pool", row: VolumeRow, snaps: list[SnapshotRow]):
        self.pool = pool
        self.name = row.name
        self.size = row.size
        self.block_size = row.block_size
        self.units = row.block_size // UNIT
        self.origin = row.origin
        self.created = row.created
        self.extra = dict(row.info)
        self.snapshot_rows: list[SnapshotRow] = sorted(snaps, key=lambda s: s.seq)
        self.deleted = False

    # -- helpers ------------------------------------------------------------
    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    def _check(self) -> None:
        self.pool._check_open()
        if self.deleted:
            raise NotFound(f"volume {self.name!r} was deleted")

    def _bounds(self, offset: int, length: int, size: int | None = None) -> None:
        size = self.size if size is None else size
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        if offset + length > size:
            raise InvalidArgument(f"range {offset}+{length} is past the end of {self.name} ({size} bytes)")

    def _srow(self, name: str) -> SnapshotRow:
        for s in self.snapshot_rows:
            if s.name == name:
                return s
        validate_name(name, "snapshot name")
        raise NotFound(f"no snapshot {self.name}@{name}")

    def _new_srow(self, name: str, labels: dict | None, consistency: str, hooks: dict | None,
                  root: int, levels: int) -> SnapshotRow:
        validate_name(name, "snapshot name")
        if consistency not in CONSISTENCY:
            raise InvalidArgument(f"invalid consistency {consistency!r}")
        if any(s.name == name for s in self.snapshot_rows):
            raise AlreadyExists(f"snapshot {self.name}@{name} already exists")
        labels = dict(labels or {})
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k:
                raise InvalidArgument(f"invalid label {k!r}={v!r}")
        seq = (self.snapshot_rows[-1].seq + 1) if self.snapshot_rows else 1
        return SnapshotRow(volume=self.name, name=name, seq=seq, created=time.time(),
                           size=self.size, root=root, levels=levels, consistency=consistency,
                           labels=labels, hooks=dict(hooks or {}))

    @staticmethod
    def _extents(mask: np.ndarray, bs: int, size: int) -> list[dict[str, int]]:
        out = []
        for start, count in mask_runs(mask):
            off = start * bs
            out.append({"offset": off, "length": min(count * bs, size - off)})
        return out

    # -- snapshots (public) --------------------------------------------------
    def snapshots(self) -> list["Snapshot"]:
        from .snapshot import Snapshot
        with self.pool.lock:
            self._check()
            return [Snapshot(self, s) for s in self.snapshot_rows]

    def get_snapshot(self, name: str) -> "Snapshot":
        from .snapshot import Snapshot
        with self.pool.lock:
            self._check()
            return Snapshot(self, self._srow(name))

    def snapshot(self, name: str, labels: dict[str, str] | None = None,
                 consistency: str = "crash", hooks: dict[str, Any] | None = None) -> "Snapshot":
        """Atomic: holds every write completed before the call; durable on return."""
        from .snapshot import Snapshot
        with self.pool.lock:
            self._check()
            srow = self._create_snapshot(name, labels, consistency, hooks)
            return Snapshot(self, srow)

    def diff(self, a: str, b: str | None = None) -> list[dict[str, int]]:
        """Extents that differ between snapshot a and snapshot b (or the live volume)."""
        with self.pool.lock:
            self._check()
            ra = self._srow(a)
            rb = self._srow(b) if b is not None else None
            return self._diff(ra, rb)

    def rollback(self, name: str) -> None:
        with self.pool.lock:
            self._check()
            self._rollback(self._srow(name))

    def info(self) -> dict[str, Any]:
        with self.pool.lock:
            return {
                "name": self.name, "mode": self.mode, "size": self.size,
                "block_size": self.block_size, "origin": self.origin, "created": self.created,
                "snapshots": [s.name for s in self.snapshot_rows],
                "allocated": self._allocated_bytes(),
            }

    def _sync_origin(self) -> None:
        pass

    def _dirty_snapshot_rows(self) -> list[SnapshotRow]:
        return []

    def _close(self) -> None:
        pass

    def delete(self, recursive: bool = False) -> None:
        from .volumes import delete_volume
        delete_volume(self.pool, self.name, recursive)
