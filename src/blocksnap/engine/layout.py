"""Constants of the on-disk format, shared by every engine module."""
from __future__ import annotations

FORMAT_VERSION = 1
UNIT = 4096                    # allocation unit of the data store
HEADER_UNITS = 256             # first 1 MiB of the data store: header, never allocated
PAGE_ENTRIES = 1024            # entries per map page (leaf or interior)
HOLE = 0                       # leaf entry: never written / discarded (reads zeros);
                               # in a COW snapshot map: "unchanged since, look newer"
ZERO = 1                       # leaf entry: explicitly zero (COW copy of a zero block)
DATA_MAGIC = b"BLOCKSNAP-DATA\x00\x01"
KIND_INTERIOR = 1
KIND_LEAF = 2
