"""How much classify() adds on top of parsing, on a realistic mix of agent SQL.

Prints the per-statement median in microseconds for
  (a) pglast.parser.parse_sql_json alone: the target's baseline,
  (d) parse_sql_json and decoding its JSON with orjson, as the classifier does: the least
      any classifier that reads the tree pays,
  (b) classify on statements it has not seen (a fresh Classifier per round),
  (c) classify on statements it has seen (the cache),
and the ratio (b)/(a) against the target of 2.0, with (b)/(d) beside it. Run:
python bench/bench_classify.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from pglast.parser import parse_sql_json

from backstop_core.classify import Classifier

TARGET_RATIO = 2.0
ROUNDS = 101

STATEMENTS: tuple[str, ...] = (
    # reads
    "SELECT id, email, created_at FROM users WHERE id = 42",
    "SELECT * FROM orders WHERE customer_id = 17 AND status = 'open' ORDER BY created_at DESC "
    "LIMIT 50",
    "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
    "WHERE o.created_at >= now() - interval '7 days'",
    "SELECT count(*) FROM events WHERE kind = 'login' AND occurred_at > '2024-01-01'",
    "SELECT customer_id, sum(total) AS revenue FROM orders GROUP BY customer_id "
    "HAVING sum(total) > 1000 ORDER BY revenue DESC",
    "SELECT id, name, row_number() OVER (PARTITION BY team_id ORDER BY score DESC) AS rank "
    "FROM players",
    "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') "
    "SELECT status, count(*) FROM recent GROUP BY status",
    "SELECT p.id, p.title FROM posts p WHERE EXISTS (SELECT 1 FROM comments c "
    "WHERE c.post_id = p.id AND c.flagged)",
    "SELECT u.id, l.last_login FROM users u LEFT JOIN LATERAL (SELECT max(at) AS last_login "
    "FROM logins WHERE user_id = u.id) l ON true",
    "SELECT data->>'name' AS name, data->'tags' FROM documents WHERE data @> '{\"public\": true}'",
    "SELECT relname, n_live_tup FROM pg_stat_user_tables ORDER BY n_live_tup DESC LIMIT 10",
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database()",
    "SELECT id FROM products WHERE sku = ANY($1) AND deleted_at IS NULL",
    "SELECT name FROM products WHERE price BETWEEN 10 AND 20 "
    "UNION SELECT name FROM archived_products",
    "SELECT version()",
    "SELECT * FROM invoices WHERE id = 9001 FOR UPDATE",
    "SELECT a.id, b.id FROM accounts a JOIN balances b USING (account_id) WHERE a.region = 'eu' "
    "AND b.amount < 0",
    "SELECT date_trunc('day', created_at) AS day, count(*) FROM signups GROUP BY 1 ORDER BY 1",
    "SELECT id, coalesce(nickname, first_name) FROM members WHERE team_id IN (1, 2, 3)",
    # writes
    "INSERT INTO users (email, name) VALUES ('a@example.com', 'Ann') RETURNING id",
    "INSERT INTO events (kind, payload, occurred_at) VALUES ('click', '{\"x\": 1}', now())",
    "INSERT INTO order_items (order_id, product_id, qty) VALUES (1, 2, 3), (1, 4, 1), (1, 9, 2)",
    "INSERT INTO daily_totals (day, total) SELECT date_trunc('day', created_at), sum(total) "
    "FROM orders GROUP BY 1",
    "INSERT INTO settings (key, value) VALUES ('theme', 'dark') ON CONFLICT (key) "
    "DO UPDATE SET value = excluded.value",
    "UPDATE users SET last_seen = now() WHERE id = 42",
    "UPDATE orders SET status = 'shipped', shipped_at = now() WHERE id = 1001 AND status = 'paid'",
    "UPDATE inventory SET qty = qty - 1 WHERE product_id = 7 AND qty > 0",
    "UPDATE accounts a SET balance = a.balance + t.amount FROM transfers t "
    "WHERE t.account_id = a.id AND t.applied = false",
    "UPDATE sessions SET expired = true WHERE last_seen < now() - interval '30 days'",
    "UPDATE products SET price = price * 1.1 WHERE category_id = 3",
    "DELETE FROM sessions WHERE expires_at < now()",
    "DELETE FROM cart_items WHERE cart_id = 55 AND product_id = 8",
    "DELETE FROM notifications WHERE user_id = 42 AND read",
    "UPDATE users SET active = false",
    "DELETE FROM audit_log WHERE 1 = 1",
    "MERGE INTO stock s USING deliveries d ON s.item = d.item WHEN MATCHED THEN "
    "UPDATE SET qty = s.qty + d.qty WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
    "WITH moved AS (DELETE FROM queue WHERE id = 5 RETURNING *) "
    "INSERT INTO done SELECT * FROM moved",
    "COPY measurements FROM STDIN WITH (FORMAT csv)",
    # session and transactions
    "BEGIN",
    "COMMIT",
    "SET application_name = 'reporting'",
    "SHOW server_version",
    # DDL and admin
    "CREATE TABLE audit_archive (id bigint PRIMARY KEY, payload jsonb, "
    "at timestamptz DEFAULT now())",
    "CREATE INDEX CONCURRENTLY idx_orders_customer ON orders (customer_id, created_at)",
    "ALTER TABLE users ADD COLUMN phone text",
    "ALTER TABLE orders DROP COLUMN legacy_code",
    "DROP TABLE IF EXISTS tmp_import",
    "TRUNCATE staging_rows",
    "GRANT SELECT ON reports TO analyst",
    "VACUUM ANALYZE orders",
)


def _per_statement_us(fn: Callable[[str], object], statements: tuple[str, ...]) -> float:
    """Mean time per statement, in microseconds, for one pass over the mix."""
    start = time.perf_counter()
    for sql in statements:
        fn(sql)
    return (time.perf_counter() - start) / len(statements) * 1e6


def _parse_and_decode(sql: str) -> object:
    return orjson.loads(parse_sql_json(sql))


def main() -> None:
    statements = STATEMENTS

    # Warm up both paths so imports and first-call costs are not measured.
    for sql in statements:
        _parse_and_decode(sql)
        Classifier().classify(sql)

    # The machine is shared and noisy: measure the baseline and the classifier in the same
    # round, one right after the other, and take the median of the per-round figures.
    parse_us: list[float] = []
    decode_us: list[float] = []
    unseen_us: list[float] = []
    ratios: list[float] = []
    decode_ratios: list[float] = []
    for _ in range(ROUNDS):
        a = _per_statement_us(parse_sql_json, statements)
        d = _per_statement_us(_parse_and_decode, statements)
        b = _per_statement_us(Classifier().classify, statements)  # nothing cached yet
        parse_us.append(a)
        decode_us.append(d)
        unseen_us.append(b)
        ratios.append(b / a)
        decode_ratios.append(b / d)

    warm = Classifier()
    for sql in statements:
        warm.classify(sql)
    cached_us = statistics.median(
        _per_statement_us(warm.classify, statements) for _ in range(ROUNDS)
    )

    a_med, d_med, b_med, ratio, decode_ratio = (
        statistics.median(x) for x in (parse_us, decode_us, unseen_us, ratios, decode_ratios)
    )
    print(f"statements in the mix:               {len(statements)}  ({ROUNDS} rounds)")
    print(f"(a) parse_sql_json:                  {a_med:8.2f} us/statement")
    print(f"(d) parse_sql_json + orjson.loads:   {d_med:8.2f} us/statement")
    print(f"(b) classify, not seen before:       {b_med:8.2f} us/statement")
    print(f"(c) classify, cached:                {cached_us:8.3f} us/statement")
    verdict = "within" if ratio <= TARGET_RATIO else "OVER"
    print(
        f"ratio (b)/(a), median of rounds: {ratio:.2f}  target <= {TARGET_RATIO:.1f}  -> {verdict}"
    )
    print(f"ratio (b)/(d), median of rounds: {decode_ratio:.2f}  (reading the tree included)")
    print(f"cached lookups are {a_med / cached_us:.0f}x faster than parsing")


if __name__ == "__main__":
    main()
