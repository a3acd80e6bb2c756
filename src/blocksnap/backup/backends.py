"""Where a repository's objects live: a local directory or an S3-compatible bucket.

Both hold named, immutable objects (`config`, `data/<pack>`, `index/<pack>`,
`backups/<id>`, `locks/<id>`). A local object appears whole or not at all
(written aside, fsynced, renamed); an S3 PUT is atomic by itself.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Protocol
from urllib.parse import urlparse

from ..errors import BlocksnapError, InvalidArgument, NotFound

HEX = "0123456789abcdef"
LISTERS = 16           # shard listings at once (S3)
DELETE_BATCH = 1000    # keys in one S3 DeleteObjects request (S3's limit)


class RepoError(BlocksnapError):
    """The repository's storage failed or refused (network, permissions, missing bucket)."""


class _Exists(RepoError):
    """A conditional write found the object already there."""


class _PastEnd(RepoError):
    """A ranged read started at or past the end of the object."""


class Backend(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def put_new(self, key: str, data: bytes) -> bool: ...   # False: the key exists (nothing written)
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...   # shorter at the end
    def list(self, prefix: str) -> dict[str, int]: ...   # key -> size
    def list_hex(self, prefix: str) -> dict[str, int]: ...   # the same, for names that start with a hex digit
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: Iterable[str]) -> None: ...   # all gone (and durable) when it returns
    def sweep(self) -> int: ...   # remove what interrupted writes left (prune, alone)


class LocalBackend:
    def __init__(self, root: str, url: str):
        self.root, self.url = root, url

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data, os.rename)

    def put_new(self, key: str, data: bytes) -> bool:
        try:
            self._write(key, data, os.link)   # link, unlike rename, never replaces
        except FileExistsError:
            return False
        return True

    def _write(self, key: str, data: bytes, publish) -> None:
        """Written aside and fsynced, then published whole under its name."""
        path = self._path(key)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(d)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{self.url}: object {key} is missing") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{self.url}: object {key} is missing") from None
        try:
            parts, done = [], 0
            while done < length:
                piece = os.pread(fd, length - done, offset + done)
                if not piece:
                    break
                parts.append(piece)
                done += len(piece)
            return b"".join(parts)
        finally:
            os.close(fd)

    def list(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix.rstrip("/"))
        out: dict[str, int] = {}
        if not os.path.isdir(base):
            return out
        for name in os.listdir(base):
            if name.startswith(".tmp-"):
                continue
            st = os.stat(os.path.join(base, name))
            out[f"{prefix.rstrip('/')}/{name}"] = st.st_size
        return out

    def list_hex(self, prefix: str) -> dict[str, int]:
        return {k: n for k, n in self.list(prefix).items() if k.rsplit("/", 1)[1][:1] in HEX}

    def delete(self, key: str, durable: bool = True) -> None:
        """Durable when it returns (prune's order of deletions must survive a power
        cut), unless `durable` is False: then the caller fsyncs the directory."""
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            if durable:
                _fsync_dir(os.path.dirname(path))

    def delete_many(self, keys: Iterable[str]) -> None:
        """All durable when it returns, as S3's DeleteObjects is (no request costs
        a round trip here): unlinked, then each directory fsynced once. No caller
        needs an order within one call (each deletes objects of one kind: indexes a
        merged object replaces, or packs no index names), only between calls."""
        dirs: set[str] = set()
        for key in keys:
            self.delete(key, False)
            dirs.add(os.path.dirname(self._path(key)))
        for d in sorted(dirs):
            _fsync_dir(d)

    def sweep(self) -> int:
        n = 0
        for d, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, name))
                        n += 1
        return n


def _fsync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class S3Backend:
    def __init__(self, bucket: str, prefix: str, endpoint: str | None, url: str):
        import boto3
        from botocore.config import Config
        self.bucket, self.prefix, self.url = bucket, prefix.strip("/"), url
        # botocore 1.36+ sends a PUT's body over HTTPS aws-chunked with a trailing
        # CRC32 by default; Ceph RGW 16 (and other S3-compatible stores) refuse that
        # (MissingContentLength). Checksums only where S3 requires them: the chunks
        # are AES-GCM sealed, so a damaged upload still fails verify and restore.
        extra = ({"request_checksum_calculation": "when_required"}
                 if "request_checksum_calculation" in Config.OPTION_DEFAULTS else {})
        try:
            # a session of its own: boto3's default one keeps the credentials it found
            # first, so a long-running process (tests, the agent) would use stale ones
            self.s3 = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                     config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                                   connect_timeout=10, read_timeout=60,
                                                                   max_pool_connections=LISTERS + 4, **extra))
        except ValueError as e:     # a malformed --endpoint
            raise InvalidArgument(f"invalid S3 endpoint {endpoint!r}: {e}") from None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404") and "Key" in kw:
                raise NotFound(f"{self.url}: object {kw['Key']} is missing") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Exists() from None
            if code == "InvalidRange":
                raise _PastEnd() from None
            if code == "NoSuchBucket":
                raise RepoError(f"{self.url}: no such bucket {self.bucket!r}") from None
            raise RepoError(f"{self.url}: {what} failed: {code or e}") from None
        except BotoCoreError as e:
            raise RepoError(f"{self.url}: {what} failed: {e}") from None

    def put(self, key: str, data: bytes) -> None:
        self._call(f"writing {key}", self.s3.put_object, Key=self._key(key), Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        try:
            self._call(f"writing {key}", self.s3.put_object, Key=self._key(key), Body=data, IfNoneMatch="*")
        except _Exists:
            return False
        return True

    def get(self, key: str) -> bytes:
        return self._body(key, self._call(f"reading {key}", self.s3.get_object, Key=self._key(key)))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            res = self._call(f"reading {key}", self.s3.get_object, Key=self._key(key),
                             Range=f"bytes={offset}-{offset + length - 1}")
        except _PastEnd:
            return b""   # as a file would: nothing there (the chunk then fails its check)
        return self._body(key, res)

    def _body(self, key: str, res: dict) -> bytes:
        try:
            return res["Body"].read()
        except Exception as e:  # noqa: BLE001 - a connection cut mid-body
            raise RepoError(f"{self.url}: reading {key} failed: {e}") from None

    def list(self, prefix: str, start: str = "") -> dict[str, int]:
        """Every key under prefix/ (whose name starts with `start`): one request a 1,000."""
        out: dict[str, int] = {}
        token = None
        full = self._key(prefix.rstrip("/")) + "/"
        while True:
            kw = {"Prefix": full + start, **({"ContinuationToken": token} if token else {})}
            res = self._call(f"listing {prefix}", self.s3.list_objects_v2, **kw)
            for obj in res.get("Contents", []):
                out[prefix.rstrip("/") + "/" + obj["Key"][len(full):]] = int(obj["Size"])
            if not res.get("IsTruncated"):
                return out
            token = res["NextContinuationToken"]

    def list_hex(self, prefix: str) -> dict[str, int]:
        """Names that start with a hex digit (packs), listed by first digit on
        LISTERS threads: one after another, 20,000 packs are 20 requests in a row."""
        out: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=LISTERS, thread_name_prefix="s3-list") as pool:
            for part in pool.map(lambda c: self.list(prefix, c), HEX):
                out.update(part)
        return out

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", self.s3.delete_object, Key=self._key(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        """DeleteObjects, DELETE_BATCH keys a request; a key it could not delete fails it."""
        keys = list(keys)
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            res = self._call(f"deleting {len(batch)} objects", self.s3.delete_objects,
                             Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            errors = res.get("Errors") or []
            if errors:
                e = errors[0]
                raise RepoError(f"{self.url}: deleting {e.get('Key')} failed: {e.get('Code')} "
                                f"({len(errors)} of {len(batch)} not deleted)")

    def sweep(self) -> int:
        return 0   # an S3 PUT is whole or absent: nothing half-written to remove


def open_backend(url: str, endpoint: str | None = None) -> Backend:
    """file:///PATH or s3://BUCKET[/PREFIX] (with --endpoint for non-AWS stores)."""
    u = urlparse(url)
    if u.scheme == "file" and u.path.startswith("/") and not u.netloc:
        return LocalBackend(u.path, url)
    if u.scheme == "s3" and u.netloc:
        return S3Backend(u.netloc, u.path, endpoint, url)
    raise InvalidArgument(f"invalid repository {url!r}: use file:///PATH or s3://BUCKET[/PREFIX]")
