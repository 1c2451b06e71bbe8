"""The real servers the suite and `--demo` start: PostgreSQL, S3 (SeaweedFS) and the demo shop."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from botocore.exceptions import ClientError

from backstop_core.demo import DEMO_TABLES, Demo
from backstop_core.localpg import LocalPostgres, LocalPostgresError
from backstop_core.s3local import LocalS3Info, s3_client
from tests.conftest import (
    MD5_ROLE,
    PASSWORD_ROLE,
    SCRAM_ROLE,
    LoginRole,
    PgServer,
    TlsFiles,
    make_tls_files,
)

pytestmark = pytest.mark.integration

PASSWORD_ROLES = [SCRAM_ROLE, MD5_ROLE, PASSWORD_ROLE]


def _scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_session_server_answers_a_query(pg: PgServer, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT current_user, current_database(), 40 + 2").fetchone()
        server_version = conn.info.server_version
    assert row == (pg.user, "postgres", 42)
    major = int(pg.version.split(".")[0])
    assert server_version // 10000 == major


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda role: role.name)
def test_password_role_logs_in_with_its_password(pg: PgServer, role: LoginRole) -> None:
    assert role.password is not None
    dsn = pg.dsn(user=role.name, password=role.password, database="postgres")
    assert _scalar(dsn, "SELECT current_user") == role.name


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda role: role.name)
def test_password_role_is_refused_with_a_wrong_or_missing_password(
    pg: PgServer, role: LoginRole
) -> None:
    if not pg.managed:
        pytest.skip("the external server's pg_hba.conf is not ours")
    wrong = pg.dsn(user=role.name, password="not-" + str(role.password), database="postgres")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)
    missing = pg.dsn(user=role.name, database="postgres")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(missing, connect_timeout=10)


@pytest.mark.parametrize(
    ("role", "stored_prefix"), [(SCRAM_ROLE, "SCRAM-SHA-256$"), (MD5_ROLE, "md5")]
)
def test_passwords_are_stored_with_the_role_s_method(
    pg_dsn: str, role: LoginRole, stored_prefix: str
) -> None:
    stored = _scalar(pg_dsn, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role.name}'")
    assert isinstance(stored, str) and stored.startswith(stored_prefix)


def test_agent_role_logs_in_without_a_password(pg: PgServer) -> None:
    if not pg.managed:
        pytest.skip("the external server's pg_hba.conf is not ours")
    assert _scalar(pg.dsn(user="agent_role", database="postgres"), "SELECT current_user") == (
        "agent_role"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_connection_verifies_the_server_certificate(
    pg: PgServer, tls_files: TlsFiles, host: str
) -> None:
    if not pg.ssl:
        pytest.skip("the session's server runs without TLS")
    dsn = pg.dsn(database="postgres", sslmode="verify-full", sslrootcert=str(tls_files.ca_cert))
    dsn = dsn.replace(f"@{pg.host}:", f"@{host}:")
    assert _scalar(dsn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True


def test_plain_connection_still_works_next_to_tls(pg: PgServer) -> None:
    dsn = pg.dsn(database="postgres", sslmode="disable")
    assert _scalar(dsn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False


def test_tls_with_an_unknown_ca_is_refused(pg: PgServer, tmp_path: Path) -> None:
    if not pg.ssl:
        pytest.skip("the session's server runs without TLS")
    other_ca = make_tls_files(tmp_path).ca_cert
    dsn = pg.dsn(database="postgres", sslmode="verify-full", sslrootcert=str(other_ca))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, connect_timeout=10)


def test_fresh_db_is_an_isolated_empty_database(fresh_db: str, pg_dsn: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        conn.execute("CREATE TABLE only_here (id int)")
    assert name is not None and name[0].startswith("test_")
    assert _scalar(pg_dsn, "SELECT to_regclass('only_here') IS NULL") is True


def test_s3_put_get_list_delete(s3: LocalS3Info) -> None:
    client = s3_client(s3)
    client.put_object(Bucket=s3.bucket, Key="dir/hello.txt", Body=b"hello backstop")
    body = client.get_object(Bucket=s3.bucket, Key="dir/hello.txt")["Body"].read()
    assert body == b"hello backstop"
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="dir/")
    assert [item["Key"] for item in listed["Contents"]] == ["dir/hello.txt"]
    client.delete_object(Bucket=s3.bucket, Key="dir/hello.txt")
    assert client.list_objects_v2(Bucket=s3.bucket, Prefix="dir/")["KeyCount"] == 0


def test_s3_multipart_upload(s3: LocalS3Info) -> None:
    client = s3_client(s3)
    parts_data = [b"a" * (5 * 1024 * 1024), b"b" * 1234]
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key="big.bin")
    parts = []
    for number, data in enumerate(parts_data, start=1):
        answer = client.upload_part(
            Bucket=s3.bucket,
            Key="big.bin",
            PartNumber=number,
            UploadId=upload["UploadId"],
            Body=data,
        )
        parts.append({"ETag": answer["ETag"], "PartNumber": number})
    client.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="big.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    body = client.get_object(Bucket=s3.bucket, Key="big.bin")["Body"].read()
    assert body == b"".join(parts_data)
    client.delete_object(Bucket=s3.bucket, Key="big.bin")


def test_s3_rejects_a_wrong_secret(s3: LocalS3Info) -> None:
    forged = LocalS3Info(s3.endpoint_url, s3.access_key, "wrong-secret", s3.region, s3.bucket)
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_client(forged).list_buckets()


def test_demo_starts_with_the_shop_and_stop_removes_it() -> None:
    demo = Demo()
    env = demo.start()
    try:
        with psycopg.connect(env.upstream_dsn) as conn:
            counts = {
                table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                for table in DEMO_TABLES
            }
            foreign_keys = conn.execute(
                "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
                "WHERE contype = 'f' ORDER BY 1, 2"
            ).fetchall()
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(
                    "INSERT INTO customers (email, full_name, country) "
                    "VALUES ('customer1@example.com', 'Dup', 'US')"
                )
        assert counts == {
            "customers": 2000,
            "products": 1000,
            "orders": 5000,
            "order_items": 15000,
        }
        assert foreign_keys == [
            ("order_items", "orders"),
            ("order_items", "products"),
            ("orders", "customers"),
        ]
        assert env.snapshot_dir.is_dir()
    finally:
        demo.stop()
    assert not env.base_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(env.upstream_dsn, connect_timeout=3)


def test_restart_keeps_data_and_the_port(private_pg: LocalPostgres) -> None:
    info = private_pg.info
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
    private_pg.restart()
    assert private_pg.info.port == info.port
    assert _scalar(info.dsn(), "SELECT v FROM kept") == "still here"


def test_upstream_goes_away_and_comes_back(private_pg: LocalPostgres) -> None:
    dsn = private_pg.info.dsn()
    private_pg.stop_server_only()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3)
    private_pg.start_server_only()
    assert _scalar(dsn, "SELECT 1") == 1


def test_stop_removes_the_data_directory() -> None:
    server = LocalPostgres()
    data_dir = server.start().data_dir
    assert (data_dir / "PG_VERSION").is_file()
    server.stop()
    assert not data_dir.exists()


def test_failed_start_reports_the_server_log() -> None:
    server = LocalPostgres(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(LocalPostgresError, match="shared_buffers"):
        server.start()
