"""One backup: what it is (JSON) and, for every chunk of the volume, its chunk ID.

Every manifest is whole: restore needs this one object and the packs it names,
never an earlier backup. Layout before sealing: u32 JSON length, JSON, then
`chunks` IDs of ID_BYTES each (ZERO_ID for a chunk of zeros), zstd-compressed.
"""
from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from ..errors import CorruptionError
from .crypto import ID_BYTES

_LEN = struct.Struct("<I")


@dataclass
class Manifest:
    info: dict[str, Any]
    ids: np.ndarray = field(repr=False)     # (chunks, ID_BYTES) uint8

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def volume(self) -> str:
        return self.info["source"]["volume"]

    @property
    def group(self) -> tuple[str, str, str]:
        """Whose backup this is: host, pool path, volume. Incremental bases and
        retention never mix two pools' volumes that share a name."""
        return (self.info.get("host", ""), self.info.get("pool", ""), self.volume)

    def encode(self) -> bytes:
        body = json.dumps(self.info, sort_keys=True).encode()
        return zstandard.ZstdCompressor(level=3).compress(_LEN.pack(len(body)) + body + self.ids.tobytes())

    @classmethod
    def decode(cls, raw: bytes, what: str) -> "Manifest":
        try:
            plain = zstandard.ZstdDecompressor().decompress(raw)
            (n,) = _LEN.unpack_from(plain)
            info = json.loads(plain[4:4 + n])
            ids = np.frombuffer(plain[4 + n:], np.uint8).reshape(-1, ID_BYTES)
        except (zstandard.ZstdError, struct.error, ValueError):
            raise CorruptionError(f"{what} is damaged") from None
        if len(ids) != info.get("chunks"):
            raise CorruptionError(f"{what} is damaged (chunk count)")
        return cls(info, ids)


def new_backup_id(now: float | None = None) -> str:
    """Sortable by time, unique without coordination: 20261126T054200Z-3fa9c1."""
    t = time.gmtime(now if now is not None else time.time())
    return time.strftime("%Y%m%dT%H%M%SZ", t) + "-" + os.urandom(3).hex()


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)
