"""The snapshot scheduler against the real PostgreSQL and object stores: scheduled snapshots,
retention, health, recovery groups, and the readiness check the gateway makes before a
destructive statement."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import asyncpg
import psycopg
import pytest
from psycopg import sql

from backstop_core.events import Event, EventBus
from backstop_core.policy import Policy, ProtectedTable, RecoveryGroup, default_policy
from backstop_core.s3local import LocalS3Info
from backstop_core.sidecar.objectstore import (
    LocalObjectStore,
    ObjectStore,
    ObjectStoreError,
    open_object_store,
)
from backstop_core.sidecar.scheduler import (
    NotReady,
    ReadySnapshot,
    SnapshotFailed,
    SnapshotFinished,
    SnapshotProgress,
    SnapshotScheduler,
    SnapshotStarted,
)
from backstop_core.sidecar.snapshot import list_snapshots
from backstop_core.store import Store
from tests.conftest import PgServer

pytestmark = pytest.mark.integration

E = TypeVar("E", bound=Event)


def policy_with(
    *,
    protected: tuple[ProtectedTable, ...] = (),
    groups: tuple[RecoveryGroup, ...] = (),
) -> Policy:
    return replace(default_policy(), protected=protected, groups=groups)


class Harness:
    """A scheduler with an event log, a state store and a policy the test can change."""

    def __init__(self, dsn: str, store: ObjectStore, state: Store, policy: Policy) -> None:
        self.events: list[Event] = []
        self.bus = EventBus()
        self.bus.subscribe(self.events.append)
        self.policy = policy
        self.state = state
        self.store = store
        self.scheduler = SnapshotScheduler(
            dsn, store, state, self.bus, lambda: self.policy, tick_seconds=0.05,
            refresh_seconds=0.0,
        )  # fmt: skip

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def health(self) -> dict[str, str]:
        return {h.table: h.health for h in self.scheduler.health()}


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_db)
    await conn.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);"
        "CREATE TABLE items (id int PRIMARY KEY, order_id int);"
        "CREATE TABLE notes (id int);"
        "CREATE SCHEMA audit; CREATE TABLE audit.log (id int);"
        "INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 500) g;"
        "INSERT INTO items SELECT g, g FROM generate_series(1, 500) g;"
    )
    yield conn
    await conn.close()


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "state")
    yield store
    await store.close()


@pytest.fixture
async def harness(
    fresh_db: str, db: asyncpg.Connection, state: Store, tmp_path: Path
) -> AsyncIterator[Harness]:
    policy = policy_with(
        protected=(ProtectedTable("public.*", interval_seconds=1, retention_count=3),)
    )
    h = Harness(fresh_db, LocalObjectStore(tmp_path / "snapshots"), state, policy)
    yield h
    await h.scheduler.close()


@pytest.fixture(params=["local", "s3"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "any")
        return
    s3: LocalS3Info = request.getfixturevalue("s3")
    prefix = f"sched-{uuid.uuid4().hex[:8]}"
    store = open_object_store(
        f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint_url}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
    )
    yield store
    await store.delete_prefix("")


# --------------------------------------------------------------------------- scheduling


async def test_scheduled_snapshots_appear_and_age_into_stale(harness: Harness) -> None:
    scheduler = harness.scheduler
    await scheduler.resolve_units()
    # The policy covers public.*: audit.log is not protected.
    assert harness.health() == {"public.items": "never", "public.notes": "never",
                                "public.orders": "never"}  # fmt: skip

    await scheduler.tick()
    assert harness.health() == {"public.items": "fresh", "public.notes": "fresh",
                                "public.orders": "fresh"}  # fmt: skip
    started = harness.of(SnapshotStarted)
    finished = harness.of(SnapshotFinished)
    assert len(started) == len(finished) == 3
    assert {e.tables for e in finished} == {
        ("public.items",), ("public.notes",), ("public.orders",),
    }  # fmt: skip
    assert all(e.reason == "scheduled" for e in finished)
    orders = next(h for h in scheduler.health() if h.table == "public.orders")
    assert orders.snapshot_id and orders.age_seconds is not None and orders.age_seconds < 1
    assert orders.as_dict()["health"] == "fresh" and "every 1 s" in orders.detail
    records = await harness.state.snapshots_list(table="public.orders")
    assert [(r.id, r.status, r.rows) for r in records] == [(orders.snapshot_id, "ok", 500)]

    await scheduler.tick()  # not due again yet
    assert len(harness.of(SnapshotStarted)) == 3

    await asyncio.sleep(1.6)  # older than 1.5 x the 1 s interval
    assert set(harness.health().values()) == {"stale"}
    await scheduler.tick()
    assert set(harness.health().values()) == {"fresh"}
    assert len(harness.of(SnapshotFinished)) == 6
    listed = await list_snapshots(harness.store, await scheduler.database(), "public.orders")
    assert len(listed) == 2 and all(s.complete for s in listed)


async def test_run_loop_takes_snapshots_until_cancelled(harness: Harness) -> None:
    enough = asyncio.Event()
    harness.bus.subscribe(
        lambda _e: enough.set() if len(harness.of(SnapshotFinished)) >= 6 else None
    )
    task = asyncio.create_task(harness.scheduler.run())
    try:
        await asyncio.wait_for(enough.wait(), timeout=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(harness.of(SnapshotFinished)) >= 6
    assert harness.of(SnapshotProgress)  # progress reaches the bus


async def test_retention_keeps_the_newest(harness: Harness) -> None:
    scheduler = harness.scheduler
    harness.policy = policy_with(
        protected=(ProtectedTable("public.orders", interval_seconds=3600, retention_count=2),)
    )
    taken = [await scheduler.snapshot_now(["public.orders"]) for _ in range(4)]
    database = await scheduler.database()
    assert len(await list_snapshots(harness.store, database, "public.orders")) == 4
    await scheduler.tick()
    remaining = await list_snapshots(harness.store, database, "public.orders")
    assert [s.id for s in remaining] == [taken[3].id, taken[2].id]
    gone = await harness.state.snapshot_get(taken[0].id)
    assert gone is not None and gone.location is None
    assert gone.error is not None and "deleted by retention" in gone.error
    # Nothing of the deleted snapshots is left in the store.
    keys = [o.key for o in await harness.store.list(database + "/")]
    assert not any(taken[0].id in k or taken[1].id in k for k in keys)

    # Max age: everything older than a second goes, except the newest.
    harness.policy = policy_with(
        protected=(
            ProtectedTable(
                "public.orders", interval_seconds=3600, retention_count=10,
                retention_max_age_seconds=1,
            ),
        )
    )  # fmt: skip
    await asyncio.sleep(1.1)
    await scheduler.tick()
    remaining = await list_snapshots(harness.store, database, "public.orders")
    assert [s.id for s in remaining] == [taken[3].id]


async def test_health_reports_failing_with_the_error(
    fresh_db: str, db: asyncpg.Connection, state: Store, tmp_path: Path
) -> None:
    class FlakyStore(LocalObjectStore):
        broken = True

        async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
            if self.broken:
                raise ObjectStoreError("the bucket is read-only")
            await super().put_file(key, path)

    store = FlakyStore(tmp_path / "snapshots")
    policy = policy_with(protected=(ProtectedTable("public.orders", interval_seconds=1),))
    h = Harness(fresh_db, store, state, policy)
    try:
        await h.scheduler.tick()
        (health,) = h.scheduler.health()
        assert health.health == "failing"
        assert health.error is not None and "the bucket is read-only" in health.error
        assert "last attempt failed" in health.detail
        (failed,) = h.of(SnapshotFailed)
        assert "the bucket is read-only" in failed.error
        (record,) = await state.snapshots_list(table="public.orders")
        assert record.status == "failed" and "read-only" in (record.error or "")
        assert await store.list("") == []  # no half snapshot left behind

        await h.scheduler.tick()  # backing off: no new attempt at once
        assert len(h.of(SnapshotFailed)) == 1
        store.broken = False
        await asyncio.sleep(1.05)  # the backoff is capped by the 1 s interval
        await h.scheduler.tick()
        assert h.health() == {"public.orders": "fresh"}
    finally:
        await h.scheduler.close()


async def test_a_group_is_snapshotted_together(harness: Harness) -> None:
    harness.policy = policy_with(
        protected=(ProtectedTable("public.*", interval_seconds=3600),),
        groups=(RecoveryGroup("shop", ("public.orders", "public.item*"), interval_seconds=3600),),
    )
    await harness.scheduler.tick()
    finished = harness.of(SnapshotFinished)
    groups = {e.group: e.tables for e in finished}
    assert groups == {"shop": ("public.items", "public.orders"), None: ("public.notes",)}
    health = {h.table: (h.health, h.group) for h in harness.scheduler.health()}
    assert health == {
        "public.items": ("fresh", "shop"),
        "public.orders": ("fresh", "shop"),
        "public.notes": ("fresh", None),
    }
    manifest = await harness.scheduler.snapshot_now(group="shop")
    assert manifest.group == "shop" and manifest.table_names == ("public.items", "public.orders")
    with pytest.raises(Exception, match="no recovery group 'nope'"):
        await harness.scheduler.snapshot_now(group="nope")


# --------------------------------------------------------------------------- readiness


async def test_ensure_fresh_on_demand_and_missing_parts(
    fresh_db: str, db: asyncpg.Connection, state: Store, any_store: ObjectStore
) -> None:
    h = Harness(fresh_db, any_store, state, policy_with())
    scheduler = h.scheduler
    notices: list[str] = []
    try:
        with pytest.raises(NotReady) as refused:
            await scheduler.ensure_fresh(
                ["orders"], max_age_seconds=60, on_demand=False, notify=notices.append,
                before="TRUNCATE",
            )  # fmt: skip
        assert "public.orders" in refused.value.reason and "On-demand snapshots are off" in str(
            refused.value
        )
        assert "there is none" in refused.value.reason and notices == []

        ready = await scheduler.ensure_fresh(
            ["orders"], max_age_seconds=60, on_demand=True, notify=notices.append,
            before="TRUNCATE",
        )  # fmt: skip
        assert notices == ["backstop: taking a snapshot of public.orders before TRUNCATE …"]
        assert ready.taken_now and ready.snapshot_id and ready.manifest_sha256
        assert ready.per_table == {"public.orders": ready.snapshot_id}
        assert ready.age_seconds is not None and ready.age_seconds < 60
        assert await scheduler.still_present(ready)
        (started,) = h.of(SnapshotStarted)
        assert started.reason == "on_demand"

        again = await scheduler.ensure_fresh(
            ["public.orders"], max_age_seconds=60, on_demand=False, notify=notices.append
        )
        assert again.snapshot_id == ready.snapshot_id and not again.taken_now

        # A part goes missing: the snapshot no longer counts, and the bound one is gone.
        database = await scheduler.database()
        parts = [o.key for o in await any_store.list(database + "/") if o.key.endswith(".parquet")]
        await any_store.delete(parts[0])
        assert not await scheduler.still_present(ready)
        with pytest.raises(NotReady, match="incomplete in the store"):
            await scheduler.ensure_fresh(
                ["orders"], max_age_seconds=60, on_demand=False, notify=notices.append
            )
        fresh = await scheduler.ensure_fresh(
            ["orders"], max_age_seconds=60, on_demand=True, notify=notices.append
        )
        assert fresh.taken_now and fresh.snapshot_id != ready.snapshot_id
        assert await scheduler.still_present(fresh)

        # Too old is as good as missing.
        await asyncio.sleep(1.1)
        with pytest.raises(NotReady, match="the newest is 1 s old"):
            await scheduler.ensure_fresh(
                ["orders"], max_age_seconds=1, on_demand=False, notify=notices.append
            )
    finally:
        await scheduler.close()


async def test_ensure_fresh_details(harness: Harness, db: asyncpg.Connection) -> None:
    scheduler = harness.scheduler
    notices: list[str] = []
    # Nothing to protect: the table does not exist.
    nothing = await scheduler.ensure_fresh(
        ["public.gone"], max_age_seconds=60, on_demand=False, notify=notices.append
    )
    assert nothing.snapshot_id is None and nothing.per_table == {}

    # Two statements at once share one on-demand snapshot.
    def orders_ready() -> Awaitable[ReadySnapshot]:
        return scheduler.ensure_fresh(
            ["orders"], max_age_seconds=60, on_demand=True, notify=notices.append
        )

    first, second = await asyncio.gather(orders_ready(), orders_ready())
    assert first.snapshot_id == second.snapshot_id
    assert len(harness.of(SnapshotStarted)) == 1

    # Tables from different snapshots: both ids are bound, in table order.
    items = await scheduler.snapshot_now(["items"])
    both = await scheduler.ensure_fresh(
        ["orders", "items"], max_age_seconds=60, on_demand=False, notify=notices.append
    )
    assert both.snapshot_id == f"{first.snapshot_id},{items.id}"
    assert both.per_table == {"public.orders": first.snapshot_id, "public.items": items.id}
    assert len(both.manifests) == 2 and await scheduler.still_present(both)

    # A handed-out snapshot survives retention while its statement may still wait.
    harness.policy = policy_with(
        protected=(ProtectedTable("public.orders", interval_seconds=3600, retention_count=1),)
    )
    await scheduler.snapshot_now(["orders"])
    await scheduler.tick()
    assert await scheduler.still_present(first)


async def test_ensure_fresh_when_the_store_is_unreachable(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    store = open_object_store(
        "s3://bucket/x?endpoint=http://127.0.0.1:9", access_key="a", secret_key="b",
        region="us-east-1", max_attempts=1,
    )  # fmt: skip
    scheduler = SnapshotScheduler(fresh_db, store, None, None, lambda: policy_with())
    try:
        with pytest.raises(NotReady, match=r"cannot check the snapshots of public\.orders"):
            await scheduler.ensure_fresh(
                ["orders"], max_age_seconds=60, on_demand=True, notify=lambda _m: None
            )
    finally:
        await scheduler.close()


@pytest.fixture
def other_db(pg: PgServer, pg_dsn: str) -> Iterator[str]:
    name = f"other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(pg.dsn(database=name), autocommit=True) as other:
            other.execute("CREATE TABLE orders (id int); INSERT INTO orders VALUES (7)")
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_ensure_fresh_in_another_database(harness: Harness, other_db: str) -> None:
    ready = await harness.scheduler.ensure_fresh(
        ["orders"], database=other_db, max_age_seconds=60, on_demand=True, notify=lambda _m: None
    )
    listed = await list_snapshots(harness.store, other_db, "public.orders")
    assert [s.id for s in listed] == [ready.snapshot_id] and listed[0].rows == 1
    assert await harness.scheduler.still_present(ready, database=other_db)
