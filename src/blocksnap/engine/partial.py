"""Contents of fresh blocks that were last written in part.

The loop device cuts a 1 MiB write into two requests (512 KiB worth of pages
each), and the cut rarely falls on a block boundary: the block it falls in is
written by both requests, one after the other, in the same transaction. Keeping
the merged content the first request made lets the second write its own bytes
in place and checksum the block without reading it back, as qcow2 does with a
cluster allocated by the first half.

Only fresh blocks are kept (allocated since the last commit, referenced by no
committed metadata): they alone are overwritten in place, and they are not
reusable before the next commit, which drops every entry. So while an entry
exists, it is exactly what the data store holds at that address, as long as every
in-place write to a fresh block updates or drops it (the ROW write path does).
"""
from __future__ import annotations


class PartialBlocks:
    """A small cache: data-store unit of a fresh block -> its whole content."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._blocks: dict[int, bytearray] = {}
        self._spare: list[bytearray] = []

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, unit: int) -> bytearray | None:
        return self._blocks.get(unit)

    def buffer(self, size: int) -> bytearray:
        """A block buffer, contents undefined (reused: fresh memory is slow to touch)."""
        while self._spare:
            buf = self._spare.pop()
            if len(buf) == size:
                return buf
        return bytearray(size)

    def put(self, unit: int, buf: bytearray) -> None:
        old = self._blocks.pop(unit, None)
        if old is not None and old is not buf:
            self.recycle(old)
        self._blocks[unit] = buf
        while len(self._blocks) > self.keep:
            self.recycle(self._blocks.pop(next(iter(self._blocks))))

    def drop(self, unit: int) -> None:
        buf = self._blocks.pop(unit, None)
        if buf is not None:
            self.recycle(buf)

    def drop_units(self, units) -> None:
        """Drop every cached block among `units` (an array: looks at the cache, which
        is small, not at each unit)."""
        if self._blocks:
            wanted = set(units.tolist())
            for unit in [u for u in self._blocks if u in wanted]:
                self.drop(unit)

    def recycle(self, buf: bytearray) -> None:
        if len(self._spare) < 8:
            self._spare.append(buf)

    def clear(self) -> None:
        """A commit happened: nothing is fresh any more."""
        for buf in self._blocks.values():
            self.recycle(buf)
        self._blocks.clear()
