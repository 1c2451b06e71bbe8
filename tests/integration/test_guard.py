"""The guard end to end with real clients: every statement classified, policy.json enforced,
refusals answered the way PostgreSQL answers errors, and the session going on."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from backstop_core.events import PolicyInvalid, PolicyReloaded
from backstop_core.store import ApprovalRecord
from tests.conftest import AGENT_ROLE, PgServer
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import (
    RawClient,
    audit_where,
    backstop_cli,
    count,
    error_messages,
    policy_file,
    psql,
    role_reading_backslashes,
    table_exists,
    unique,
    upstream,
    wait_for_event,
    write_policy,
)

pytestmark = pytest.mark.integration

Factory = Callable[..., GatewayThread]

RULES = [
    {
        "name": "no-ledger-deletes",
        "match": {"operation": "DELETE", "tables": "ledger_*"},
        "action": "block",
        "reason": "Ledger entries are permanent.",
    },
    {
        "name": "intern-reads-only",
        "match": {"agent": "intern", "category": ["WRITE", "DDL"]},
        "action": "block",
        "reason": "The intern agent may only read.",
    },
]
AGENTS = [{"match": {"user": AGENT_ROLE.name, "application_name": "intern*"}, "agent": "intern"}]


def assert_refusal(message: str, rule: str) -> None:
    """What the agent reads: who refused, by which rule, and what it may do instead."""
    assert message.startswith("backstop:"), message
    assert f"rule '{rule}'" in message, message
    assert "Ask an operator" in message or "Add a WHERE clause" in message, message


@pytest.fixture
def ledger(pg: PgServer) -> Iterator[str]:
    """A table with rows 1, 2 and 3 that the rules protect from DELETE."""
    name = unique("ledger")
    upstream(
        pg,
        f"CREATE TABLE {name} (id int PRIMARY KEY, note text);"
        f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b'), (3, 'c');"
        f"GRANT ALL ON {name} TO {AGENT_ROLE.name}",
    )
    yield name
    upstream(pg, f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def guarded(gateway_factory: Factory, tmp_path: Path) -> GatewayThread:
    return gateway_factory(policy=policy_file(tmp_path, RULES, agents=AGENTS))


# ------------------------------------------------------------------ refusals


def test_psycopg_refusal_is_42501_and_the_session_goes_on(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as refused:
            conn.execute(f"DELETE FROM {ledger} WHERE id = %s", (1,))
        assert refused.value.sqlstate == "42501"
        assert_refusal(str(refused.value.diag.message_primary), "no-ledger-deletes")
        assert "Ledger entries are permanent." in str(refused.value)
        with pytest.raises(errors.InsufficientPrivilege, match="Add a WHERE clause"):
            conn.execute(f"DELETE FROM {ledger}")
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)
        conn.execute(f"UPDATE {ledger} SET note = 'changed' WHERE id = 1")
    assert upstream(pg, f"SELECT note FROM {ledger} WHERE id = 1") == [("changed",)]


def test_asyncpg_refusal_is_42501_and_the_session_goes_on(
    guarded: GatewayThread, ledger: str
) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(guarded.dsn())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await conn.execute(f"DELETE FROM {ledger} WHERE id = $1", 2)
            assert refused.value.sqlstate == "42501"
            assert_refusal(refused.value.args[0], "no-ledger-deletes")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"DELETE FROM {ledger} WHERE note = 'b'")  # simple protocol
            assert await conn.fetchval(f"SELECT count(*) FROM {ledger}") == 3
        finally:
            await conn.close()

    asyncio.run(run())


def test_psql_refusal_then_the_next_statement(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(
        pg,
        guarded.dsn(),
        stdin=f"DELETE FROM {ledger} WHERE id = 3;\nSELECT count(*) FROM {ledger};\n",
    )
    assert f"ERROR:  backstop: DELETE on public.{ledger}" in result.stderr
    assert "rule 'no-ledger-deletes'" in result.stderr
    assert result.stdout.strip() == "3"


def test_agent_rule_follows_user_and_application_name(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    intern = guarded.dsn(user=AGENT_ROLE.name, application_name="intern-7")
    with psycopg.connect(intern, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as refused:
            conn.execute(f"INSERT INTO {ledger} VALUES (10, 'x')")
        assert_refusal(str(refused.value), "intern-reads-only")
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)
    reporting = guarded.dsn(user=AGENT_ROLE.name, application_name="reporting")
    with psycopg.connect(reporting, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {ledger} VALUES (11, 'y')")
    assert count(pg, ledger) == 4
    rows = audit_where(guarded, lambda r: "INSERT" in r.sql, table=ledger)
    assert {(r.agent, r.decision, r.outcome) for r in rows} == {
        ("intern", "block", "blocked"),
        (f"{AGENT_ROLE.name}/reporting", "allow", "forwarded"),
    }


def test_shipped_policy_blocks_drop_schema(pg: PgServer, gateway_factory: Factory) -> None:
    schema = unique("scratch")
    upstream(pg, f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id int)")
    try:
        gateway = gateway_factory()  # no policy file: the shipped policy
        result = psql(pg, gateway.dsn(), "-c", f"DROP SCHEMA {schema} CASCADE")
        assert result.returncode == 1
        assert "ERROR:  backstop: DROP SCHEMA" in result.stderr
        assert "rule 'no-drop-schema'" in result.stderr
        assert "Ask an operator" in result.stderr
        assert table_exists(pg, f"{schema}.t")
    finally:
        upstream(pg, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# ------------------------------------------------------------------ transactions


def test_refusal_inside_a_transaction_fails_it_psycopg(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    with psycopg.connect(guarded.dsn()) as conn:
        conn.execute(f"INSERT INTO {ledger} VALUES (20, 'in txn')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {ledger} WHERE id = 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)
    assert count(pg, ledger) == 3


def test_refusal_inside_a_transaction_fails_it_asyncpg(guarded: GatewayThread, ledger: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(guarded.dsn())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {ledger} VALUES (21, 'in txn')")
                    await conn.execute(f"DELETE FROM {ledger} WHERE id = 1")
            assert await conn.fetchval(f"SELECT count(*) FROM {ledger}") == 3
        finally:
            await conn.close()

    asyncio.run(run())


def test_refusal_inside_a_transaction_fails_it_psql(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(
        pg,
        guarded.dsn(),
        stdin=(
            "BEGIN;\n"
            f"INSERT INTO {ledger} VALUES (22, 'in txn');\n"
            f"DELETE FROM {ledger} WHERE id = 2;\n"
            "SELECT 'inside';\n"
            "ROLLBACK;\n"
            f"SELECT count(*) FROM {ledger};\n"
        ),
    )
    errors_seen = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors_seen[0].startswith("ERROR:  backstop: DELETE"), result.stderr
    assert "current transaction is aborted" in errors_seen[1], result.stderr
    assert result.stdout.split()[-2:] == ["ROLLBACK", "3"]


def test_one_query_string_with_a_refused_statement_runs_none_of_it(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(
        pg,
        guarded.dsn(),
        "-c",
        f"INSERT INTO {ledger} VALUES (30, 'x'); DELETE FROM {ledger} WHERE id = 1; "
        f"INSERT INTO {ledger} VALUES (31, 'y')",
    )
    assert "statement 2 of 3" in result.stderr
    assert "rule 'no-ledger-deletes'" in result.stderr
    assert count(pg, ledger) == 3


# ------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
def test_refusal_in_a_psycopg_pipeline_changes_no_rows(
    pg: PgServer, guarded: GatewayThread, ledger: str, autocommit: bool
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=autocommit) as conn:
        with pytest.raises(psycopg.Error) as refused, conn.pipeline():
            for i in range(40, 45):
                conn.execute(f"INSERT INTO {ledger} VALUES (%s, 'piped')", (i,))
            conn.execute(f"DELETE FROM {ledger} WHERE id = %s", (1,))
            conn.execute(f"INSERT INTO {ledger} VALUES (%s, 'after')", (46,))
        assert refused.value.sqlstate == "42501", refused.value
        assert "no-ledger-deletes" in str(refused.value)
        if not autocommit:
            conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)
    assert count(pg, ledger) == 3


def test_refusal_in_an_asyncpg_batch_changes_no_rows(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(guarded.dsn())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.executemany(f"DELETE FROM {ledger} WHERE id = $1", [(1,), (2,), (3,)])
            await conn.executemany(
                f"INSERT INTO {ledger} VALUES ($1, $2)", [(50, "m"), (51, "n"), (52, "o")]
            )
        finally:
            await conn.close()
        intern = await asyncpg.connect(
            guarded.dsn(user=AGENT_ROLE.name, application_name="intern-2")
        )
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await intern.executemany(
                    f"INSERT INTO {ledger} VALUES ($1, $2)", [(60, "p"), (61, "q")]
                )
        finally:
            await intern.close()

    asyncio.run(run())
    assert [r[0] for r in upstream(pg, f"SELECT id FROM {ledger} ORDER BY id")] == [
        1,
        2,
        3,
        50,
        51,
        52,
    ]


# ------------------------------------------------------------------ lexer safety

PAYLOAD = "SELECT 'a\\', $$'; DROP TABLE {table}; --$$"


@pytest.fixture
def victim(pg: PgServer) -> Iterator[str]:
    name = unique("users")
    upstream(pg, f"CREATE TABLE {name} (id int); INSERT INTO {name} VALUES (1), (2)")
    yield name
    upstream(pg, f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def allow_all(gateway_factory: Factory, tmp_path: Path) -> GatewayThread:
    """Every risk allowed: what stays refused here, no policy can allow."""
    return gateway_factory(policy=policy_file(tmp_path))


def test_the_payload_is_one_harmless_select(
    pg: PgServer, allow_all: GatewayThread, victim: str
) -> None:
    payload = PAYLOAD.format(table=victim)
    expected = ("a\\", f"'; DROP TABLE {victim}; --")
    with psycopg.connect(allow_all.dsn(), autocommit=True) as conn:
        with psycopg.ClientCursor(conn) as cur:  # simple protocol
            assert cur.execute(payload).fetchall() == [expected]
        assert conn.execute(payload).fetchall() == [expected]  # extended protocol
    result = psql(pg, allow_all.dsn(), "-c", payload)
    assert result.returncode == 0, result.stderr
    assert table_exists(pg, victim)


@pytest.mark.parametrize(
    "sql",
    [
        "SET standard_conforming_strings = off",
        "SET SESSION standard_conforming_strings TO 'of'",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "BEGIN; SET LOCAL standard_conforming_strings = 0; {payload}; COMMIT",
        "SET client_encoding = 'SJIS'",
        "SET NAMES 'GBK'",
        "SET backslash_quote = on",
        "ALTER ROLE postgres SET standard_conforming_strings = off",
        "ALTER DATABASE postgres SET standard_conforming_strings = off",
    ],
)
def test_lexer_unsafe_settings_are_refused_under_any_policy(
    pg: PgServer, allow_all: GatewayThread, victim: str, sql: str
) -> None:
    payload = PAYLOAD.format(table=victim)
    try:
        with psycopg.connect(allow_all.dsn(), autocommit=True) as conn:
            with psycopg.ClientCursor(conn) as cur:
                with pytest.raises(errors.InsufficientPrivilege) as refused:
                    cur.execute(sql.format(payload=payload))
                assert "rule 'lexer-safety'" in str(refused.value)
                assert "No policy can allow this" in str(refused.value)
                cur.execute(payload)  # the session goes on, still reading quotes safely
            assert conn.info.parameter_status("standard_conforming_strings") == "on"
            assert conn.info.parameter_status("client_encoding") == "UTF8"
    finally:
        if sql.startswith("ALTER"):  # had it got through, keep the shared server clean
            target = sql.split(" SET ")[0]
            upstream(pg, f"{target} RESET standard_conforming_strings")
    assert table_exists(pg, victim)


def test_alter_system_is_refused_under_any_policy(pg: PgServer, allow_all: GatewayThread) -> None:
    try:
        result = psql(
            pg, allow_all.dsn(), "-c", "ALTER SYSTEM SET standard_conforming_strings = off"
        )
        assert "rule 'lexer-safety'" in result.stderr
    finally:
        upstream(pg, "ALTER SYSTEM RESET standard_conforming_strings")


def test_psql_encoding_switch_is_refused(pg: PgServer, allow_all: GatewayThread) -> None:
    result = psql(pg, allow_all.dsn(), stdin="\\encoding SJIS\nSHOW client_encoding;\n")
    assert "SJIS: invalid encoding name" in result.stderr  # psql's words for any refusal
    assert result.stdout.strip() == "UTF8"
    rows = audit_where(allow_all, lambda r: "client_encoding" in r.sql.lower(), text="SJIS")
    assert [(r.decision, r.rule, r.outcome) for r in rows] == [("block", "lexer-safety", "blocked")]


def test_unsafe_startup_settings_are_refused_at_connect(
    pg: PgServer, allow_all: GatewayThread
) -> None:
    for params in (
        {"options": "-c standard_conforming_strings=off"},
        {"options": "--standard_conforming_strings=false"},
        {"options": "-c backslash_quote=on"},
        {"client_encoding": "gbk"},
    ):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(allow_all.dsn(**params))
        assert "backstop: connection refused" in str(refused.value), params

    for env in (
        {"PGOPTIONS": "-c standard_conforming_strings=off"},
        {"PGCLIENTENCODING": "SJIS"},
    ):
        result = psql(pg, allow_all.dsn(), "-c", "SELECT 1", env=env)
        assert result.returncode == 2, env
        assert "FATAL:  backstop: connection refused" in result.stderr, result.stderr

    async def run() -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="connection refused"):
            await asyncpg.connect(
                allow_all.dsn(), server_settings={"standard_conforming_strings": "off"}
            )

    asyncio.run(run())


def test_dashed_startup_option_is_refused_at_connect(allow_all: GatewayThread) -> None:
    with pytest.raises(psycopg.OperationalError, match="backstop: connection refused"):
        psycopg.connect(allow_all.dsn(options="--standard-conforming-strings=off"))


def test_dashed_startup_option_still_runs_nothing(
    pg: PgServer, allow_all: GatewayThread, victim: str
) -> None:
    dsn = allow_all.dsn(options="-c standard-conforming-strings=off")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, psycopg.ClientCursor(conn) as cur:
            assert conn.info.parameter_status("standard_conforming_strings") == "off"
            with pytest.raises(errors.InsufficientPrivilege, match="standard_conforming"):
                cur.execute(PAYLOAD.format(table=victim))
    except psycopg.OperationalError as refused:  # refused at connect: better still
        assert "backstop: connection refused" in str(refused)
    assert table_exists(pg, victim)


@pytest.fixture
def lax_role(pg: PgServer) -> Iterator[str]:
    """A login role whose own default switches standard_conforming_strings off, set by a
    DBA directly on the server."""
    with role_reading_backslashes(pg) as role:
        yield role


def test_sessions_that_start_lexer_unsafe_run_nothing(
    pg: PgServer, allow_all: GatewayThread, victim: str, lax_role: str, fresh_db: str
) -> None:
    upstream(pg, f"GRANT ALL ON {victim} TO {lax_role}")
    payload = PAYLOAD.format(table=victim)
    with psycopg.connect(allow_all.dsn(user=lax_role), autocommit=True) as conn:
        assert conn.info.parameter_status("standard_conforming_strings") == "off"
        for sql in (payload, "SET standard_conforming_strings = on"):
            with (
                pytest.raises(errors.InsufficientPrivilege, match="standard_conforming_strings"),
                psycopg.ClientCursor(conn) as cur,
            ):
                cur.execute(sql)
    assert table_exists(pg, victim)

    database = fresh_db.rsplit("/", 1)[1].split("?")[0]
    upstream(pg, f"ALTER DATABASE {database} SET client_encoding = 'SJIS'")
    upstream(pg, "CREATE TABLE users (id int)", database=database)
    result = psql(pg, allow_all.dsn(database=database), "-c", PAYLOAD.format(table="users"))
    assert "backstop: refused: client_encoding" in result.stderr, result.stderr
    assert table_exists(pg, "users", database=database)


@pytest.fixture
def settings_helper(pg: PgServer) -> Iterator[str]:
    """A helper a DBA might well have: it sets any session setting by name."""
    name = unique("set_app_setting")
    upstream(
        pg,
        f"CREATE FUNCTION {name}(name text, value text) RETURNS text LANGUAGE sql "
        "AS $$ SELECT set_config(name, value, false) $$",
    )
    yield name
    upstream(pg, f"DROP FUNCTION IF EXISTS {name}(text, text)")


def test_a_setting_changed_by_a_function_locks_the_session(
    pg: PgServer, gateway_factory: Factory, victim: str, settings_helper: str
) -> None:
    gateway = gateway_factory()  # the shipped policy
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT {settings_helper}('standard_conforming_strings', 'off')")
        with (
            psycopg.ClientCursor(conn) as cur,
            pytest.raises(errors.InsufficientPrivilege, match="standard_conforming"),
        ):
            cur.execute(PAYLOAD.format(table=victim))
    assert table_exists(pg, victim)


def test_payload_sent_right_behind_a_hidden_setting_change_is_refused(
    pg: PgServer, gateway_factory: Factory, victim: str, settings_helper: str
) -> None:
    gateway = gateway_factory()  # the shipped policy
    client = RawClient(gateway.port)
    try:
        answers = client.queries_at_once(
            f"SELECT {settings_helper}('standard_conforming_strings', 'off')",
            PAYLOAD.format(table=victim),
        )
    finally:
        client.close()
    assert table_exists(pg, victim), f"the payload dropped the table: {answers}"
    assert any("standard_conforming_strings" in m for m in error_messages(answers))


def test_pipelined_statement_after_a_hidden_setting_change_is_refused(
    pg: PgServer, gateway_factory: Factory, victim: str, settings_helper: str
) -> None:
    gateway = gateway_factory()  # the shipped policy
    # One statement that Backstop reads as a SELECT of two string constants; with backslash
    # escapes on, a CTE that empties the table.
    hidden = (
        f"WITH q AS (SELECT 'x\\', $$') , d AS (DELETE FROM {victim} RETURNING 1) "
        "SELECT count(*) FROM d --$$) SELECT 1"
    )
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as conn,
        contextlib.suppress(errors.InsufficientPrivilege),
        conn.pipeline(),
    ):
        conn.execute(f"SELECT {settings_helper}('standard_conforming_strings', 'off')")
        conn.execute(hidden)
    assert count(pg, victim) == 2


# ------------------------------------------------------------------ hot reload


def test_policy_edit_applies_to_open_sessions(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    path = policy_file(tmp_path / "policy", [])
    gateway = gateway_factory(policy=path)
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)
        mark = len(gateway.events)
        policy_file(
            tmp_path / "policy",
            [
                {
                    "name": "ledger-is-closed",
                    "match": {"tables": ledger},
                    "action": "block",
                    "reason": "The ledger is closed for the audit.",
                }
            ],
        )
        deadline = time.monotonic() + 5
        refusal = None
        while refusal is None and time.monotonic() < deadline:
            try:
                conn.execute(f"SELECT count(*) FROM {ledger}")
                time.sleep(0.1)
            except errors.InsufficientPrivilege as exc:
                refusal = str(exc)
        assert refusal is not None, "the edited policy never applied to the open session"
        assert_refusal(refusal, "ledger-is-closed")
        reloaded = wait_for_event(gateway, PolicyReloaded, mark)
        assert reloaded is not None
        assert gateway.runtime is not None
        assert reloaded.version == gateway.runtime.policy.version


def test_invalid_policy_edit_keeps_the_last_good_policy(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    path = policy_file(tmp_path / "policy", RULES, agents=AGENTS)
    gateway = gateway_factory(policy=path)
    assert gateway.runtime is not None
    version = gateway.runtime.policy.version
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        write_policy(
            path,
            {
                "defaults": {"LOW": "allow"},
                "rules": [{"name": "x", "match": {"tabels": "*"}, "action": "allow"}],
            },
        )
        invalid = wait_for_event(gateway, PolicyInvalid)
        assert invalid is not None, "no PolicyInvalid event after a broken edit"
        assert "rules[0].match.tabels" in invalid.error
        assert "defaults.HIGH" in invalid.error
        assert gateway.runtime.policy.version == version
        with pytest.raises(errors.InsufficientPrivilege, match="no-ledger-deletes"):
            conn.execute(f"DELETE FROM {ledger} WHERE id = 1")
        assert conn.execute(f"SELECT count(*) FROM {ledger}").fetchone() == (3,)


def test_policy_edit_of_agent_mapping_applies_to_open_sessions(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    path = policy_file(tmp_path / "policy", RULES)  # no agent mapping yet
    gateway = gateway_factory(policy=path)
    dsn = gateway.dsn(user=AGENT_ROLE.name, application_name="intern-9")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {ledger} VALUES (70, 'before')")
        mark = len(gateway.events)
        policy_file(tmp_path / "policy", RULES, agents=AGENTS)
        assert wait_for_event(gateway, PolicyReloaded, mark) is not None
        with pytest.raises(errors.InsufficientPrivilege, match="intern-reads-only"):
            conn.execute(f"INSERT INTO {ledger} VALUES (71, 'after')")


def close_the_ledger(gateway: GatewayThread, directory: Path, ledger: str) -> None:
    """Edit the gateway's policy to block every statement on `ledger`; wait for the reload."""
    mark = len(gateway.events)
    policy_file(
        directory, [{"name": "ledger-is-closed", "match": {"tables": ledger}, "action": "block"}]
    )
    assert wait_for_event(gateway, PolicyReloaded, mark) is not None


def test_a_prepared_statement_run_again_follows_a_policy_edit(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    """A statement run again and again is judged once per session and policy: an edit
    must still reach its next run, and every run is audited."""
    path = policy_file(tmp_path / "policy", [])
    gateway = gateway_factory(policy=path)
    sql = f"SELECT note FROM {ledger} WHERE id = $1"

    async def run() -> None:
        conn = await asyncpg.connect(gateway.dsn())
        try:
            statement = await conn.prepare(sql)
            assert [await statement.fetchval(i) for i in (1, 2, 3, 1, 2)] == list("abcab")
            close_the_ledger(gateway, tmp_path / "policy", ledger)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="ledger-is-closed"):
                await statement.fetchval(3)
        finally:
            await conn.close()

    asyncio.run(run())
    rows = audit_where(gateway, lambda r: r.sql == sql and r.outcome is not None)
    assert sorted(r.outcome or "" for r in rows) == ["blocked"] + ["forwarded"] * 5


def test_statements_of_one_form_follow_a_policy_edit(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    """Simple-protocol statements that differ only in literals are judged once per form,
    session and policy: an edit still reaches the next one, and each is audited."""
    path = policy_file(tmp_path / "policy", [])
    gateway = gateway_factory(policy=path)
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as conn,
        psycopg.ClientCursor(conn) as cur,  # literals inlined: the simple protocol
    ):
        keys = range(1, 25)  # forms are looked for in one statement in eight at first
        for key in keys:
            cur.execute(f"SELECT note FROM {ledger} WHERE id = %s", (key,))
            assert cur.fetchone() == (("abc"[key - 1],) if key <= 3 else None)
        close_the_ledger(gateway, tmp_path / "policy", ledger)
        with pytest.raises(errors.InsufficientPrivilege, match="ledger-is-closed"):
            cur.execute(f"SELECT note FROM {ledger} WHERE id = %s", (3,))
    rows = audit_where(
        gateway, lambda r: r.sql.startswith(f"SELECT note FROM {ledger} WHERE id = ")
    )
    assert sorted((r.sql.rsplit(" ", 1)[1], r.outcome or "") for r in rows) == sorted(
        [(str(key), "forwarded") for key in keys] + [("3", "blocked")]
    )


def test_a_prepared_statement_run_again_follows_the_agent(
    pg: PgServer, gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    """SET application_name can make the session another agent: a statement it ran
    before as one agent is judged again as the other."""
    gateway = gateway_factory(policy=policy_file(tmp_path, RULES, agents=AGENTS))
    sql = f"INSERT INTO {ledger} VALUES ($1, 'added')"

    async def run() -> None:
        conn = await asyncpg.connect(gateway.dsn(user=AGENT_ROLE.name))
        try:
            statement = await conn.prepare(sql)
            for key in (10, 11):
                await statement.fetch(key)
            await conn.execute("SET application_name = 'intern-3'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="intern-reads-only"):
                await statement.fetch(12)
        finally:
            await conn.close()

    asyncio.run(run())
    assert count(pg, ledger) == 5


def test_a_prepared_statement_run_again_follows_the_search_path(
    pg: PgServer, gateway_factory: Factory, tmp_path: Path
) -> None:
    """The same text names another table once search_path changes (the server plans it
    again): the gateway judges it again too."""
    schema, table = unique("vault"), unique("notes")
    upstream(
        pg,
        f"CREATE TABLE public.{table} (id int); CREATE SCHEMA {schema};"
        f"CREATE TABLE {schema}.{table} (id int); INSERT INTO {schema}.{table} VALUES (1)",
    )
    rule = {"name": "vault-is-sealed", "match": {"tables": f"{schema}.*"}, "action": "block"}
    gateway = gateway_factory(policy=policy_file(tmp_path, [rule]))
    sql = f"SELECT count(*) FROM {table} WHERE id > $1"

    async def run() -> None:
        conn = await asyncpg.connect(gateway.dsn())
        try:
            statement = await conn.prepare(sql)
            assert [await statement.fetchval(0) for _ in range(3)] == [0, 0, 0]
            await conn.execute(f"SET search_path = {schema}, public")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="vault-is-sealed"):
                await statement.fetchval(0)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    finally:
        upstream(pg, f"DROP SCHEMA {schema} CASCADE; DROP TABLE public.{table}")


def test_invalid_policy_edit_opens_an_alert(gateway_factory: Factory, tmp_path: Path) -> None:
    path = policy_file(tmp_path / "policy", RULES)
    gateway = gateway_factory(policy=path)
    write_policy(path, "{ not json")
    assert wait_for_event(gateway, PolicyInvalid) is not None
    assert gateway.runtime is not None and gateway.runtime.store is not None
    store = gateway.runtime.store
    alerts = gateway.call(store.alerts_list(status="open"))
    assert any("policy" in a.title.lower() for a in alerts)


# ------------------------------------------------------------------ row estimates


@pytest.fixture
def big(pg: PgServer) -> Iterator[str]:
    name = unique("big")
    upstream(
        pg,
        f"CREATE TABLE {name} (id int PRIMARY KEY, note text);"
        f"INSERT INTO {name} SELECT g, 'n' FROM generate_series(1, 5000) g;"
        f"ANALYZE {name}",
    )
    yield name
    upstream(pg, f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def estimating(gateway_factory: Factory, tmp_path: Path) -> GatewayThread:
    rule = {
        "name": "big-writes",
        "match": {"category": "WRITE", "rows_over": 1000},
        "action": "block",
        "reason": "It changes more than 1000 rows.",
    }
    return gateway_factory(policy=policy_file(tmp_path, [rule]))


def test_rows_over_uses_the_planner_estimate(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as refused:
            conn.execute(f"UPDATE {big} SET note = 'all' WHERE id > 100")
        assert_refusal(str(refused.value), "big-writes")
        assert re.search(r"about 4,\d{3} rows", str(refused.value))
        conn.execute(f"DELETE FROM {big} WHERE id = 7")
    assert count(pg, big) == 4999
    assert upstream(pg, f"SELECT count(*) FROM {big} WHERE note = 'all'") == [(0,)]
    rows = {r.operation: r for r in audit_where(estimating, lambda r: True, table=big)}
    assert 4000 < (rows["UPDATE"].row_estimate or 0) < 5000
    assert rows["UPDATE"].decision == "block" and rows["UPDATE"].rule == "big-writes"
    assert rows["DELETE"].row_estimate == 1
    assert rows["DELETE"].outcome == "forwarded"


def test_rows_over_applies_to_text_parameters(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="big-writes"):
            conn.execute(f"UPDATE {big} SET note = 'all' WHERE id > %t", (100,))
        conn.execute(f"UPDATE {big} SET note = 'one' WHERE id = %t", (5,))
    assert upstream(pg, f"SELECT count(*) FROM {big} WHERE note <> 'n'") == [(1,)]


def test_rows_over_holds_a_large_update_for_an_operator(
    pg: PgServer, gateway_factory: Factory, tmp_path: Path, big: str
) -> None:
    rule = {"name": "approve-big-writes", "match": {"category": "WRITE", "rows_over": 1000}}
    state = tmp_path / "state"
    gateway = gateway_factory(
        policy=policy_file(tmp_path, [{**rule, "action": "approve"}]), state_dir=state
    )
    notices: list[str] = []
    outcome: list[BaseException] = []

    def agent() -> None:
        with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
            conn.execute(f"DELETE FROM {big} WHERE id = 1")  # small: not held
            try:
                conn.execute(f"UPDATE {big} SET note = 'all' WHERE id > 100")
            except psycopg.Error as exc:
                outcome.append(exc)

    worker = threading.Thread(target=agent)
    worker.start()
    try:
        pending: list[ApprovalRecord] = []
        deadline = time.monotonic() + 10
        while not pending and time.monotonic() < deadline:
            assert gateway.runtime is not None and gateway.runtime.store is not None
            pending = gateway.call(gateway.runtime.store.approvals_list(status="pending"))
            time.sleep(0.05)
        assert len(pending) == 1, "the large UPDATE was not held"
        assert pending[0].operation == "UPDATE" and (pending[0].row_estimate or 0) > 4000
        denied = backstop_cli(
            "deny", str(pending[0].id), "--reason", "too many rows", "--state-dir", str(state)
        )
        assert denied.returncode == 0, denied.stderr
    finally:
        worker.join(15)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.InsufficientPrivilege)
    assert "too many rows" in str(outcome[0])
    assert any(f"waiting for approval {pending[0].id}" in n for n in notices), notices
    assert count(pg, big) == 4999
    assert upstream(pg, f"SELECT count(*) FROM {big} WHERE note = 'all'") == [(0,)]
    (held,) = audit_where(gateway, lambda r: r.operation == "UPDATE", table=big)
    assert (held.decision, held.outcome, held.approval_id) == ("approve", "denied", pending[0].id)
    assert held.row_estimate == pending[0].row_estimate


def test_rows_over_sees_a_delete_inside_a_cte(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        try:
            with pytest.raises(errors.InsufficientPrivilege, match="big-writes"):
                conn.execute(
                    f"WITH d AS (DELETE FROM {big} WHERE id > 100 RETURNING 1) "
                    "SELECT count(*) FROM d"
                )
        finally:
            remaining = count(pg, big)
    assert remaining == 5000


def test_rows_over_applies_to_insert_select(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        try:
            with pytest.raises(errors.InsufficientPrivilege, match="big-writes"):
                conn.execute(
                    f"INSERT INTO {big} SELECT g, 'copy' FROM generate_series(10001, 20000) g"
                )
        finally:
            remaining = count(pg, big)
    assert remaining == 5000


@pytest.mark.parametrize("client", ["asyncpg", "psycopg"])
def test_rows_over_applies_to_binary_parameters(
    pg: PgServer, estimating: GatewayThread, big: str, client: str
) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(estimating.dsn())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="big-writes"):
                await conn.execute(f"DELETE FROM {big} WHERE id > $1", 100)
        finally:
            await conn.close()

    try:
        if client == "asyncpg":
            asyncio.run(run())
        else:
            with (
                psycopg.connect(estimating.dsn(), autocommit=True) as conn,
                pytest.raises(errors.InsufficientPrivilege, match="big-writes"),
            ):
                conn.execute(f"DELETE FROM {big} WHERE id > %s", (100,))
    finally:
        remaining = count(pg, big)
    assert remaining == 5000


def test_one_failed_estimate_does_not_stop_later_ones(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error):  # EXPLAIN fails on the value, and so would the UPDATE
            conn.execute(f"UPDATE {big} SET note = 'x' WHERE id > %t", ("not a number",))
        conn.execute(f"UPDATE {big} SET note = 'one' WHERE id = %t", (9,))
        with pytest.raises(errors.InsufficientPrivilege, match=r"about 4,\d{3} rows"):
            conn.execute(f"UPDATE {big} SET note = 'all' WHERE id > %t", (100,))
    assert upstream(pg, f"SELECT id FROM {big} WHERE note <> 'n'") == [(9,)]
    (small,) = audit_where(estimating, lambda r: "'one'" in r.sql, table=big)
    assert small.row_estimate == 1


def test_rows_over_applies_to_parameterized_batches(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        try:
            with pytest.raises(errors.InsufficientPrivilege, match="big-writes"):
                cur.executemany(f"UPDATE {big} SET note = 'all' WHERE id > %t", [(100,), (200,)])
        finally:
            changed = upstream(pg, f"SELECT count(*) FROM {big} WHERE note = 'all'")
    assert changed == [(0,)]


def test_execute_of_a_prepared_statement_is_estimated(
    pg: PgServer, estimating: GatewayThread, big: str
) -> None:
    with psycopg.connect(estimating.dsn(), autocommit=True) as conn:
        conn.execute(f"PREPARE one (int) AS DELETE FROM {big} WHERE id = $1")
        conn.execute("EXECUTE one(7)")  # as allowed as DELETE ... WHERE id = 7
        conn.execute(f"PREPARE wipe (int) AS DELETE FROM {big} WHERE id > $1")
        with pytest.raises(errors.InsufficientPrivilege, match=r"about 4,\d{3} rows"):
            conn.execute("EXECUTE wipe(100)")
    assert count(pg, big) == 4999
    (executed,) = audit_where(estimating, lambda r: r.sql == "EXECUTE one(7)")
    assert executed.row_estimate == 1


# ------------------------------------------------------------------ WAL position


def test_table_destructive_statements_record_the_wal_position(
    pg: PgServer, allow_all: GatewayThread
) -> None:
    scratch = unique("scratch")
    upstream(pg, f"CREATE TABLE {scratch} (id int); INSERT INTO {scratch} VALUES (1)")
    before = upstream(pg, "SELECT pg_current_wal_lsn()")[0][0]
    with psycopg.connect(allow_all.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT count(*) FROM {scratch}")
        conn.execute(f"TRUNCATE {scratch}")
        between = upstream(pg, "SELECT pg_current_wal_lsn()")[0][0]
        conn.execute(f"DROP TABLE {scratch}")
    assert not table_exists(pg, scratch)
    rows = {r.operation: r for r in audit_where(allow_all, lambda r: True, table=scratch)}
    assert set(rows) == {"SELECT", "TRUNCATE", "DROP_TABLE"}
    assert rows["SELECT"].wal_lsn is None
    for operation in ("TRUNCATE", "DROP_TABLE"):
        lsn = rows[operation].wal_lsn
        assert lsn is not None and re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", lsn), lsn
        newer = upstream(pg, f"SELECT '{lsn}'::pg_lsn >= '{before}'::pg_lsn")[0][0]
        assert newer, (lsn, before)
        assert rows[operation].outcome == "forwarded"
    # Read just before each ran: TRUNCATE's position precedes the WAL TRUNCATE wrote.
    truncate, drop = rows["TRUNCATE"].wal_lsn, rows["DROP_TABLE"].wal_lsn
    ordered = f"SELECT '{truncate}'::pg_lsn < '{between}', '{between}' <= '{drop}'::pg_lsn"
    assert upstream(pg, ordered) == [(True, True)]


# ------------------------------------------------------------------ prepared statements


def test_execute_is_judged_as_what_was_prepared_shipped_policy(
    pg: PgServer, gateway_factory: Factory, ledger: str
) -> None:
    gateway = gateway_factory()
    result = psql(pg, gateway.dsn(), stdin=f"PREPARE p AS DELETE FROM {ledger};\nEXECUTE p;\n")
    refusals = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(refusals) == 2, result.stderr
    assert refusals[0].startswith(f"ERROR:  backstop: PREPARE on public.{ledger}")
    assert "rule 'snapshot-before-destroying-a-table'" in refusals[0]
    # The PREPARE was refused, so p does not exist: EXECUTE p runs something Backstop
    # cannot see, which is CRITICAL and refused, never forwarded as an opaque EXECUTE.
    assert refusals[1].startswith("ERROR:  backstop: EXECUTE")
    assert "CRITICAL" in refusals[1]
    for refusal in refusals:
        assert "needs an operator's approval" in refusal
        assert "the statement is refused" in refusal
    assert count(pg, ledger) == 3


def test_execute_is_judged_as_what_was_prepared(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(
        pg,
        guarded.dsn(),
        stdin=(
            f"PREPARE p (int) AS DELETE FROM {ledger} WHERE id = $1;\n"
            "EXECUTE p(1);\n"
            f"PREPARE s AS SELECT count(*) FROM {ledger};\n"
            "EXECUTE s;\n"
        ),
    )
    assert "ERROR:  backstop: DELETE on public." in result.stderr
    assert "rule 'no-ledger-deletes'" in result.stderr
    assert result.stdout.split() == ["PREPARE", "PREPARE", "3"]
    rows = audit_where(guarded, lambda r: r.sql.startswith("EXECUTE p"))
    assert rows and rows[0].operation == "DELETE" and rows[0].outcome == "blocked"


def test_protocol_prepared_statements_are_judged_by_their_sql(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(errors.InsufficientPrivilege, match="no-ledger-deletes"):
                conn.execute(f"DELETE FROM {ledger} WHERE id = %s", (1,), prepare=True)
        assert conn.execute(f"SELECT count(*) FROM {ledger}", prepare=True).fetchone() == (3,)

    async def run() -> None:
        conn = await asyncpg.connect(guarded.dsn())
        try:
            statement = await conn.prepare(f"DELETE FROM {ledger} WHERE id = $1")
            for key in (1, 2):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await statement.fetch(key)
        finally:
            await conn.close()

    asyncio.run(run())
    assert count(pg, ledger) == 3


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
def test_sql_execute_of_a_protocol_prepared_statement_is_judged(
    pg: PgServer, guarded: GatewayThread, ledger: str, client: str
) -> None:
    if client == "psycopg":
        with psycopg.connect(guarded.dsn(), autocommit=True) as conn:
            conn.pgconn.prepare(b"wipe", f"DELETE FROM {ledger}".encode())
            with contextlib.suppress(errors.InsufficientPrivilege):
                conn.execute("EXECUTE wipe")
    else:

        async def run() -> None:
            conn = await asyncpg.connect(guarded.dsn())
            try:
                statement = await conn.prepare(f"DELETE FROM {ledger}")
                await conn.execute(f"EXECUTE {statement.get_name()}")
            except asyncpg.InsufficientPrivilegeError:
                pass
            finally:
                await conn.close()

        asyncio.run(run())
    assert count(pg, ledger) == 3


def test_a_failed_prepare_does_not_change_what_execute_is_judged_as(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(
        pg,
        guarded.dsn(),
        stdin=(
            f"PREPARE p (int) AS DELETE FROM {ledger} WHERE id = $1;\n"
            "PREPARE p (int) AS SELECT $1;\n"
            "EXECUTE p(1);\n"
        ),
    )
    assert 'prepared statement "p" already exists' in result.stderr
    assert count(pg, ledger) == 3


def test_prepare_and_execute_in_one_string_is_judged(
    pg: PgServer, guarded: GatewayThread, ledger: str
) -> None:
    result = psql(pg, guarded.dsn(), "-c", f"PREPARE p AS DELETE FROM {ledger}; EXECUTE p")
    assert "rule 'no-ledger-deletes'" in result.stderr
    assert count(pg, ledger) == 3


# ------------------------------------------------------------------ search_path


def test_table_rules_follow_the_session_search_path(
    pg: PgServer, gateway_factory: Factory, tmp_path: Path
) -> None:
    schema = unique("billing")
    upstream(
        pg,
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.invoices (id int);"
        f"INSERT INTO {schema}.invoices VALUES (1), (2)",
    )
    rule = {"name": "billing-is-off-limits", "match": {"tables": f"{schema}.*"}, "action": "block"}
    gateway = gateway_factory(policy=policy_file(tmp_path, [rule]))
    try:
        with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(f"DELETE FROM {schema}.invoices WHERE id = 1")
            conn.execute(f"SET search_path = {schema}")
            with contextlib.suppress(errors.InsufficientPrivilege):
                conn.execute("DELETE FROM invoices WHERE id = 2")
        assert count(pg, f"{schema}.invoices") == 2
    finally:
        upstream(pg, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# ------------------------------------------------------------------ statements of one form


def test_statements_differing_in_literals_are_each_audited_and_each_judged(
    allow_all: GatewayThread,
) -> None:
    """A simple-protocol client sends one statement with ever new literals: each is on the
    record with its own text, and a literal that changes the verdict is still seen."""
    marker = unique("form")
    with psycopg.connect(allow_all.dsn(), autocommit=True) as conn:
        with psycopg.ClientCursor(conn) as cur:  # literals inlined: the simple protocol
            for i in range(5):
                cur.execute(f"SELECT {i} AS n, %s AS marker", (marker,))
                assert cur.fetchone() == (i, marker)
            cur.execute("SELECT set_config('application_name', %s, false)", (marker,))
            with pytest.raises(errors.InsufficientPrivilege, match="lexer-safety"):
                cur.execute("SELECT set_config('standard_conforming_strings', 'off', false)")
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
    rows = audit_where(allow_all, lambda r: marker in r.sql and " AS n, " in r.sql)
    assert sorted(r.sql for r in rows) == [
        f"SELECT {i} AS n, '{marker}' AS marker" for i in range(5)
    ]
    assert {(r.decision, r.outcome) for r in rows} == {("allow", "forwarded")}


@pytest.mark.parametrize(
    "hidden",
    [
        "SELECT id FROM {t} WHERE id = 1 -- '\n; DROP TABLE {t}; SELECT '1' -- '",
        "SELECT id FROM {t} WHERE id = 1 /* ' */; DROP TABLE {t}; SELECT /* ' */ 1",
        "SELECT id FROM {t} WHERE id::text = E'1\\''; DROP TABLE {t}; SELECT '1'",
        "SELECT id FROM {t} WHERE id = 1;DROP TABLE {t}",
    ],
)
def test_a_statement_hidden_in_a_familiar_shape_is_judged_on_its_own(
    pg: PgServer, gateway_factory: Factory, victim: str, hidden: str
) -> None:
    """After a stream of one form (judged once, then shared), text that only a careless
    literal scanner would take for that form again is classified itself, and refused."""
    gateway = gateway_factory()  # the shipped policy: DROP TABLE needs approval + snapshot
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as conn,
        psycopg.ClientCursor(conn) as cur,  # literals inlined: the simple protocol
    ):
        for i in range(20):
            rows = cur.execute(f"SELECT id FROM {victim} WHERE id = {i}").fetchall()
            assert rows == ([(i,)] if i in (1, 2) else [])
        with pytest.raises(errors.InsufficientPrivilege, match="DROP TABLE"):
            cur.execute(hidden.format(t=victim))
    assert table_exists(pg, victim)
