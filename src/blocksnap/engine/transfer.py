"""Import of images/devices into ROW volumes and export of snapshots to raw images.

Holes stay holes both ways: import skips the source's holes (SEEK_DATA) and zero
blocks; export reads only blocks a snapshot maps and leaves zero blocks unwritten
in a sparse output file.
"""
from __future__ import annotations

import os
import stat
from typing import Callable, Iterator

from ..errors import AlreadyExists, InvalidArgument
from ..store import FileStore, device_size
from .blockio import mask_runs, nonzero_blocks

CHUNK = 8 << 20
Progress = Callable[[int, int], None] | None


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of a file that may hold data."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        yield start, min(end, size) - start
        off = end


def import_image(pool, name: str, source: str, block_size: int, progress: Progress = None):
    size = device_size(source)
    if size == 0 or size % 512:
        raise InvalidArgument(f"{source}: size {size} is not a positive multiple of 512")
    src = FileStore(source, writable=False)
    vol = pool.create_volume(name, size=size, mode="row", block_size=block_size)
    try:
        extents = [(0, size)] if src.is_device else list(_data_extents(src.fd, size))
        bs = block_size
        for start, length in extents:
            a = start - start % bs
            end = min(size, -(-(start + length) // bs) * bs)
            for off in range(a, end, CHUNK):
                n = min(CHUNK, end - off)
                data = src.pread(n, off)
                padded = len(data) + (-len(data)) % bs
                buf = data if padded == len(data) else data + bytes(padded - len(data))
                nz = nonzero_blocks(buf, padded // bs, bs)
                for s, c in mask_runs(nz):
                    lo = off + s * bs
                    hi = min(off + (s + c) * bs, size)
                    vol.write(lo, memoryview(data)[lo - off:hi - off])
                if progress:
                    progress(min(off + n, size), size)
        vol.flush()
    except BaseException:
        try:
            pool.delete_volume(name)
        finally:
            src.close()
        raise
    src.close()
    if progress:
        progress(size, size)
    return vol


def export_snapshot(snap, output: str, progress: Progress = None, force: bool = False) -> dict[str, int]:
    """Write the snapshot to `output` (new sparse file, or an existing block device)."""
    vol = snap.volume
    bs = vol.block_size
    is_dev = os.path.exists(output) and stat.S_ISBLK(os.stat(output).st_mode)
    if os.path.exists(output) and not is_dev and not force:
        raise AlreadyExists(f"{output}: exists", param="force")
    if is_dev and device_size(output) < snap.size:
        raise InvalidArgument(f"{output}: device is smaller than the snapshot ({snap.size} bytes)")
    target = output if is_dev else f"{output}.blocksnap-partial"
    out = FileStore(target, create_size=0 if not is_dev else None)
    written = 0
    try:
        if not is_dev:
            os.ftruncate(out.fd, 0)
            os.ftruncate(out.fd, snap.size)
        # a device's old content must be overwritten, zeros included
        extents = [(0, snap.size)] if is_dev else snap.data_extents()
        for start, total in extents:
            for off in range(start, start + total, CHUNK):
                length = min(CHUNK, start + total - off)
                data = snap.read(off, length)
                if is_dev:
                    out.pwrite(data, off)
                    written += length
                else:
                    padded = data + bytes((-len(data)) % bs)
                    nz = nonzero_blocks(padded, len(padded) // bs, bs)
                    for rs, rc in mask_runs(nz):
                        lo, hi = rs * bs, min((rs + rc) * bs, length)
                        out.pwrite(memoryview(data)[lo:hi], off + lo)
                        written += hi - lo
                if progress:
                    progress(off + length, snap.size)
        out.sync()
        out.close()
        if not is_dev:
            os.replace(target, output)
    except BaseException:
        out.close()
        if not is_dev:
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass
        raise
    if progress:
        progress(snap.size, snap.size)
    return {"size": snap.size, "written": written}

