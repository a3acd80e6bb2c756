"""Parsing of sizes and names as the command line and API accept them."""
from __future__ import annotations

import re

from .errors import InvalidArgument

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 64 << 10


def validate_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit")
    return name


def parse_size(text: str | int) -> int:
    """'512', '64K', '10G', '1T' (binary multiples) -> bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"invalid size {text}: must not be negative")
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise InvalidArgument(f"invalid size {text!r}: use a number with an optional K, M, G, T suffix")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def format_size(n: int) -> str:
    """Human size with binary units: 4G, 3.99G, 64K, 512."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def validate_block_size(bs: int) -> int:
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise InvalidArgument(f"invalid block size {bs}: must be a power of two from 4K to 1M")
    return bs


def split_snapshot_ref(ref: str) -> tuple[str, str]:
    """'vm1@s1' -> ('vm1', 's1'), both validated."""
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise InvalidArgument(f"invalid snapshot {ref!r}: expected VOLUME@NAME")
    vol, snap = ref.split("@")
    return validate_name(vol, "volume name"), validate_name(snap, "snapshot name")


def split_snapshot_pair(a: str, b: str | None, what: str) -> tuple[str, str, str | None]:
    """'vm1@s1', 'vm1@s2' -> ('vm1', 's1', 's2'): two snapshots of one volume (b optional)."""
    vol, na = split_snapshot_ref(a)
    if b is None:
        return vol, na, None
    vb, nb = split_snapshot_ref(b)
    if vb != vol:
        raise InvalidArgument(f"cannot {what} snapshots of different volumes ({vol} and {vb})")
    return vol, na, nb
