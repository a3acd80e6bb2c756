"""What every volume kind shares: identity, bounds, the snapshot catalog, reporting.

The subclass contract (ROW in row.py, COW in cow.py) is the abstract methods below:
live I/O, and the snapshot operations the public methods here call under the pool
lock. Defaults cover what only some kinds need (origin sync, moved snapshot roots).
Creating, registering and deleting a volume is the pool's job (pool.py); a volume
reaches its pool only through the attribute it was built with.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..units import validate_name
from .blockio import mask_runs
from .catalog import CONSISTENCY, SnapshotRow, VolumeRow
from .layout import UNIT
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .pool import Pool


class VolumeBase(ABC):
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
    def _extents(runs, bs: int, size: int) -> list[dict[str, int]]:
        """Byte extents of block runs: a boolean mask, or (start, count) pairs."""
        if isinstance(runs, np.ndarray):
            runs = mask_runs(runs)
        out = []
        for start, count in runs:
            off = start * bs
            out.append({"offset": off, "length": min(count * bs, size - off)})
        return out

    # -- snapshots (public) --------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        with self.pool.lock:
            self._check()
            return [Snapshot(self, s) for s in self.snapshot_rows]

    def get_snapshot(self, name: str) -> Snapshot:
        with self.pool.lock:
            self._check()
            return Snapshot(self, self._srow(name))

    def snapshot(self, name: str, labels: dict[str, str] | None = None,
                 consistency: str = "crash", hooks: dict[str, Any] | None = None) -> Snapshot:
        """Atomic: holds every write completed before the call; durable on return."""
        with self.pool.lock:
            self._check()
            self.pool.direct.revoke_all()   # (the blocks it shares are no one's to write in place)
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
            self.pool.direct.revoke_all()
            self._rollback(self._srow(name))

    def info(self) -> dict[str, Any]:
        with self.pool.lock:
            return {
                "name": self.name, "mode": self.mode, "size": self.size,
                "block_size": self.block_size, "origin": self.origin, "created": self.created,
                "snapshots": [s.name for s in self.snapshot_rows],
                "allocated": self._allocated_bytes(),
            }

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow the volume, or with shrink=True cut it (the data past `size` is lost:
        never without the caller saying so, as with qemu-img resize --shrink)."""
        with self.pool.lock:
            self._check()
            if size <= 0 or size % 512:
                raise InvalidArgument(f"invalid volume size {size}: must be a positive multiple of 512")
            if size < self.size and not shrink:
                raise InvalidArgument(f"{size} bytes is smaller than volume {self.name} ({self.size} bytes): "
                                      "shrinking drops the data past the new end", param="shrink")
            if size != self.size:
                self._resize(size)
                self.pool.direct.revoke_all()   # (direct requests see the new size)

    def update_extra(self, changes: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> None:
        """Set and remove keys of the volume's free-form info (streams record what was
        received there), durably."""
        with self.pool.lock:
            self._check()
            extra = {k: v for k, v in self.extra.items() if k not in drop}
            extra.update(changes or {})
            self.extra = extra
            self.pool.commit(volumes=[self])

    def delete(self, recursive: bool = False) -> None:
        self.pool.delete_volume(self.name, recursive)

    # -- defaults a kind may override ----------------------------------------
    def _sync_origin(self) -> None:  # noqa: B027 - a default, not part of the contract
        """Make writes to data outside the pool durable (COW origins)."""

    def _dirty_snapshot_rows(self) -> list[SnapshotRow]:
        """Snapshot rows whose map root moved since the last commit."""
        return []

    def _close(self) -> None:  # noqa: B027 - a default, not part of the contract
        """Release what the volume holds open (COW origins)."""

    # -- the contract of a volume kind -----------------------------------------
    @abstractmethod
    def row(self) -> VolumeRow:
        """The catalog row that describes the volume now."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def read_into(self, offset: int, out: memoryview) -> None: ...

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def discard(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def _resize(self, size: int) -> None:
        """Change the size (checked by resize(): a positive multiple of 512, and
        consent given to a shrink)."""

    @abstractmethod
    def _create_snapshot(self, name: str, labels: dict | None, consistency: str,
                         hooks: dict | None) -> SnapshotRow:
        """Make the snapshot durable and add its row to snapshot_rows."""

    @abstractmethod
    def _snap_read(self, srow: SnapshotRow, offset: int, length: int,
                   check: Callable[[], None] = lambda: None, out: memoryview | None = None) -> bytes | None:
        """A snapshot's bytes; `check` runs under the lock before the map is read."""

    @abstractmethod
    def _snap_runs(self, srow: SnapshotRow) -> Iterator[tuple[int, int]]:
        """(first block, count) runs that may hold data in the snapshot, in order;
        the rest are holes. Found from the maps, one leaf at a time."""

    @abstractmethod
    def _delete_snapshot(self, srow: SnapshotRow) -> None: ...

    @abstractmethod
    def _rollback(self, srow: SnapshotRow) -> None: ...

    @abstractmethod
    def _clone_into(self, srow: SnapshotRow, clone: "VolumeBase",
                    progress: Callable[[int, int], None] | None = None) -> None:
        """Give the empty ROW volume `clone` the snapshot's content (sharing blocks);
        on failure leave the pool as it was."""

    @abstractmethod
    def _diff(self, ra: SnapshotRow, rb: SnapshotRow | None) -> list[dict[str, int]]: ...

    @abstractmethod
    def _allocated_bytes(self) -> int: ...

    @abstractmethod
    def _drop_all(self) -> None:
        """Give back every map reference of the volume and its snapshots (delete)."""
