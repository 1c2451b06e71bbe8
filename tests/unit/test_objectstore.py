"""ObjectStore: a local directory, and a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backstop_core.s3local import LocalS3Info
from backstop_core.sidecar.objectstore import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    open_object_store,
)


def _s3_store(s3: LocalS3Info, prefix: str, **options: object) -> S3ObjectStore:
    store = open_object_store(
        f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint_url}&region={s3.region}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        **options,
    )
    assert isinstance(store, S3ObjectStore)
    return store


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
        return
    s3: LocalS3Info = request.getfixturevalue("s3")
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    store = _s3_store(s3, prefix, multipart_threshold=5 * 1024 * 1024,
                      multipart_chunksize=5 * 1024 * 1024)  # fmt: skip
    yield store
    await store.delete_prefix("")


# --------------------------------------------------------------------------- both kinds


async def test_put_get_head_list_delete(store: ObjectStore) -> None:
    await store.put("db/public.t/1/manifest.json", b'{"a": 1}')
    await store.put("db/public.t/1/part-00000.parquet", b"x" * 10)
    await store.put("db/public.u/2/manifest.json", b"")
    assert await store.get("db/public.t/1/manifest.json") == b'{"a": 1}'
    info = await store.head("db/public.t/1/part-00000.parquet")
    assert info is not None and info.size == 10
    assert await store.head("db/public.t/1/nothing") is None
    listed = await store.list("db/public.t/")
    assert [(i.key, i.size) for i in listed] == [
        ("db/public.t/1/manifest.json", 8),
        ("db/public.t/1/part-00000.parquet", 10),
    ]
    # A prefix is a string prefix, not only a directory.
    assert [i.key for i in await store.list("db/public.")] == [
        "db/public.t/1/manifest.json",
        "db/public.t/1/part-00000.parquet",
        "db/public.u/2/manifest.json",
    ]
    assert await store.get("db/public.u/2/manifest.json") == b""
    await store.delete("db/public.t/1/manifest.json")
    await store.delete("db/public.t/1/manifest.json")  # deleting twice is fine
    assert await store.head("db/public.t/1/manifest.json") is None
    assert await store.delete_prefix("db/public.t/") == 1
    assert [i.key for i in await store.list("db/")] == ["db/public.u/2/manifest.json"]


async def test_missing_key_is_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="does not exist"):
        await store.get("nope/key")
    with pytest.raises(ObjectNotFound):
        await store.get_to_file("nope/key", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_large_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    # 12 MB: above the 5 MB multipart threshold of the S3 store under test.
    data = os.urandom(12 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    await store.put_file("big/part-00000.parquet", source)
    info = await store.head("big/part-00000.parquet")
    assert info is not None and info.size == len(data)
    target = tmp_path / "copy.bin"
    await store.get_to_file("big/part-00000.parquet", target)
    assert target.read_bytes() == data
    assert await store.get("big/part-00000.parquet") == data


async def test_keys_cannot_escape(store: ObjectStore) -> None:
    for bad in ("", "/abs", "a/../b", "a//b", "a/./b"):
        with pytest.raises(ObjectStoreError, match="invalid object key"):
            await store.put(bad, b"x")


# --------------------------------------------------------------------------- local only


async def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    await store.put("a/b/c.json", b"one")
    await store.put("a/b/c.json", b"two")  # replaced in one rename
    assert (tmp_path / "a/b/c.json").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "a/b").iterdir()) == ["c.json"]
    # A temporary file of a write in progress is never listed.
    (tmp_path / "a/b/.d.json.tmp-1234").write_bytes(b"half")
    assert [i.key for i in await store.list("a/")] == ["a/b/c.json"]


async def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    await store.put("db/public.t/1/part-00000.parquet", b"x")
    await store.put("db/public.t/2/part-00000.parquet", b"x")
    assert await store.delete_prefix("db/public.t/1/") == 1
    assert not (tmp_path / "root/db/public.t/1").exists()
    assert (tmp_path / "root/db/public.t/2").is_dir()
    await store.delete_prefix("db/")
    assert (tmp_path / "root").is_dir()  # the root itself stays
    assert list((tmp_path / "root").iterdir()) == []


async def test_local_check_reports_an_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ObjectStoreError, match="cannot use"):
        await LocalObjectStore(blocker / "sub").check()
    await LocalObjectStore(tmp_path / "new").check()
    assert (tmp_path / "new").is_dir()


# --------------------------------------------------------------------------- URLs


def test_open_object_store_parses_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKSTOP_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    local = open_object_store("file:///var/backstop/snapshots")
    assert isinstance(local, LocalObjectStore)
    assert local.root == Path("/var/backstop/snapshots")
    assert local.describe() == "file:///var/backstop/snapshots"

    s3 = open_object_store(
        "s3://my-bucket/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-west-1"
    )
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "my-bucket", "some/prefix", "http://127.0.0.1:9000", "eu-west-1",
    )  # fmt: skip
    assert s3.describe() == "s3://my-bucket/some/prefix at http://127.0.0.1:9000"

    aws = open_object_store("s3://b")
    assert isinstance(aws, S3ObjectStore)
    assert (aws.prefix, aws.endpoint_url) == ("", None)
    assert aws.describe() == "s3://b"

    monkeypatch.setenv("BACKSTOP_S3_ENDPOINT", "http://minio:9000")
    from_env = open_object_store("s3://b/p")
    assert isinstance(from_env, S3ObjectStore)
    assert from_env.endpoint_url == "http://minio:9000"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:///prefix", "names no bucket"),
        ("file://relative/path", "three slashes"),
        ("file:relative", "absolute path"),
        ("gs://bucket/x", "is not an s3://"),
        ("s3://b/p?endpont=http://x", "unknown option"),
    ],
)
def test_open_object_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ObjectStoreError, match=message):
        open_object_store(url)


# --------------------------------------------------------------------------- S3 failures


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_s3_unreachable_endpoint_is_a_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3ObjectStore(
        "bucket", "p", endpoint_url=endpoint, access_key="a", secret_key="b", region="us-east-1",
        max_attempts=1,
    )  # fmt: skip
    with pytest.raises(ObjectStoreError) as caught:
        await store.put("k", b"x")
    message = str(caught.value)
    assert f"cannot reach the object store at {endpoint}" in message
    assert "Traceback" not in message and "botocore" not in message


async def test_s3_wrong_secret_is_access_denied(s3: LocalS3Info, tmp_path: Path) -> None:
    store = S3ObjectStore(
        s3.bucket, "denied", endpoint_url=s3.endpoint_url, region=s3.region,
        access_key=s3.access_key, secret_key="wrong-secret",
    )  # fmt: skip
    with pytest.raises(ObjectStoreError, match="access denied to s3://"):
        await store.list("")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (17 * 1024 * 1024))  # a multipart upload fails the same way
    with pytest.raises(ObjectStoreError, match="access denied to s3://"):
        await store.put_file("k", big)


async def test_s3_missing_bucket(s3: LocalS3Info) -> None:
    store = S3ObjectStore(
        f"missing-{uuid.uuid4().hex[:8]}", "p", endpoint_url=s3.endpoint_url, region=s3.region,
        access_key=s3.access_key, secret_key=s3.secret_key,
    )  # fmt: skip
    with pytest.raises(ObjectStoreError, match="does not exist at"):
        await store.check()
    with pytest.raises(ObjectStoreError, match=r"bucket .* does not exist"):
        await store.list("")


async def test_s3_credentials_from_the_environment(
    s3: LocalS3Info, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("BACKSTOP_S3_ENDPOINT", s3.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.region)
    store = open_object_store(f"s3://{s3.bucket}/env-{uuid.uuid4().hex[:8]}")
    await store.check()
    await store.put("a", b"from env")
    assert await store.get("a") == b"from env"
    assert await store.delete_prefix("") == 1


# --------------------------------------------------------------------------- listing errors


def _no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in the standard chain: no variables, no files, no instance metadata."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_s3_listing_without_credentials_names_the_prefix_and_the_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A listing prefix ends in '/': it used to be checked as an object key on the way to
    the message, which then said "invalid object key 'postgres/'" instead of what failed."""
    _no_aws_credentials(monkeypatch, tmp_path)
    store = S3ObjectStore(
        "bucket", "backups", endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        region="us-east-1", max_attempts=1,
    )  # fmt: skip
    for attempt in (store.list("postgres/"), store.delete_prefix("postgres/")):
        with pytest.raises(ObjectStoreError) as caught:
            await attempt
        message = str(caught.value)
        assert "invalid object key" not in message
        assert message.startswith(
            "no usable S3 credentials to list s3://bucket/backups/postgres/: set AWS_ACCESS_KEY_ID"
        ), message
    with pytest.raises(ObjectStoreError, match=r"to get s3://bucket/backups/postgres/a\.json:"):
        await store.get("postgres/a.json")


async def test_s3_listing_an_unreachable_endpoint_names_the_prefix() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3ObjectStore(
        "bucket", "", endpoint_url=endpoint, access_key="a", secret_key="b", region="us-east-1",
        max_attempts=1,
    )  # fmt: skip
    with pytest.raises(ObjectStoreError) as caught:
        await store.list("postgres/public.t/")
    assert str(caught.value) == (
        f"cannot reach the object store at {endpoint} (list s3://bucket/postgres/public.t/):"
        " check the endpoint URL and that the server is running"
    )


async def test_s3_listing_denied_names_the_prefix(s3: LocalS3Info) -> None:
    store = S3ObjectStore(
        s3.bucket, "denied", endpoint_url=s3.endpoint_url, region=s3.region,
        access_key=s3.access_key, secret_key="wrong-secret",
    )  # fmt: skip
    with pytest.raises(ObjectStoreError) as caught:
        await store.list("postgres/")
    message = str(caught.value)
    assert message.startswith(f"access denied to s3://{s3.bucket}/denied/postgres/ at "), message
    assert "invalid object key" not in message
