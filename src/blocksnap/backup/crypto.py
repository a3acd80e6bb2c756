"""The repository's keys: a random master key wrapped by the password, AES-256-GCM
for every object, a keyed hash for chunk IDs: HMAC-SHA-256 cut to 128 bits in new
repositories (config `chunk_ids`), keyed BLAKE2b-128 in those made before it.

The storage sees only ciphertext and IDs that reveal nothing without the key (an
unkeyed hash would let anyone holding a file test whether the repository has it).
Each sealed blob names what it is in its associated data (`chunk:<id>`,
`index/<pack>`, `backups/<id>`), so an object moved or swapped under another name
fails to open instead of being read as something else.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import CorruptionError, InvalidArgument

ID_BYTES = 16            # chunk IDs: 128 bits of a keyed hash
# The keyed hash of chunk IDs, by the config's `chunk_ids` (absent: the first
# repositories', BLAKE2b). New repositories take HMAC-SHA-256: the CPUs blocksnap
# runs on hash SHA-256 in hardware (SHA-NI), 1580 MiB/s here against BLAKE2b's
# 890, and a full backup of 2 GiB spent a fifth of its CPU in BLAKE2b.
BLAKE2B, HMAC_SHA256 = "blake2b-128", "hmac-sha256-128"
CHUNK_IDS = (BLAKE2B, HMAC_SHA256)
NONCE = 12
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}
ZERO_ID = bytes(ID_BYTES)   # an all-zero chunk: stored nowhere, restored as a hole


class WrongPassword(InvalidArgument):
    pass


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _kek(password: bytes, salt: bytes, params: dict) -> bytes:
    return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(password)


class Keys:
    def __init__(self, master: bytes, chunk_ids: str = BLAKE2B):
        self._aead = AESGCM(master[:32])
        self._id_key = master[32:64]
        self.chunk_ids = chunk_ids
        if chunk_ids == HMAC_SHA256:
            self.chunk_id = self._hmac_id   # type: ignore[method-assign]

    @classmethod
    def create(cls, password: bytes, repo_id: str) -> tuple["Keys", dict]:
        """New keys, and the repository's `config` that holds them wrapped."""
        master = os.urandom(64)
        salt, nonce = os.urandom(16), os.urandom(NONCE)
        wrapped = AESGCM(_kek(password, salt, SCRYPT)).encrypt(nonce, master, b"blocksnap-repo-key")
        config = {"format": "blocksnap-repo", "version": 1, "id": repo_id,
                  "kdf": dict(SCRYPT, name="scrypt", salt=_b64(salt)),
                  "key": {"nonce": _b64(nonce), "wrapped": _b64(wrapped)}, "chunk_ids": HMAC_SHA256}
        return cls(master, HMAC_SHA256), config

    @classmethod
    def unlock(cls, config: dict, password: bytes, where: str) -> "Keys":
        try:
            kdf, key = config["kdf"], config["key"]
            kek = _kek(password, base64.b64decode(kdf["salt"]), kdf)
            master = AESGCM(kek).decrypt(base64.b64decode(key["nonce"]), base64.b64decode(key["wrapped"]),
                                         b"blocksnap-repo-key")
        except InvalidTag:
            raise WrongPassword(f"wrong password for the repository {where}") from None
        except (KeyError, TypeError, ValueError):
            raise CorruptionError(f"{where}: the repository's config is damaged") from None
        return cls(master, config.get("chunk_ids", BLAKE2B))

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return hashlib.blake2b(data, digest_size=ID_BYTES, key=self._id_key).digest()

    def _hmac_id(self, data: bytes | memoryview) -> bytes:
        return hmac.digest(self._id_key, data, "sha256")[:ID_BYTES]

    def seal(self, plain: bytes, name: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plain, name)

    def open(self, blob: bytes | memoryview, name: bytes, what: str) -> bytes:
        try:
            return self._aead.decrypt(bytes(blob[:NONCE]), bytes(blob[NONCE:]), name)
        except (InvalidTag, ValueError):
            raise CorruptionError(f"{what} is damaged (authentication failed)") from None


def parse_config(raw: bytes, where: str) -> dict:
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise CorruptionError(f"{where}: the repository's config is not JSON") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "blocksnap-repo":
        raise InvalidArgument(f"{where} is not a blocksnap repository")
    if cfg.get("version") != 1:
        raise InvalidArgument(f"{where}: repository version {cfg.get('version')} is not supported")
    if cfg.get("chunk_ids", BLAKE2B) not in CHUNK_IDS:
        raise InvalidArgument(f"{where}: chunk IDs by {cfg.get('chunk_ids')!r} are not supported "
                              "(a newer blocksnap made this repository)")
    return cfg
