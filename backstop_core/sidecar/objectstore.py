"""Where snapshots live: any S3 API (AWS, MinIO, SeaweedFS, ...) or a local directory.

Keys are relative to the store's root (`s3://bucket/prefix` or `file:///path`) and use `/`
as the separator. Every method is a coroutine; blocking boto3 and file system calls run in
worker threads, so a slow store never stalls the event loop.

Errors reach the caller as `ObjectStoreError` with a message an operator can act on
(unreachable endpoint, missing bucket, access denied, missing credentials); a missing key
is `ObjectNotFound`. No botocore traceback is shown to a user.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "S3ObjectStore",
    "open_object_store",
]

_T = TypeVar("_T")

# Objects above this size are uploaded in parts of this size, several at a time.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
_TMP_MARK = ".tmp-"


class ObjectStoreError(Exception):
    """The object store cannot do what was asked; the message says why, for an operator."""


class ObjectNotFound(ObjectStoreError):
    """The key does not exist."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int
    last_modified: datetime | None = None


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def get_to_file(self, key: str, path: str | os.PathLike[str]) -> None: ...
    async def head(self, key: str) -> ObjectInfo | None: ...
    async def list(self, prefix: str) -> builtins.list[ObjectInfo]: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def check(self) -> None: ...
    def describe(self) -> str: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ObjectStoreError(f"invalid object key {key!r}")
    return key


# --------------------------------------------------------------------------- local directory


class LocalObjectStore:
    """Objects as files under `root`. A write goes to a temporary file that is renamed into
    place, so a reader never sees a half-written object."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    async def check(self) -> None:
        await asyncio.to_thread(self._check)

    def _check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(f"cannot use {self.describe()}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectStoreError(f"cannot write to {self.describe()}: permission denied")

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, key, lambda f: f.write(data))

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        def copy(out: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)

        await asyncio.to_thread(self._write, key, copy)

    def _write(self, key: str, fill: Callable[[Any], object]) -> None:
        target = self._path(key)
        tmp = target.with_name(f".{target.name}{_TMP_MARK}{secrets.token_hex(4)}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ObjectStoreError(
                f"cannot write {self.describe()}/{key}: {exc.strerror or exc}"
            ) from None

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._read, key)

    def _read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.describe()}/{key} does not exist") from None
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {self.describe()}/{key}: {exc.strerror}") from None

    async def get_to_file(self, key: str, path: str | os.PathLike[str]) -> None:
        def copy() -> None:
            try:
                shutil.copyfile(self._path(key), path)
            except FileNotFoundError:
                raise ObjectNotFound(f"{self.describe()}/{key} does not exist") from None
            except OSError as exc:
                raise ObjectStoreError(
                    f"cannot copy {self.describe()}/{key} to {os.fspath(path)}: {exc.strerror}"
                ) from None

        await asyncio.to_thread(copy)

    async def head(self, key: str) -> ObjectInfo | None:
        def stat() -> ObjectInfo | None:
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise ObjectStoreError(
                    f"cannot stat {self.describe()}/{key}: {exc.strerror}"
                ) from None
            return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

        return await asyncio.to_thread(stat)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ObjectStoreError(f"invalid key prefix {prefix!r}")
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found: builtins.list[ObjectInfo] = []
        for directory, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        found.sort(key=lambda info: info.key)
        return found

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, [key])

    async def delete_prefix(self, prefix: str) -> int:
        def run() -> int:
            keys = [info.key for info in self._list(prefix)]
            self._delete(keys)
            return len(keys)

        return await asyncio.to_thread(run)

    def _delete(self, keys: builtins.list[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise ObjectStoreError(
                    f"cannot delete {self.describe()}/{key}: {exc.strerror}"
                ) from None
            parents.add(path.parent)
        # Remove directories left empty, deepest first, never the root itself.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            directory = parent
            while directory != self.root and self.root in directory.parents:
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent


# --------------------------------------------------------------------------- S3


class S3ObjectStore:
    """Objects in an S3 bucket under `prefix`.

    Credentials come from the standard AWS chain (environment variables, shared config and
    credentials files, a named profile, an instance or task role) unless given here. The
    endpoint is `endpoint_url`, else BACKSTOP_S3_ENDPOINT, else AWS_ENDPOINT_URL, else AWS.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        addressing_style: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
        max_concurrency: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ObjectStoreError("an S3 store needs a bucket: s3://BUCKET/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("BACKSTOP_S3_ENDPOINT")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = region
        self._credentials = (access_key, secret_key, session_token)
        self._profile = profile
        # Services other than AWS generally want path-style addressing.
        self._addressing = addressing_style or ("path" if self.endpoint_url else "auto")
        self._multipart = (multipart_threshold, multipart_chunksize, max_concurrency)
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client: Any = None
        self._transfer_config: Any = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return where + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _full_prefix(self, prefix: str) -> str:
        if not self.prefix:
            return prefix
        return f"{self.prefix}/{prefix}"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from boto3.s3.transfer import TransferConfig
                from botocore.config import Config

                access_key, secret_key, token = self._credentials
                connect_timeout, read_timeout, attempts = self._timeouts
                options: dict[str, Any] = {
                    "s3": {"addressing_style": self._addressing},
                    "retries": {"max_attempts": attempts, "mode": "standard"},
                    "connect_timeout": connect_timeout,
                    "read_timeout": read_timeout,
                    "max_pool_connections": max(10, self._multipart[2] * 2),
                }
                if self.endpoint_url:
                    # Not every S3-compatible server accepts the newer default checksums.
                    options["request_checksum_calculation"] = "when_required"
                    options["response_checksum_validation"] = "when_required"
                session = boto3.session.Session(profile_name=self._profile)
                self._client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=access_key,
                    aws_secret_access_key=secret_key,
                    aws_session_token=token,
                    config=Config(**options),
                )
                threshold, chunk, concurrency = self._multipart
                self._transfer_config = TransferConfig(
                    multipart_threshold=threshold,
                    multipart_chunksize=chunk,
                    max_concurrency=concurrency,
                )
            return self._client

    async def _call(self, action: str, where: str | None, fn: Callable[[Any], _T]) -> _T:
        """Run `fn` with the client in a worker thread; its errors become ObjectStoreError.
        `where` is what the call is about, as `_at` or `_under` spell it (None: the
        bucket itself)."""

        def run() -> _T:
            try:
                return fn(self._get_client())
            except ObjectStoreError:
                raise
            except Exception as exc:
                raise self._translate(exc, action, where) from None

        return await asyncio.to_thread(run)

    def _at(self, key: str) -> str:
        """An object, for messages. Not checked: an error message must not fail itself."""
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"

    def _under(self, prefix: str) -> str:
        """The keys a listing covers, for messages: a prefix is not an object key."""
        return f"s3://{self.bucket}/{self._full_prefix(prefix)}"

    def _translate(self, exc: Exception, action: str, where: str | None) -> ObjectStoreError:
        """Turn a boto3/botocore exception into a message for an operator that says what
        went wrong and with which object or prefix (`where`; None: the bucket)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ProfileNotFound,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

        endpoint = self.endpoint_url or "AWS S3"
        bucket_only = where is None
        where = where or f"s3://{self.bucket}"
        if isinstance(exc, EndpointConnectionError | BotoConnectTimeout | ConnectionClosedError):
            return ObjectStoreError(
                f"cannot reach the object store at {endpoint} ({action} {where}):"
                " check the endpoint URL and that the server is running"
            )
        if isinstance(exc, ReadTimeoutError):
            return ObjectStoreError(f"the object store at {endpoint} timed out ({action} {where})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ObjectStoreError(
                f"no usable S3 credentials to {action} {where}: set AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role"
            )
        if isinstance(exc, ProfileNotFound):
            return ObjectStoreError(f"S3 credentials: {exc}")
        if isinstance(exc, S3UploadFailedError):
            # upload_file folds the ClientError into its message: recover the error code.
            text = str(exc)
            found = re.search(r"An error occurred \((\w+)\)", text)
            if found:
                return self._client_error(found.group(1), text, action, where, bucket_only)
            return ObjectStoreError(f"{action} {where} failed: {text}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if not code and status is not None:
                code = str(status)
            message = str(error.get("Message") or "")
            return self._client_error(code, message, action, where, bucket_only)
        return ObjectStoreError(f"{action} {where} failed: {type(exc).__name__}: {exc}")

    def _client_error(
        self, code: str, message: str, action: str, where: str, bucket_only: bool = False
    ) -> ObjectStoreError:
        endpoint = self.endpoint_url or "AWS S3"
        if code == "NoSuchBucket" or (bucket_only and code in ("404", "NotFound")):
            return ObjectStoreError(
                f"the bucket {self.bucket!r} does not exist at {endpoint}: create it, or fix"
                " the store URL"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{where} does not exist")
        if code in (
            "AccessDenied",
            "403",
            "Forbidden",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
            "AllAccessDisabled",
        ):
            return ObjectStoreError(
                f"access denied to {where} at {endpoint} ({code}): check the credentials"
                " and that they may read and write the bucket"
            )
        detail = f"{code}: {message}" if message else code
        return ObjectStoreError(f"{action} {where} failed ({detail})")

    async def check(self) -> None:
        """Raise ObjectStoreError unless the bucket exists and the credentials work."""
        await self._call("check", None, lambda c: c.head_bucket(Bucket=self.bucket))

    async def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        await self._call(
            "put", self._at(key), lambda c: c.put_object(Bucket=self.bucket, Key=full, Body=data)
        )

    async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full = self._key(key)

        def upload(client: Any) -> None:
            client.upload_file(os.fspath(path), self.bucket, full, Config=self._transfer_config)

        await self._call("upload", self._at(key), upload)

    async def get(self, key: str) -> bytes:
        full = self._key(key)

        def fetch(client: Any) -> bytes:
            body = client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        return await self._call("get", self._at(key), fetch)

    async def get_to_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full = self._key(key)
        target = Path(path)
        tmp = target.with_name(f".{target.name}{_TMP_MARK}{secrets.token_hex(4)}")

        def download(client: Any) -> None:
            try:
                client.download_file(self.bucket, full, str(tmp), Config=self._transfer_config)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()

        await self._call("download", self._at(key), download)

    async def head(self, key: str) -> ObjectInfo | None:
        full = self._key(key)

        def stat(client: Any) -> ObjectInfo | None:
            from botocore.exceptions import ClientError

            try:
                meta = client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return None
                raise
            return ObjectInfo(key, int(meta["ContentLength"]), meta.get("LastModified"))

        return await self._call("head", self._at(key), stat)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        full = self._full_prefix(prefix)

        def run(client: Any) -> builtins.list[ObjectInfo]:
            found: builtins.list[ObjectInfo] = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            self._relative(item["Key"]), int(item["Size"]), item.get("LastModified")
                        )
                    )
            found.sort(key=lambda info: info.key)
            return found

        return await self._call("list", self._under(prefix), run)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        await self._call(
            "delete", self._at(key), lambda c: c.delete_object(Bucket=self.bucket, Key=full)
        )

    async def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in await self.list(prefix)]

        def run(client: Any) -> int:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                response = client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise self._client_error(
                        str(first.get("Code", "")),
                        str(first.get("Message", "")),
                        "delete",
                        f"s3://{self.bucket}/{first.get('Key', '')}",
                    )
            return len(keys)

        return await self._call("delete", self._under(prefix), run)


# --------------------------------------------------------------------------- URLs


def open_object_store(url: str, **options: Any) -> ObjectStore:
    """An ObjectStore for `s3://bucket/prefix?endpoint=URL&region=R&profile=P` or
    `file:///absolute/path`. `options` go to the store's constructor (credentials, tuning)
    and win over the URL's query."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ObjectStoreError(
                f"store: {url!r} is not a file:///absolute/path URL (three slashes)"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ObjectStoreError(f"store: {url!r} needs an absolute path (file:///path)")
        return LocalObjectStore(Path(path))  # credentials and tuning are for S3 only
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ObjectStoreError(f"store: {url!r} names no bucket (s3://BUCKET/prefix)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {"endpoint", "region", "profile", "addressing"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ObjectStoreError(
                f"store: unknown option(s) {', '.join(unknown)} in {url!r}"
                f" (known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = {
            "endpoint_url": query.get("endpoint"),
            "region": query.get("region"),
            "profile": query.get("profile"),
            "addressing_style": query.get("addressing"),
        }
        kwargs.update(options)
        return S3ObjectStore(bucket, unquote(parts.path).strip("/"), **kwargs)
    raise ObjectStoreError(f"store: {url!r} is not an s3://bucket/prefix or file:///path URL")
