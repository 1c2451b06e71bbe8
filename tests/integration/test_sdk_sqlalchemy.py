"""The SQLAlchemy SDK against the real PostgreSQL, with the psycopg 3 and the psycopg2
dialects: Core, ORM and driver SQL behave as on an unprotected engine, refusals are
DBAPIErrors that are also Backstop's, and approvals come from the CLI in another process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from backstop_core.sdk import core
from backstop_core.sdk import sqlalchemy as bsa
from tests.integration.test_sdk_psycopg import (
    AGENT,
    audit_rows,
    background,
    decide_from_cli,
    direct,
    wait_for_pending,
    write_policy,
)

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
items_table = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
)


class Base(orm.DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str | None]


@pytest.fixture(params=["psycopg", "psycopg2"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def items(fresh_db: str) -> str:
    direct(fresh_db, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    direct(fresh_db, "INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i")
    return fresh_db


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def engine_factory(
    items: str, driver: str, tmp_path: Path, state_dir: Path
) -> Iterator[Callable[..., sa.Engine]]:
    policy = write_policy(tmp_path / "policy.json")
    url = items.replace("postgresql://", f"postgresql+{driver}://", 1)
    engines: list[sa.Engine] = []
    guards: list[core.LocalGuard] = []

    def make(*, protected: bool = True, **options: Any) -> sa.Engine:
        engine = sa.create_engine(url)
        engines.append(engine)
        if protected:
            options.setdefault("policy", policy)
            guards.append(bsa.protect(engine, agent=AGENT, state_dir=state_dir, **options))
        return engine

    yield make
    for engine in engines:
        engine.dispose()
    for guard in guards:
        guard.close()


def count(dsn: str) -> int:
    return int(direct(dsn, "SELECT count(*) FROM items")[0][0])


def test_core_orm_and_driver_sql_behave_as_on_an_unprotected_engine(
    engine_factory: Callable[..., sa.Engine], items: str
) -> None:
    engine = engine_factory()
    plain = engine_factory(protected=False)
    query = sa.text("SELECT id, name FROM items WHERE id <= :n ORDER BY id")
    with engine.connect() as conn, plain.connect() as other:
        assert conn.execute(query, {"n": 3}).all() == other.execute(query, {"n": 3}).all()
        assert conn.exec_driver_sql("SELECT count(*) FROM items").scalar() == 10
    with engine.begin() as conn:
        conn.execute(items_table.insert(), [{"id": 11, "name": "a"}, {"id": 12, "name": "50%"}])
        conn.execute(items_table.update().where(items_table.c.id == 11).values(name="b"))
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(items_table.insert().values(id=13, name="rolled back"))
        raise RuntimeError("roll back")
    with orm.Session(engine) as session:
        session.add(Item(id=14, name="orm"))
        session.commit()
        assert session.get(Item, 12) is not None
        assert [i.id for i in session.scalars(sa.select(Item).where(Item.id > 10))] == [11, 12, 14]
    assert direct(items, "SELECT id, name FROM items WHERE id > 10 ORDER BY id") == [
        (11, "b"),
        (12, "50%"),
        (14, "orm"),
    ]


def test_a_blocked_statement_is_a_dbapi_error_that_is_also_backstops(
    engine_factory: Callable[..., sa.Engine], items: str
) -> None:
    engine = engine_factory()
    with engine.connect() as conn:
        with pytest.raises(bsa.BackstopBlocked) as caught:
            conn.execute(sa.text("DROP TABLE items"))
        error = caught.value
        assert isinstance(error, sa.exc.ProgrammingError) and isinstance(error, sa.exc.DBAPIError)
        assert isinstance(error, core.BackstopBlocked)
        assert isinstance(error.orig, engine.dialect.loaded_dbapi.Error)
        assert isinstance(error.orig, core.BackstopBlocked)
        assert "never dropped by agents" in error.reason and error.decision == "block"
        conn.rollback()
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 10
    assert count(items) == 10


def test_an_approval_from_the_cli_in_another_process_lets_the_statement_run(
    engine_factory: Callable[..., sa.Engine], items: str, state_dir: Path
) -> None:
    engine = engine_factory()

    def delete() -> int:
        with engine.begin() as conn:
            return conn.execute(items_table.delete().where(items_table.c.id == 3)).rowcount

    deleting = background(delete)
    pending = wait_for_pending(state_dir)
    assert pending["operation"] == "DELETE" and pending["tables"] == ["public.items"]
    assert count(items) == 10
    decide_from_cli(state_dir, pending["id"], "approve")
    assert deleting.result(timeout=30) == 1
    assert count(items) == 9


def test_not_waiting_raises_approval_required_with_the_id(
    engine_factory: Callable[..., sa.Engine], items: str, state_dir: Path
) -> None:
    engine = engine_factory(wait_for_approval=False)
    with engine.connect() as conn:
        with pytest.raises(bsa.ApprovalRequired) as caught:
            conn.execute(sa.text("DELETE FROM items WHERE id = :id"), {"id": 4})
        assert isinstance(caught.value, sa.exc.DBAPIError)
        assert caught.value.approval_id == wait_for_pending(state_dir)["id"]
        conn.rollback()
        decide_from_cli(state_dir, caught.value.approval_id, "approve")
        result = conn.execute(sa.text("DELETE FROM items WHERE id = :id"), {"id": 4})
        assert result.rowcount == 1
        conn.commit()
    assert count(items) == 9


def test_every_statement_is_audited_with_the_agent_name(
    engine_factory: Callable[..., sa.Engine], state_dir: Path
) -> None:
    engine = engine_factory()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT name FROM items WHERE id = :id"), {"id": 1})
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO items VALUES (1, 'duplicate')"))
        conn.rollback()
        with pytest.raises(bsa.BackstopBlocked):
            conn.execute(sa.text("DROP TABLE items"))
    rows = audit_rows(state_dir, finished=3)
    mine = [(r.sql, r.outcome) for r in rows if "items" in r.sql]
    assert mine == [
        ("SELECT name FROM items WHERE id = 1", "forwarded"),
        ("INSERT INTO items VALUES (1, 'duplicate')", "error"),
        ("DROP TABLE items", "blocked"),
    ]
    assert {r.agent for r in rows} == {AGENT}
