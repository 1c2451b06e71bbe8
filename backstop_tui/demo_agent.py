"""A simulated AI agent for `backstop-tui --demo --demo-agent`.

It connects through the gateway with asyncpg, as user `postgres` with application_name
`demo-agent`, and works on the demo `shop` database the way a busy agent would: reads (joins,
aggregates), small writes (one order's status, a new order with its items), and every 15 to 20
seconds one statement the shipped policy holds for an operator: an UPDATE of about 12,000 of
the 15,000 `order_items` rows, which matches rule `approve-large-writes` (a WRITE over 10,000
estimated rows -> `approve`). UPDATEs rather than DELETEs keep the table's size, so the next
one is held again however the operator decided.

The held statement runs on its own connection so the ordinary traffic keeps flowing while it
waits; its outcome (approved and run, denied with the operator's reason, timed out) is
reported and logged. Refusals and lost connections never stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

log = logging.getLogger("backstop.demo_agent")

APPLICATION_NAME = "demo-agent"
Report = Callable[[str, str], None]

READS: tuple[str, ...] = (
    "SELECT c.country, count(*) AS orders, round(sum(o.total), 2) AS revenue "
    "FROM orders o JOIN customers c ON c.id = o.customer_id "
    "GROUP BY c.country ORDER BY revenue DESC",
    "SELECT p.category, round(avg(p.price), 2) AS avg_price, sum(p.stock) AS stock "
    "FROM products p GROUP BY p.category ORDER BY p.category",
    "SELECT o.id, o.status::text AS status, o.total, c.email FROM orders o "
    "JOIN customers c ON c.id = o.customer_id WHERE o.status = 'pending' "
    "ORDER BY o.ordered_at DESC LIMIT 20",
    "SELECT p.name, sum(i.quantity) AS sold FROM order_items i "
    "JOIN products p ON p.id = i.product_id GROUP BY p.name ORDER BY sold DESC LIMIT 10",
    "SELECT date_trunc('month', ordered_at) AS month, count(*) FROM orders GROUP BY 1 ORDER BY 1",
    "SELECT count(*) FROM customers WHERE preferences ->> 'newsletter' = 'true'",
)

# Each touches about 12,000 of the 15,000 order_items rows: over the policy's 10,000-row line.
RISKY: tuple[str, ...] = (
    "UPDATE order_items SET unit_price = round(unit_price * 1.02, 2) WHERE order_id > 1000",
    "UPDATE order_items SET quantity = quantity + 1 WHERE line_no >= 1 AND order_id > 1000",
)


class DemoAgent:
    """Sends a realistic mix of statements through the gateway at `dsn` until stopped."""

    def __init__(
        self,
        dsn: str,
        *,
        report: Report | None = None,
        pace: tuple[float, float] = (0.3, 1.2),
        risky_every: tuple[float, float] = (15.0, 20.0),
        rng: random.Random | None = None,
    ) -> None:
        self.dsn = dsn
        self.report = report
        self.pace = pace
        self.risky_every = risky_every
        self.rng = rng or random.Random()
        self.sent = 0
        self.refused = 0
        self.outcomes: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._risky_index = 0

    def start(self) -> list[asyncio.Task[None]]:
        """Start the ordinary traffic and the risky statements as two tasks."""
        if not self._tasks:
            self._stopping.clear()
            self._tasks = [
                asyncio.ensure_future(self._loop(self._ordinary_work, "traffic")),
                asyncio.ensure_future(self._loop(self._risky_work, "risky")),
            ]
        return self._tasks

    async def stop(self) -> None:
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def run(self) -> None:
        """Run until cancelled (for use without `start`)."""
        self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    # ------------------------------------------------------------------ plumbing

    def _say(self, text: str, severity: str = "information") -> None:
        log.info("%s", text)
        self.outcomes.append(text)
        del self.outcomes[:-50]
        if self.report is not None:
            with contextlib.suppress(Exception):
                self.report(text, severity)

    async def _connect(self) -> Any:
        return await asyncpg.connect(
            self.dsn,
            ssl=False,
            server_settings={"application_name": APPLICATION_NAME},
            command_timeout=None,
        )

    async def _loop(self, work: Callable[[Any], Awaitable[None]], name: str) -> None:
        """Keep one connection and run `work` on it forever, reconnecting after failures."""
        backoff = 0.5
        while not self._stopping.is_set():
            conn = None
            try:
                conn = await self._connect()
                backoff = 0.5
                await work(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("demo-agent %s connection: %s", name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("demo-agent %s failed; starting over", name)
                await asyncio.sleep(backoff)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    async def _pause(self, low: float, high: float) -> None:
        await asyncio.sleep(self.rng.uniform(low, high))

    # ------------------------------------------------------------------ the work

    async def _ordinary_work(self, conn: Any) -> None:
        while True:
            roll = self.rng.random()
            try:
                if roll < 0.7:
                    await conn.fetch(self.rng.choice(READS))
                elif roll < 0.85:
                    await self._update_one_order(conn)
                else:
                    await self._place_order(conn)
                self.sent += 1
            except asyncpg.PostgresError as exc:
                # A refusal from the gateway or an ordinary SQL error: note it, carry on.
                self.refused += 1
                log.info("demo-agent statement refused: %s", exc)
            await self._pause(*self.pace)

    async def _update_one_order(self, conn: Any) -> None:
        order_id = self.rng.randint(1, 5000)
        status = self.rng.choice(("paid", "shipped", "delivered"))
        await conn.execute(
            # Text, not the enum: asyncpg would introspect a custom type first.
            "UPDATE orders SET status = $1::text::order_status WHERE id = $2",
            status,
            order_id,
        )

    async def _place_order(self, conn: Any) -> None:
        customer = self.rng.randint(1, 2000)
        product = self.rng.randint(1, 1000)
        quantity = self.rng.randint(1, 3)
        async with conn.transaction():
            order_id = await conn.fetchval(
                "INSERT INTO orders (customer_id, status, shipping_address) "
                "VALUES ($1, 'pending', jsonb_build_object('street', '1 Demo Road', "
                "'city', 'Springfield', 'zip', '00001')) RETURNING id",
                customer,
            )
            await conn.execute(
                "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price) "
                "SELECT $1, 1, id, $3, price FROM products WHERE id = $2",
                order_id,
                product,
                quantity,
            )
            await conn.execute(
                "UPDATE orders SET total = (SELECT sum(quantity * unit_price) "
                "FROM order_items WHERE order_id = $1) WHERE id = $1",
                order_id,
            )

    def next_risky(self) -> str:
        # UPDATEs, not DELETEs: the table keeps its size, so the next one is held again
        # however the operator decided this one.
        sql = RISKY[self._risky_index % len(RISKY)]
        self._risky_index += 1
        return sql

    async def _risky_work(self, conn: Any) -> None:
        held: list[str] = []

        def notice(_conn: Any, message: Any) -> None:
            text = getattr(message, "message", str(message))
            if "waiting for approval" in text:
                held.append(text)

        conn.add_log_listener(notice)
        while True:
            await self._pause(*self.risky_every)
            sql = self.next_risky()
            held.clear()
            short = sql if len(sql) <= 70 else sql[:69] + "…"
            log.info("demo-agent sending: %s", short)
            try:
                status = await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                self.refused += 1
                reason = str(exc).removeprefix("backstop: ")
                self._say(f"refused: {reason}", "warning")
                continue
            self.sent += 1
            how = "approved and ran" if held else "ran without approval"
            self._say(f"{how}: {status}")
