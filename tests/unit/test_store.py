"""The state store against a real SQLite file: audit journal durability, approvals across
processes, alerts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backstop_core import store as store_module
from backstop_core.store import (
    ApprovalStateError,
    AuditStart,
    SnapshotRecord,
    Store,
    StoreError,
)

REPO = Path(__file__).resolve().parents[2]

SELECT_JSON = json.dumps(
    [{"operation": "SELECT", "tables": ["public.orders"], "table_destructive": False}]
)
TRUNCATE_JSON = json.dumps(
    [{"operation": "TRUNCATE", "tables": ["public.orders"], "table_destructive": True}]
)


def start(**changes: Any) -> AuditStart:
    base = AuditStart(
        session_id="s-1",
        agent="cursor",
        client="10.0.0.7:50412",
        sql="SELECT * FROM orders WHERE id = 1",
        operation="SELECT",
        risk="LOW",
        tables=("public.orders",),
        classification_json=SELECT_JSON,
        decision="allow",
        rule="defaults.LOW",
        reason="low risk",
    )
    return replace(base, **changes)


def append_to_journal(state_dir: Path, data: bytes) -> None:
    """Bytes a writer put in the journal behind the store's back."""
    with open(state_dir / "audit.journal", "ab") as journal:
        journal.write(data)


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(code),
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )


# --------------------------------------------------------------------------- audit


async def test_begin_attach_finish_appear_in_audit_with_every_field(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        before = datetime.now(UTC)
        key = store.audit_begin(
            start(
                sql="TRUNCATE orders",
                operation="TRUNCATE",
                risk="HIGH",
                classification_json=TRUNCATE_JSON,
                decision="approve_with_snapshot",
                rule="protect-orders",
                reason="TRUNCATE empties public.orders",
                row_estimate=1200,
                approval_id=7,
            )
        )
        store.audit_attach(key, snapshot_id="snap-1", snapshot_manifest_sha256="ab" * 32)
        store.audit_attach(key, wal_lsn="0/16B3748")
        store.audit_finish(key, "forwarded", 12.5)

        [event] = await store.audit_query()
        assert event.key == key
        assert before - timedelta(seconds=1) <= event.time <= datetime.now(UTC)
        assert event.time.tzinfo is not None
        assert (event.session_id, event.agent, event.client) == ("s-1", "cursor", "10.0.0.7:50412")
        assert (event.sql, event.operation, event.risk) == ("TRUNCATE orders", "TRUNCATE", "HIGH")
        assert event.tables == ("public.orders",)
        assert event.classifications == tuple(json.loads(TRUNCATE_JSON))
        assert (event.decision, event.rule) == ("approve_with_snapshot", "protect-orders")
        assert event.reason == "TRUNCATE empties public.orders"
        assert (event.row_estimate, event.approval_id) == (1200, 7)
        assert (event.snapshot_id, event.snapshot_manifest_sha256) == ("snap-1", "ab" * 32)
        assert event.wal_lsn == "0/16B3748"
        assert (event.outcome, event.duration_ms, event.error) == ("forwarded", 12.5, None)
        assert await store.audit_get(event.id) == event
        assert await store.audit_get_by_key(key) == event


async def test_outcome_unknown_until_finished_then_updated_in_a_later_batch(
    tmp_path: Path,
) -> None:
    async with await Store.open(tmp_path) as store:
        key = store.audit_begin(start())
        first = await store.audit_get_by_key(key)
        assert first is not None and first.outcome is None
        store.audit_finish(key, "error", 3.0, error='relation "orders" does not exist')
        await store.ingest()
        after = await store.audit_get(first.id)
        assert after is not None
        assert (after.outcome, after.error) == ("error", 'relation "orders" does not exist')


async def test_unknown_outcome_is_refused(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        key = store.audit_begin(start())
        with pytest.raises(ValueError, match="unknown audit outcome"):
            store.audit_finish(key, "sent", 1.0)


async def test_audit_filters(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        store.audit_begin(start(agent="cursor", sql="SELECT 1", tables=()))
        store.audit_begin(
            start(
                agent="claude",
                sql="DELETE FROM app.users WHERE name LIKE 'a%'",
                operation="DELETE",
                risk="MEDIUM",
                tables=("app.users",),
                decision="approve",
            )
        )
        truncate = store.audit_begin(
            start(
                agent="claude",
                sql="TRUNCATE orders",
                operation="TRUNCATE",
                risk="HIGH",
                classification_json=TRUNCATE_JSON,
                decision="block",
            )
        )
        store.audit_begin(start(agent="cursor", sql="select * FROM Orders"))

        everything = await store.audit_query()
        assert [e.sql for e in everything] == [
            "select * FROM Orders",
            "TRUNCATE orders",
            "DELETE FROM app.users WHERE name LIKE 'a%'",
            "SELECT 1",
        ]

        async def sqls(**filters: Any) -> list[str]:
            return [e.sql for e in await store.audit_query(**filters)]

        assert await sqls(agent="claude") == [
            "TRUNCATE orders",
            "DELETE FROM app.users WHERE name LIKE 'a%'",
        ]
        assert await sqls(risk="high") == ["TRUNCATE orders"]
        assert await sqls(decision="approve") == ["DELETE FROM app.users WHERE name LIKE 'a%'"]
        assert await sqls(table="orders") == ["select * FROM Orders", "TRUNCATE orders"]
        assert await sqls(table="public.orders", agent="cursor") == ["select * FROM Orders"]
        assert await sqls(table="users") == ["DELETE FROM app.users WHERE name LIKE 'a%'"]
        assert await sqls(table="ers") == []
        assert await sqls(text="from orders") == ["select * FROM Orders"]
        assert await sqls(text="'a%'") == ["DELETE FROM app.users WHERE name LIKE 'a%'"]
        assert await sqls(text="a%b") == []
        assert await sqls(destructive_on="orders") == ["TRUNCATE orders"]
        assert await sqls(destructive_on="public.users") == []
        assert await sqls(limit=2) == ["select * FROM Orders", "TRUNCATE orders"]
        truncate_event = await store.audit_get_by_key(truncate)
        assert truncate_event is not None
        assert await sqls(since_id=truncate_event.id) == ["select * FROM Orders"]


async def test_keys_are_unique_across_store_instances(tmp_path: Path) -> None:
    keys = set()
    for _ in range(3):
        async with await Store.open(tmp_path) as store:
            keys.update(store.audit_begin(start()) for _ in range(10))
    assert len(keys) == 30
    async with await Store.open(tmp_path) as store:
        assert len(await store.audit_query(limit=100)) == 30


# How a process journals: a write per record; copies into its spool; or, as the gateway,
# into its spool as short records naming an audit template.
MODES = ["journal", "spool", "templates"]


@pytest.mark.parametrize("mode", MODES)
async def test_statements_journaled_before_sigkill_are_in_the_audit_after_restart(
    tmp_path: Path, mode: str
) -> None:
    child = await spawn(
        """
        import asyncio, sys
        from pathlib import Path
        from backstop_core.store import AuditStart, Store

        async def main():
            store = await Store.open(Path(sys.argv[1]))
            mode = sys.argv[3]
            if mode != "journal":
                store.use_spool()
            for i in range(int(sys.argv[2])):
                start = AuditStart(
                    "s-9", "agent-x", "127.0.0.1:1", f"DELETE FROM t WHERE id = {i}", "DELETE",
                    "MEDIUM", ("public.t",), "[]", "allow", "r", "why")
                if mode == "templates":
                    template = store.audit_template(start)
                    key = store.journal.begin_sql(template, start.sql)
                    store.journal.begin_sql(template, f"SELECT {i}")  # the template again
                else:
                    key = store.audit_begin(start)
                store.audit_finish(key, "forwarded", 1.0)
            print("ready", flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """,
        str(tmp_path),
        "500",
        mode,
    )
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
    child.send_signal(signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL

    async with await Store.open(tmp_path) as store:
        events = [e for e in await store.audit_query(limit=2000) if e.operation == "DELETE"]
        stats = await store.journal_stats()
    assert sorted(e.sql for e in events if e.sql.startswith("DELETE")) == sorted(
        f"DELETE FROM t WHERE id = {i}" for i in range(500)
    )
    if mode == "templates":
        assert sorted(e.sql for e in events if e.sql.startswith("SELECT")) == sorted(
            f"SELECT {i}" for i in range(500)
        )
    assert {e.agent for e in events} == {"agent-x"}
    assert {(e.reason, e.tables) for e in events} == {("why", ("public.t",))}
    assert stats.corrupt_lines == 0
    # All but the outcomes still buffered at the kill are known.
    assert sum(e.outcome == "forwarded" for e in events) >= 499
    assert spool_files(tmp_path) == [], "the dead process's spool was left"


@pytest.mark.parametrize("mode", MODES)
async def test_sigkill_under_load_with_ingest_and_rotation_loses_no_statement(
    tmp_path: Path, mode: str
) -> None:
    # The child journals as fast as it can while its ingest task runs and rotates a small
    # journal; every begin it reported as returned must be in the audit after the kill.
    child = await spawn(
        """
        import asyncio, sys
        from pathlib import Path
        from backstop_core import store as store_module
        from backstop_core.store import AuditStart, Store

        store_module.ROTATE_BYTES = 64 * 1024
        store_module.SPOOL_BYTES = 16 * 1024  # also fills between ingests

        async def main():
            store = await Store.open(Path(sys.argv[1]), ingest_interval=0.01)
            mode = sys.argv[2]
            if mode != "journal":
                store.use_spool()
            store.start_ingest()
            i = 0
            templates = []
            while True:
                for _ in range(200):
                    start = AuditStart(
                        "s", "a", "c", f"UPDATE t SET x = {i}", "UPDATE", "LOW", ("t",), "[]",
                        "allow", "r", "why")
                    if mode == "templates":
                        # A new template every 5,000 statements: most are used in journals
                        # rotated (and ingested) long before.
                        if i % 5000 == 0:
                            templates.append(store.audit_template(start))
                        template = templates[i % len(templates)]
                        key = store.journal.begin_sql(template, start.sql)
                    else:
                        key = store.audit_begin(start)
                    store.audit_finish(key, "forwarded", 0.1)
                    i += 1
                print(i, flush=True)
                await asyncio.sleep(0.005)  # about 30,000 statements/s

        asyncio.run(main())
        """,
        str(tmp_path),
        mode,
    )
    assert child.stdout is not None
    returned = 0
    while returned < 30_000:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line, "the writer died"
        returned = int(line)
    child.send_signal(signal.SIGKILL)
    await child.wait()

    async with await Store.open(tmp_path) as store:
        stats = await store.journal_stats()
        events = await store.audit_query(limit=10_000_000)
    values = sorted(int(e.sql.rsplit(" ", 1)[1]) for e in events)
    assert values[:returned] == list(range(returned))
    assert len(values) == len(set(values))
    assert stats.corrupt_lines == 0
    assert {(e.reason, e.tables) for e in events} == {("why", ("t",))}
    journal = (tmp_path / "audit.journal").read_bytes()
    journaled = journal.count(b'["b",') + journal.count(b'["c",')
    assert journaled < len(values) // 2, "the journal was never rotated"


def spool_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("audit.spool-*"))


def journal_bytes(state_dir: Path) -> bytes:
    path = state_dir / "audit.journal"
    return path.read_bytes() if path.exists() else b""


def append_to_spool(spool: Path, data: bytes) -> None:
    """Bytes after a spool's records, where its NUL bytes begin."""
    end = spool.read_bytes().index(b"\x00")
    with open(spool, "r+b") as file:
        file.seek(end)
        file.write(data)


async def test_a_spooled_record_reaches_the_audit_and_the_spool_goes_at_close(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    store.use_spool()
    store.audit_begin(start(sql="SELECT 'spooled'"))
    (spool,) = spool_files(tmp_path)
    # In the spool's memory, not yet in the journal: no write of its own.
    assert b"SELECT 'spooled'" in spool.read_bytes()
    assert b"SELECT 'spooled'" not in journal_bytes(tmp_path)
    (event,) = await store.audit_query()  # reading the audit moves it first
    assert event.sql == "SELECT 'spooled'"
    assert spool.read_bytes().strip(b"\x00") == b""
    store.audit_begin(start(sql="SELECT 'at close'"))
    await store.close()
    assert spool_files(tmp_path) == []
    async with await Store.open(tmp_path) as reader:
        assert {e.sql for e in await reader.audit_query()} == {
            "SELECT 'spooled'",
            "SELECT 'at close'",
        }


async def test_a_live_process_spool_is_left_to_it(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as writer:
        writer.use_spool()
        writer.audit_begin(start(sql="SELECT 'live'"))
        async with await Store.open(tmp_path) as reader:
            assert await reader.audit_query() == []
            assert len(spool_files(tmp_path)) == 1
            await writer.ingest()
            assert [e.sql for e in await reader.audit_query()] == ["SELECT 'live'"]


async def test_a_dead_process_spool_is_moved_without_its_unfinished_line(
    tmp_path: Path,
) -> None:
    child = await spawn(
        """
        import asyncio, sys
        from pathlib import Path
        from backstop_core.store import AuditStart, Store

        async def main():
            store = await Store.open(Path(sys.argv[1]))
            store.use_spool()
            for i in range(3):
                store.audit_begin(AuditStart(
                    "s", "a", "c", f"SELECT {i}", "SELECT", "LOW", (), "[]", "allow", "r", "w"))
            print("ready", flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """,
        str(tmp_path),
    )
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
    child.send_signal(signal.SIGKILL)
    await child.wait()
    # As if killed in the middle of copying a fourth record.
    (spool,) = spool_files(tmp_path)
    append_to_spool(spool, b'["b","torn-1",17650464')

    async with await Store.open(tmp_path) as store:
        events = await store.audit_query()
        stats = await store.journal_stats()
    assert sorted(e.sql for e in events) == ["SELECT 0", "SELECT 1", "SELECT 2"]
    assert stats.corrupt_lines == 0
    assert spool_files(tmp_path) == []


async def test_a_full_spool_moves_to_the_journal_first_keeping_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SPOOL_BYTES", 4096)
    async with await Store.open(tmp_path) as store:
        store.use_spool()
        for i in range(40):  # several spools' worth
            store.audit_begin(start(sql=f"SELECT {i}", session_id=f"s-{i:02}"))
        moved = journal_bytes(tmp_path).count(b'["b",')
        assert moved >= 20, "a full spool did not move to the journal"
        events = await store.audit_query(limit=100)
    assert [e.sql for e in sorted(events, key=lambda e: e.id)] == [f"SELECT {i}" for i in range(40)]


async def test_statements_journaled_by_template_read_back_whole(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        template = store.audit_template(start(decision="allow", reason="low risk"))
        first = store.journal.begin_sql(template, "SELECT * FROM orders WHERE id = 1")
        store.audit_forwarded(first, 2.5)
        second = store.journal.begin_tail(template, template.tail("SELECT 'it''s'"))
        other = store.audit_template(start(session_id="s-2", agent="claude"))
        third = store.journal.begin_sql(other, "SELECT 3")
        journal = journal_bytes(tmp_path)
        # Each template is journaled once, before the first record that names it.
        assert journal.count(b'["t",') == 2 and journal.count(b'["c",') == 3

        events = {e.key: e for e in await store.audit_query()}
    assert events[first].sql == "SELECT * FROM orders WHERE id = 1"
    assert (events[first].outcome, events[first].duration_ms) == ("forwarded", 2.5)
    assert events[second].sql == "SELECT 'it''s'" and events[second].outcome is None
    for key, (session, agent) in {first: ("s-1", "cursor"), third: ("s-2", "claude")}.items():
        event = events[key]
        assert (event.session_id, event.agent, event.client) == (session, agent, "10.0.0.7:50412")
        assert (event.operation, event.risk, event.tables) == ("SELECT", "LOW", ("public.orders",))
        assert (event.decision, event.rule, event.reason) == ("allow", "defaults.LOW", "low risk")
        assert event.classifications == tuple(json.loads(SELECT_JSON))


async def test_a_templated_record_is_a_fraction_of_a_whole_one(tmp_path: Path) -> None:
    sizes = []
    for templated in (False, True):
        state = tmp_path / str(templated)
        state.mkdir()
        async with await Store.open(state) as store:
            template = store.audit_template(start())
            for i in range(100):
                sql = f"SELECT * FROM orders WHERE id = {i}"
                if templated:
                    store.journal.begin_sql(template, sql)
                else:
                    store.audit_begin(start(sql=sql))
            store.journal.flush()
            sizes.append(len(journal_bytes(state)))
            assert len(await store.audit_query(limit=200)) == 100
    whole, templated_size = sizes
    assert templated_size < whole * 0.4, sizes


async def test_a_template_read_by_an_earlier_ingest_completes_later_records(
    tmp_path: Path,
) -> None:
    async with await Store.open(tmp_path) as writer:
        template = writer.audit_template(start(agent="agent-t"))
        writer.journal.begin_sql(template, "SELECT 1")
        await writer.ingest()
        later = writer.journal.begin_sql(template, "SELECT 2")  # names the template only
        writer.journal.flush()
        assert journal_bytes(tmp_path).count(b'["t",') == 1
        # A store that never read the template ingests the record that names it.
        async with await Store.open(tmp_path) as reader:
            event = await reader.audit_get_by_key(later)
            stats = await reader.journal_stats()
    assert event is not None and (event.sql, event.agent) == ("SELECT 2", "agent-t")
    assert event.classifications == tuple(json.loads(SELECT_JSON))
    assert stats.corrupt_lines == 0


async def test_a_record_naming_an_unknown_template_keeps_what_it_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Store.open(tmp_path) as store:
        await store.ingest()
        append_to_journal(tmp_path, b'["c","gone-1",1700000000.5,"gone-t1","SELECT 9"]\n')
        with caplog.at_level(logging.WARNING, logger="backstop.store"):
            event = await store.audit_get_by_key("gone-1")
            stats = await store.journal_stats()
    assert event is not None and event.sql == "SELECT 9"
    assert event.time.timestamp() == 1700000000.5
    assert not event.agent and not event.decision
    assert stats.corrupt_lines == 1
    assert "names a template never journaled" in caplog.text


async def test_torn_last_line_waits_until_complete(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        store.audit_begin(start(sql="SELECT 'before'"))
        await store.ingest()
    writer = await Store.open(tmp_path)
    writer.audit_begin(start(sql="SELECT 'torn'"))
    whole = (tmp_path / "audit.journal").read_bytes()
    line = whole[whole.rindex(b"\n", 0, len(whole) - 1) + 1 :]
    # Keep only half of that line in the journal, as a write cut short would.
    os.truncate(tmp_path / "audit.journal", len(whole) - len(line) // 2)

    async with await Store.open(tmp_path) as reader:
        assert [e.sql for e in await reader.audit_query()] == ["SELECT 'before'"]
        assert (await reader.journal_stats()).corrupt_lines == 0
        append_to_journal(tmp_path, line[len(line) - len(line) // 2 :])
        assert [e.sql for e in await reader.audit_query()] == ["SELECT 'torn'", "SELECT 'before'"]
        assert (await reader.journal_stats()).corrupt_lines == 0
    await writer.close()


async def test_fragment_left_by_a_dead_writer_costs_no_later_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Store.open(tmp_path) as store:
        store.audit_begin(start(sql="SELECT 'before'"))
        await store.ingest()
    append_to_journal(tmp_path, b'["b","dead-1",1700000000.0,"s","a","c","SELECT \'cut')

    with caplog.at_level(logging.WARNING, logger="backstop.store"):
        async with await Store.open(tmp_path) as store:
            store.audit_begin(start(sql="SELECT 'after'"))
            store.audit_begin(start(sql="SELECT 'after again'"))
            sqls = [e.sql for e in await store.audit_query()]
            stats = await store.journal_stats()
    assert sqls == ["SELECT 'after again'", "SELECT 'after'", "SELECT 'before'"]
    assert stats.corrupt_lines == 1
    assert "unreadable line" in caplog.text


async def test_corrupt_line_is_skipped_and_counted(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        store.audit_begin(start(sql="SELECT 1"))
        store.audit_finish("nobody-1", "forwarded", 1.0)  # an outcome for an unknown key
        append_to_journal(tmp_path, b"\x00\xffgarbage\n[1,2,3]\n")
        store.audit_begin(start(sql="SELECT 2"))
        assert [e.sql for e in await store.audit_query()] == ["SELECT 2", "SELECT 1"]
        assert (await store.journal_stats()).corrupt_lines == 2


async def test_two_stores_ingesting_at_once_never_duplicate(tmp_path: Path) -> None:
    first = await Store.open(tmp_path)
    second = await Store.open(tmp_path)
    try:
        for round_ in range(20):
            for i in range(50):
                first.audit_begin(start(sql=f"SELECT {round_}, {i}, 'first'"))
                second.audit_begin(start(sql=f"SELECT {round_}, {i}, 'second'"))
            await asyncio.gather(first.ingest(), second.ingest(), first.ingest(), second.ingest())
        events = await first.audit_query(limit=10_000)
        assert len(events) == 2000
        assert len({e.sql for e in events}) == 2000
        assert len({e.id for e in await second.audit_query(limit=10_000)}) == 2000
    finally:
        await first.close()
        await second.close()


async def test_rotation_replaces_an_ingested_journal_without_losing_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "ROTATE_BYTES", 16 * 1024)
    async with await Store.open(tmp_path) as store:
        for i in range(300):
            key = store.audit_begin(start(sql=f"SELECT {i}"))
            store.audit_finish(key, "forwarded", 1.0)
        await store.ingest()
        journal_size = (tmp_path / "audit.journal").stat().st_size
        assert journal_size < 1024, "a fully ingested large journal is replaced"
        for i in range(300, 310):
            store.audit_begin(start(sql=f"SELECT {i}"))
        events = await store.audit_query(limit=1000)
    assert sorted(int(e.sql.split()[1]) for e in events) == list(range(310))
    assert sum(e.outcome == "forwarded" for e in events) == 300


async def test_no_rotation_while_another_process_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "ROTATE_BYTES", 16 * 1024)
    first = await Store.open(tmp_path)
    second = await Store.open(tmp_path)
    try:
        second.audit_begin(start(sql="SELECT 'second'"))
        for i in range(300):
            first.audit_begin(start(sql=f"SELECT {i}"))
        await first.ingest()
        assert (tmp_path / "audit.journal").stat().st_size > 16 * 1024
        second.audit_begin(start(sql="SELECT 'second again'"))
        assert len(await first.audit_query(limit=1000)) == 302
    finally:
        await second.close()
    await first.ingest()
    assert (tmp_path / "audit.journal").stat().st_size < 1024, "rotates once it writes alone"
    first.audit_begin(start(sql="SELECT 'last'"))
    assert len(await first.audit_query(limit=1000)) == 303
    await first.close()


async def test_the_writer_rotates_what_another_process_ingested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway writes and a child ingests: the child cannot rotate a journal that is
    being written, so the writer replaces it once the child has moved it into SQLite."""
    monkeypatch.setattr(store_module, "ROTATE_BYTES", 16 * 1024)
    writer = await Store.open(tmp_path)
    ingester = await Store.open(tmp_path)
    try:
        for i in range(300):
            writer.audit_begin(start(sql=f"SELECT {i}"))
        assert not await writer.rotate_if_ingested(), "nothing is ingested yet"
        await ingester.ingest()
        assert (tmp_path / "audit.journal").stat().st_size > 16 * 1024, "the reader cannot"
        for i in range(300, 305):  # appended after the ingest: carried over
            writer.audit_begin(start(sql=f"SELECT {i}"))
        assert await writer.rotate_if_ingested()
        assert (tmp_path / "audit.journal").stat().st_size < 2048
        writer.audit_begin(start(sql="SELECT 305"))
        await ingester.ingest()
        events = await ingester.audit_query(limit=1000)
        assert sorted(int(e.sql.split()[1]) for e in events) == list(range(306))
    finally:
        await ingester.close()
        await writer.close()


async def test_background_ingest_moves_records_without_being_asked(tmp_path: Path) -> None:
    async with await Store.open(tmp_path, ingest_interval=0.01) as store:
        store.start_ingest()
        store.audit_begin(start(sql="SELECT 'ingested in the background'"))
        for _ in range(200):
            stats = await store.journal_stats()  # reads progress; does not ingest
            if stats.ingested_bytes == stats.journal_bytes:
                break
            await asyncio.sleep(0.01)
        assert stats.ingested_bytes == stats.journal_bytes > 0


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    async with await Store.open(tmp_path):
        pass
    with sqlite3.connect(tmp_path / "backstop.db") as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        await Store.open(tmp_path)


# --------------------------------------------------------------------------- approvals


async def create_approval(store: Store, **changes: Any) -> Any:
    fields: dict[str, Any] = {
        "agent": "cursor",
        "client": "10.0.0.7:50412",
        "session_id": "s-1",
        "sql": "DELETE FROM orders",
        "sql_hash": "h1",
        "operation": "DELETE",
        "tables": ["public.orders"],
        "risk": "HIGH",
        "classification_json": TRUNCATE_JSON,
        "rule": "protect-orders",
        "reason": "DELETE without WHERE",
        "expires_at": datetime.now(UTC) + timedelta(minutes=5),
        "row_estimate": 1200,
        "snapshot_id": "snap-1",
        "fingerprint": "fp-1",
    }
    fields.update(changes)
    return await store.approval_create(**fields)


async def test_decision_from_another_process_reaches_the_gateway(tmp_path: Path) -> None:
    gateway = await Store.open(tmp_path)
    cli = await Store.open(tmp_path)
    try:
        version, _ = await gateway.approval_changes_since(0)
        approval = await create_approval(gateway)
        assert approval.status == "pending"
        assert approval.tables == ("public.orders",)
        assert [a.id for a in await cli.approvals_list()] == [approval.id]

        version, changed = await gateway.approval_changes_since(version)
        assert [a.id for a in changed] == [approval.id]
        assert await gateway.approval_changes_since(version) == (version, [])

        decided = await cli.approval_decide(
            approval.id, approve=True, decided_by="alice", reason="backup verified"
        )
        assert (decided.status, decided.decided_by) == ("approved", "alice")

        version, changed = await gateway.approval_changes_since(version)
        assert [(a.id, a.status, a.decision_reason) for a in changed] == [
            (approval.id, "approved", "backup verified")
        ]
        assert await gateway.approvals_list() == []
    finally:
        await gateway.close()
        await cli.close()


async def test_deciding_twice_says_who_decided_first(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        approval = await create_approval(store)
        await store.approval_decide(approval.id, approve=False, decided_by="alice", reason="no")
        with pytest.raises(ApprovalStateError) as raised:
            await store.approval_decide(approval.id, approve=True, decided_by="bob", reason=None)
        assert str(raised.value).startswith(
            f"approval {approval.id} is already denied by alice at "
        )
        assert raised.value.approval.status == "denied"
        current = await store.approval_get(approval.id)
        assert current is not None and (current.status, current.decided_by) == ("denied", "alice")
        with pytest.raises(StoreError, match="approval 999 does not exist"):
            await store.approval_decide(999, approve=True, decided_by="bob", reason=None)


async def test_an_approval_past_its_expiry_cannot_be_approved(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        approval = await create_approval(store, expires_at=datetime.now(UTC) - timedelta(seconds=1))
        with pytest.raises(ApprovalStateError, match="expired at"):
            await store.approval_decide(approval.id, approve=True, decided_by="bob", reason=None)
        current = await store.approval_get(approval.id)
        assert current is not None and current.status == "expired"


async def test_an_approval_is_used_exactly_once_across_stores(tmp_path: Path) -> None:
    first = await Store.open(tmp_path)
    second = await Store.open(tmp_path)
    try:
        approval = await create_approval(first)
        assert await first.approval_mark_used(approval.id) is False  # still pending
        await first.approval_decide(approval.id, approve=True, decided_by="alice", reason=None)
        results = await asyncio.gather(
            *(s.approval_mark_used(approval.id) for s in (first, second, first, second))
        )
        assert sorted(results) == [False, False, False, True]
        used = await second.approval_get(approval.id)
        assert used is not None and (used.status, used.decided_by) == ("used", "alice")
    finally:
        await first.close()
        await second.close()


async def test_status_changes_only_from_states_that_allow_them(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        approval = await create_approval(store)
        cancelled = await store.approval_set_status(approval.id, "cancelled", "client went away")
        assert (cancelled.status, cancelled.decision_reason) == ("cancelled", "client went away")
        with pytest.raises(ApprovalStateError, match="cannot become used: it is already cancelled"):
            await store.approval_set_status(approval.id, "used")
        with pytest.raises(ValueError, match="approval_decide"):
            await store.approval_set_status(approval.id, "approved")


async def test_start_up_expires_every_pending_approval(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        pending = [await create_approval(store) for _ in range(3)]
        await store.approval_decide(pending[0].id, approve=True, decided_by="alice", reason=None)
        assert await store.approvals_expire_all_pending("gateway restarted") == 2
        statuses = {a.id: a.status for a in await store.approvals_list(status=None)}
        assert statuses == {
            pending[0].id: "approved",
            pending[1].id: "expired",
            pending[2].id: "expired",
        }
        expired = await store.approval_get(pending[1].id)
        assert expired is not None and expired.decision_reason == "gateway restarted"


async def test_recent_approval_of_the_same_statement_is_found(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        approval = await create_approval(store, fingerprint="fp-9")
        assert (
            await store.approval_find_recent(fingerprint="fp-9", agent="cursor", since=hour_ago)
            is None
        )
        await store.approval_decide(approval.id, approve=True, decided_by="alice", reason=None)
        found = await store.approval_find_recent(fingerprint="fp-9", agent="cursor", since=hour_ago)
        assert found is not None and found.id == approval.id
        assert (
            await store.approval_find_recent(fingerprint="fp-9", agent="claude", since=hour_ago)
            is None
        )
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert (
            await store.approval_find_recent(fingerprint="fp-9", agent="cursor", since=later)
            is None
        )


# --------------------------------------------------------------------------- alerts, snapshots


async def test_alerts_open_once_per_condition_then_ack_and_close(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        alert, created = await store.alert_open(
            "bypass", "app@10.0.0.9", severity="warning", title="direct connection seen"
        )
        again, created_again = await store.alert_open(
            "bypass", "app@10.0.0.9", severity="critical", title="direct connection seen twice"
        )
        assert (created, created_again) == (True, False)
        assert again.id == alert.id
        assert (again.count, again.severity, again.title) == (
            2,
            "critical",
            "direct connection seen twice",
        )

        acked = await store.alert_ack(alert.id, "alice")
        assert (acked.status, acked.acked_by) == ("acked", "alice")
        assert (await store.alert_ack(alert.id, "bob")).acked_by == "alice"
        _, created_while_acked = await store.alert_open(
            "bypass", "app@10.0.0.9", severity="warning", title="still there"
        )
        assert created_while_acked is False

        closed = await store.alert_close("bypass", "app@10.0.0.9")
        assert closed is not None and closed.status == "closed" and closed.closed_at is not None
        assert await store.alert_close("bypass", "app@10.0.0.9") is None
        with pytest.raises(StoreError, match="already closed"):
            await store.alert_ack(alert.id, "bob")

        reopened, created_after_close = await store.alert_open(
            "bypass", "app@10.0.0.9", severity="warning", title="back again"
        )
        assert created_after_close is True and reopened.id != alert.id
        assert [a.id for a in await store.alerts_list(status="open")] == [reopened.id]
        assert [a.id for a in await store.alerts_list()] == [reopened.id, alert.id]


async def test_latest_good_snapshot_of_a_table(tmp_path: Path) -> None:
    async with await Store.open(tmp_path) as store:
        t0 = datetime(2025, 1, 1, tzinfo=UTC)
        for n, status in enumerate(("ok", "ok", "failed")):
            await store.snapshot_put(
                SnapshotRecord(
                    id=f"snap-{n}",
                    database="app",
                    tables=("public.orders",),
                    status=status,
                    started_at=t0 + timedelta(hours=n),
                )
            )
        latest = await store.snapshot_latest("orders")
        assert latest is not None and latest.id == "snap-1"
        assert await store.snapshot_latest("public.users") is None
        drill = await store.drill_start("public.orders", "snap-1")
        finished = await store.drill_finish(drill.id, passed=True, details_json='{"rows": 3}')
        assert finished.status == "passed" and finished.finished_at is not None
        assert [d.id for d in await store.drills_list()] == [drill.id]


async def test_sql_that_is_not_valid_utf8_is_audited_as_sent(tmp_path: Path) -> None:
    """The gateway decodes client bytes with surrogateescape: such text still lands in the
    audit (not as an unreadable journal line), next to ordinary records."""
    odd = b"SELECT '\xff\xfe'".decode("utf-8", "surrogateescape")
    async with await Store.open(tmp_path) as store:
        store.audit_begin(start(sql=odd))
        store.audit_begin(start(sql="SELECT 'plain'"))
        events = await store.audit_query()
        assert (await store.journal_stats()).corrupt_lines == 0
    # SQLite cannot hold lone surrogates: the undecodable bytes show as escapes.
    assert [e.sql for e in events] == ["SELECT 'plain'", "SELECT '\\udcff\\udcfe'"]


# --------------------------------------------------------------------------- retention


def old_record(key: str, ts: float, sql: str) -> bytes:
    """A whole "b" record as a gateway journals it, at time `ts`."""
    head = [key, ts, "s-1", "cursor", "10.0.0.7:50412", sql, "SELECT", "LOW"]
    rest = ["allow", "defaults.LOW", "low risk", None, None, None, None, None]
    record = json.dumps(["b", *head, ["public.orders"], *rest])
    return f"{record}\t{SELECT_JSON}\n".encode()


async def test_audit_prune_deletes_the_events_before_the_cutoff_and_nothing_else(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC).timestamp()
    day = 86400.0
    async with await Store.open(tmp_path) as store:
        await store.ingest()
        append_to_journal(tmp_path, old_record("old-1", now - 100 * day, "SELECT 'a'"))
        await store.ingest()
        # Still in the journal when the prune starts: pruned too, not ingested back after.
        append_to_journal(tmp_path, old_record("old-2", now - 95 * day, "SELECT 'b'"))
        append_to_journal(tmp_path, old_record("old-3", now - 91 * day, "SELECT 'c'"))
        store.audit_begin(start(sql="SELECT 'today'"))
        # The approval still waiting for an operator keeps the event it completes.
        await create_approval(store, audit_key="old-3")
        cutoff = now - 90 * day

        assert await store.audit_prune(cutoff, dry_run=True) == 2
        assert len(await store.audit_query()) == 4
        assert await store.audit_prune(cutoff) == 2
        assert await store.audit_prune(cutoff) == 0
        kept = sorted(e.sql for e in await store.audit_query())
    assert kept == ["SELECT 'c'", "SELECT 'today'"]
    async with await Store.open(tmp_path) as reopened:
        assert sorted(e.sql for e in await reopened.audit_query()) == kept


async def test_audit_prune_works_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PRUNE_CHUNK_ROWS", 3)
    now = datetime.now(UTC).timestamp()
    async with await Store.open(tmp_path) as store:
        await store.ingest()
        for i in range(10):
            append_to_journal(tmp_path, old_record(f"old-{i}", now - 3600 - i, f"SELECT {i}"))
        store.audit_begin(start(sql="SELECT 'now'"))
        assert await store.audit_prune(now - 60) == 10
        assert [e.sql for e in await store.audit_query()] == ["SELECT 'now'"]


class Clock:
    """time.time() moved forward on demand."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.real = store_module.time.time

    def __call__(self) -> float:
        return self.real() + self.offset


def template_refs(state_dir: Path) -> list[str]:
    with sqlite3.connect(state_dir / "backstop.db") as db:
        return [ref for (ref,) in db.execute("SELECT ref FROM audit_templates ORDER BY ref")]


async def test_a_template_in_use_outlives_pruning_and_an_abandoned_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway session open for weeks keeps complete audit rows; the templates of
    sessions long gone do not pile up in the state database."""
    clock = Clock()
    monkeypatch.setattr(store_module.time, "time", clock)
    monkeypatch.setattr(store_module, "TEMPLATE_PRUNE_INTERVAL", 0.0)
    day = 86400.0
    async with await Store.open(tmp_path) as gone:
        abandoned = gone.audit_template(start(session_id="s-gone"))
        gone.journal.begin_sql(abandoned, "SELECT 'gone'")
    async with await Store.open(tmp_path) as gateway:
        live = gateway.audit_template(start(session_id="s-live", agent="agent-live"))
        gateway.journal.begin_sql(live, "SELECT 'day 0'")
        await gateway.ingest()
        assert template_refs(tmp_path) == sorted([abandoned.ref, live.ref])
        for today in range(1, 15):
            clock.offset = today * day
            await gateway.ingest()  # the timer's pass: renews and prunes
            gateway.journal.begin_sql(live, f"SELECT 'day {today}'")
        gateway.journal.flush()
        assert template_refs(tmp_path) == [live.ref]
        # A store that never read the live template completes the newest record with it.
        async with await Store.open(tmp_path) as reader:
            events = await reader.audit_query(limit=100)
            stats = await reader.journal_stats()
    assert stats.corrupt_lines == 0
    by_sql = {e.sql: e for e in events}
    assert set(by_sql) == {"SELECT 'gone'", *(f"SELECT 'day {d}'" for d in range(15))}
    assert by_sql["SELECT 'day 14'"].agent == "agent-live"
    assert by_sql["SELECT 'gone'"].session_id == "s-gone"  # its rows keep what they had


async def test_an_upgrade_keeps_the_templates_already_kept(tmp_path: Path) -> None:
    """Templates stored before they had a time count from the upgrade: a gateway still
    running the older version keeps finding its own."""
    migrations = store_module._MIGRATIONS
    with sqlite3.connect(tmp_path / "backstop.db") as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statements in migrations[:-1]:
            for statement in statements:
                db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(migrations) - 1,))
        db.execute("INSERT INTO audit_templates (ref, line) VALUES ('old-t1', 'x')")
    async with await Store.open(tmp_path) as store:
        await store.ingest()
    assert template_refs(tmp_path) == ["old-t1"]
    with sqlite3.connect(tmp_path / "backstop.db") as db:
        ((seen_at,),) = db.execute("SELECT seen_at FROM audit_templates")
    assert abs(seen_at - datetime.now(UTC).timestamp()) < 60
