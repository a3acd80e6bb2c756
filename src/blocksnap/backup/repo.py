"""A backup repository: config, packs of sealed chunks, their indexes, manifests, locks.

    config              plain JSON: format, version, id, scrypt parameters, wrapped key
    data/<pack>         sealed chunks back to back (each: nonce, AES-GCM of flag+payload)
    index/<pack>        sealed: which chunk IDs the pack holds, at which offsets
    index/-merged-<id>  sealed: the same for many packs (backup/index_files.py)
    backups/<id>        sealed manifests, one per backup
    locks/<id>          plain JSON: who is writing (backup) or deleting (prune)

Objects are written in that order of dependence: a pack, then its index, then the
manifest that uses it (a merged index is written before the ones it replaces are
deleted). A backup cut short leaves packs no manifest names, which
`prune` deletes; it never leaves a manifest naming a chunk that is not stored.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Callable, Iterator

import numpy as np
import zstandard

from ..errors import BlocksnapError, Busy, CorruptionError, InvalidArgument, NotFound
from . import index_files
from .access import open_access
from .backends import Backend
from .chunk_index import ChunkIndex
from .crypto import ID_BYTES, Keys
from .manifest import Manifest

PACK_TARGET = 16 << 20      # bytes of sealed chunks per pack object
RAW, ZSTD = 0, 1            # first byte of a chunk's plaintext
WRITERS = ("backup", "copy-to")   # lock operations that add packs (and so merge indexes at start)


class Repository:
    def __init__(self, backend: Backend, keys: Keys, config: dict):
        self.backend, self.keys, self.config = backend, keys, config
        self.url = backend.url
        self.index = ChunkIndex()     # chunk ID -> (pack, offset, length), after load_index
        self._local = threading.local()    # zstd contexts are not thread-safe: one per thread
        self._held: str | None = None       # the operation of the lock this process holds
        self.written: list[index_files.Part] = []   # packs write_pack stored, each with a loose index

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, url: str, password: Callable[[bool], bytes], endpoint: str | None = None,
             create: bool = False) -> tuple["Repository", bool]:
        """The repository at url, unlocked; created first (if asked) when there is none.
        `password(new)` is asked once, knowing whether the repository is new."""
        backend, keys, config, created = open_access(url, password, endpoint, create)
        return cls(backend, keys, config), created

    # -- chunks --------------------------------------------------------------
    def chunk_blob(self, cid: bytes, data: bytes | memoryview) -> bytes:
        packed = self._compressor().compress(data)
        plain = bytes([ZSTD]) + packed if len(packed) < len(data) else bytes([RAW]) + bytes(data)
        return self.keys.seal(plain, b"chunk:" + cid)

    def _compressor(self) -> zstandard.ZstdCompressor:
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(level=3)
        return zc

    def open_chunk(self, cid: bytes, blob: bytes | memoryview, what: str) -> bytes:
        plain = self.keys.open(blob, b"chunk:" + cid, what)
        try:
            data = zstandard.ZstdDecompressor().decompress(plain[1:]) if plain[0] == ZSTD else plain[1:]
        except zstandard.ZstdError:
            raise CorruptionError(f"{what} does not decompress") from None
        if self.keys.chunk_id(data) != cid:
            raise CorruptionError(f"{what} does not match its ID")
        return data

    def load_index(self) -> int:
        """Read every index object: which chunks the repository holds, and where.
        index_files.READERS objects at a time (on S3 each is a round trip); merged
        indexes make that a few objects for many packs. Under a backup's lock,
        more than index_files.LOOSE_MAX loose (one-pack) indexes are merged first
        (a copy into this repository does the same)."""
        objects = index_files.read_all(self)
        if self._held in WRITERS:
            merge = index_files.to_merge(objects)
            if merge:     # the same packs after as before: the index is built from what was read
                index_files.merge(self, objects, merge)
        self.index = index_files.chunk_index(objects)
        return len(self.index)

    def read_index(self, pack: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pack's own (loose) index: ids, offsets, lengths."""
        o = index_files.read_object(self, pack)
        return o.ids, o.offs, o.lens

    def put_pack(self, blobs: list[tuple[bytes, bytes]]) -> index_files.Part:
        """Store sealed chunks as one pack, without an index: (name, ids, offsets, lengths)."""
        pack = os.urandom(16).hex()
        offs = np.cumsum([0] + [len(b) for _, b in blobs[:-1]], dtype=np.uint64)
        lens = np.array([len(b) for _, b in blobs], np.uint32)
        self.backend.put(f"data/{pack}", b"".join(b for _, b in blobs))
        ids = np.frombuffer(b"".join(c for c, _ in blobs), np.uint8).reshape(-1, ID_BYTES)
        return pack, ids, offs, lens

    def write_pack(self, blobs: list[tuple[bytes, bytes]]) -> str:
        """Store sealed chunks as one pack, then its index; returns the pack's name."""
        pack, ids, offs, lens = self.put_pack(blobs)
        index = index_files.encode_loose(ids.tobytes(), offs, lens)
        self.backend.put(f"index/{pack}", self.keys.seal(index, f"index/{pack}".encode()))
        self.index.add(pack, [c for c, _ in blobs], offs.tolist(), lens.tolist())
        self.written.append((pack, ids, offs, lens))
        return pack

    # -- manifests -----------------------------------------------------------
    def backup_ids(self) -> list[str]:
        return sorted(k.split("/", 1)[1] for k in self.backend.list("backups"))

    def manifest(self, ident: str) -> Manifest:
        """A backup by its ID or a unique prefix of it."""
        return self.read_manifest(self.resolve(ident))

    def resolve(self, ident: str, ids: list[str] | None = None) -> str:
        """The backup ID that `ident` (an ID or a unique prefix) names, among `ids`
        (default: those listed now)."""
        ids = self.backup_ids() if ids is None else ids
        hits = [i for i in ids if i == ident] or [i for i in ids if i.startswith(ident)]
        if not ident or not hits:
            raise NotFound(f"no backup {ident!r} in {self.url}")
        if len(hits) > 1:
            raise InvalidArgument(f"backup {ident!r} is ambiguous in {self.url}: {', '.join(hits[:4])}...")
        return hits[0]

    def read_manifest(self, bid: str) -> Manifest:
        what = f"{self.url}: backup {bid}"
        raw = self.keys.open(self.backend.get(f"backups/{bid}"), f"backups/{bid}".encode(), what)
        m = Manifest.decode(raw, what)
        if m.id != bid:
            raise CorruptionError(f"{what} is damaged (it names itself {m.id})")
        return m

    def manifests(self) -> list[Manifest]:
        """Every backup, oldest first (two in one second: by the time inside)."""
        return sorted((self.read_manifest(b) for b in self.backup_ids()), key=lambda m: (m.info["time"], m.id))

    def write_manifest(self, m: Manifest) -> None:
        self.backend.put(f"backups/{m.id}", self.keys.seal(m.encode(), f"backups/{m.id}".encode()))

    def delete_manifest(self, bid: str) -> None:
        self.backend.delete(f"backups/{bid}")

    # -- locks ---------------------------------------------------------------
    def locks(self) -> list[dict]:
        out = []
        for key in self.backend.list("locks"):
            with contextlib.suppress(NotFound, ValueError):
                out.append(dict(json.loads(self.backend.get(key)), key=key))
        return out

    @contextlib.contextmanager
    def lock(self, op: str, exclusive: bool = False) -> Iterator[None]:
        """Backups share the repository; prune needs it alone (it deletes packs a
        running backup may be about to name)."""
        mine = f"locks/{new_lock_name()}"
        self.backend.put(mine, json.dumps({"op": op, "exclusive": exclusive, "host": socket.gethostname(),
                                           "pid": os.getpid(), "time": time.time()}).encode())
        try:
            others = [lk for lk in self.locks() if lk["key"] != mine]
            clash = [lk for lk in others if exclusive or lk.get("exclusive")]
            if clash:
                lk = clash[0]
                hint = ("it is gone: `blocksnap unlock` removes its lock" if stale(lk) else
                        "if it is gone (killed, or its host is down), `blocksnap unlock --all` removes the locks")
                raise Busy(f"{self.url} is locked by {lk.get('op')} (pid {lk.get('pid')} on {lk.get('host')}, "
                           f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lk.get('time', 0)))}); "
                           f"{hint}")
            self._held = op
            yield
        except BaseException:
            self._held = None
            # the real failure is what the user must see: a lock we cannot delete
            # now (the endpoint is gone) is a stale lock for `unlock`, said in one line
            with contextlib.suppress(BlocksnapError, OSError):
                self.backend.delete(mine)
            raise
        self._held = None
        self.backend.delete(mine)

    def unlock(self, everything: bool = False) -> tuple[int, int]:
        """Remove stale locks (this host, process gone), or all with `everything`:
        (removed, kept). A lock of a live backup must stay, or a prune could
        delete what that backup is about to name."""
        removed = kept = 0
        for lk in self.locks():
            if everything or stale(lk):
                self.backend.delete(lk["key"])
                removed += 1
            else:
                kept += 1
        return removed, kept


def stale(lock: dict) -> bool:
    """Held by a process of this host that no longer runs."""
    if lock.get("host") != socket.gethostname() or not isinstance(lock.get("pid"), int):
        return False
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def new_lock_name() -> str:
    return f"{int(time.time())}-{os.urandom(6).hex()}"
