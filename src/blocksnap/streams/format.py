"""The send stream on the wire: a header, extent records, an end record.

Everything is checked before it is used: the header carries its own checksum,
every data record the xxh3 of its uncompressed bytes, and the end record the xxh3
of every byte before it plus the record count. A receiver applies a record only
after its checksum matched, and creates the snapshot only after the end record
matched, so a stream cut short or damaged anywhere never becomes a snapshot.

    stream  = MAGIC header record* end
    header  = u32 version, u32 json length, json, u64 xxh3(json)
    record  = u8 kind, u64 offset, u64 length, u32 payload length, u64 checksum, payload
              DATA: payload is zstd(bytes), checksum = xxh3(bytes)
              ZERO: no payload, checksum 0: [offset, offset+length) reads as zeros
    end     = a record of kind END: offset = records before it, length = data bytes
              sent, checksum = xxh3 of every stream byte before the end record
All integers little-endian.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import xxhash
import zstandard

from ..errors import InvalidArgument

MAGIC = b"BSNAPSTR"
VERSION = 1
DATA, ZERO, END = 1, 2, 255
KINDS = {DATA: "data", ZERO: "zero", END: "end"}
CHUNK = 1 << 20             # data bytes per record at most
MAX_HEADER = 1 << 20
_HEAD = struct.Struct("<II")
_REC = struct.Struct("<BQQIQ")
_U64 = struct.Struct("<Q")


class StreamError(InvalidArgument):
    """The input is not a valid blocksnap stream, or is damaged."""


class StreamTruncated(StreamError):
    """The stream stopped before its end record (its writer may have failed)."""


@dataclass
class Record:
    kind: int
    offset: int
    length: int
    data: bytes = b""


class StreamWriter:
    """Writes a stream to a binary file, hashing everything for the end record."""

    def __init__(self, out: BinaryIO, header: dict[str, Any], level: int = 3):
        self.out = out
        self.hash = xxhash.xxh3_64()
        self.records = 0
        self.data_bytes = 0
        self.written = 0
        self._zstd = zstandard.ZstdCompressor(level=level)
        body = json.dumps(header, sort_keys=True).encode()
        self._emit(MAGIC + _HEAD.pack(VERSION, len(body)) + body + _U64.pack(xxhash.xxh3_64_intdigest(body)))

    def _emit(self, b: bytes) -> None:
        self.hash.update(b)
        self.out.write(b)
        self.written += len(b)

    def data(self, offset: int, data: bytes | memoryview) -> None:
        payload = self._zstd.compress(data)
        self._emit(_REC.pack(DATA, offset, len(data), len(payload), xxhash.xxh3_64_intdigest(data)))
        self._emit(payload)
        self.records += 1
        self.data_bytes += len(data)

    def zero(self, offset: int, length: int) -> None:
        self._emit(_REC.pack(ZERO, offset, length, 0, 0))
        self.records += 1

    def end(self) -> None:
        tail = _REC.pack(END, self.records, self.data_bytes, 0, self.hash.intdigest())
        self.out.write(tail)
        self.written += len(tail)
        self.out.flush()


class StreamReader:
    """Reads and checks a stream; `records()` yields only records that checked out."""

    def __init__(self, src: BinaryIO):
        self.src = src
        self.hash = xxhash.xxh3_64()
        self.read_bytes = 0
        self._zstd = zstandard.ZstdDecompressor()
        magic = self._read(len(MAGIC), "the stream's start")
        if magic != MAGIC:
            raise StreamError("not a blocksnap stream (bad magic at its start)")
        version, n = _HEAD.unpack(self._read(_HEAD.size, "the header"))
        if version != VERSION:
            raise StreamError(f"stream version {version} is not supported (this blocksnap reads {VERSION})")
        if n > MAX_HEADER:
            raise StreamError(f"damaged stream: a header of {n} bytes")
        body = self._read(n, "the header")
        (want,) = _U64.unpack(self._read(8, "the header"))
        if xxhash.xxh3_64_intdigest(body) != want:
            raise StreamError("damaged stream: the header's checksum does not match")
        try:
            self.header: dict[str, Any] = json.loads(body)
        except ValueError:
            raise StreamError("damaged stream: the header is not JSON") from None

    def _read(self, n: int, what: str, hashed: bool = True) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.src.read(n - got)
            if not b:
                raise StreamTruncated(f"the stream ends early, in {what} (after {self.read_bytes + got} bytes)")
            parts.append(b)
            got += len(b)
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        if hashed:
            self.hash.update(data)
        self.read_bytes += n
        return data

    def records(self):
        """Yields DATA and ZERO records; returns after a matching END record."""
        count = 0
        sent = 0
        while True:
            head = self._read(_REC.size, f"record {count + 1}", hashed=False)
            kind, offset, length, plen, check = _REC.unpack(head)
            if kind == END:
                if check != self.hash.intdigest() or offset != count or length != sent:
                    raise StreamError("damaged stream: the end record does not match what came before it")
                if self.src.read(1):
                    raise StreamError("damaged stream: bytes after the end record")
                return
            self.hash.update(head)
            if kind == ZERO and plen == 0:
                count += 1
                yield Record(ZERO, offset, length)
                continue
            if kind != DATA or plen > 2 * CHUNK + 4096 or length > CHUNK:
                raise StreamError(f"damaged stream: record {count + 1} is not a valid record")
            payload = self._read(plen, f"record {count + 1}")
            try:
                # the frame's own size must be the record's, or a small payload could
                # claim gigabytes (decompress trusts a frame's declared size)
                if zstandard.frame_content_size(payload) != length:
                    raise zstandard.ZstdError("size mismatch")
                data = self._zstd.decompress(payload, max_output_size=length)
            except zstandard.ZstdError:
                raise StreamError(f"damaged stream: record {count + 1} does not decompress") from None
            if len(data) != length or xxhash.xxh3_64_intdigest(data) != check:
                raise StreamError(f"damaged stream: record {count + 1} (offset {offset}) fails its checksum")
            count += 1
            sent += length
            yield Record(DATA, offset, length, data)
