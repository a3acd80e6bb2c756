"""Picks the volume class for a catalog row; the one place that knows both kinds."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import SnapshotRow, VolumeRow
from .cow import CowVolume
from .row import RowVolume
from .volume_base import VolumeBase

if TYPE_CHECKING:
    from .pool import Pool

KINDS: dict[str, type[VolumeBase]] = {"row": RowVolume, "cow": CowVolume}


def build_volume(pool: "Pool", row: VolumeRow, snaps: list[SnapshotRow]) -> VolumeBase:
    return KINDS[row.mode](pool, row, snaps)
