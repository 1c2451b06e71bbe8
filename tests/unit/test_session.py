"""The session as a playbook: client bytes in, upstream bytes out, server bytes in, client
bytes out. No sockets; the peers record what they are sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from backstop_core.gateway.pgwire import StartupMessage, decode_error_fields
from backstop_core.gateway.session import (
    FORWARD,
    REFUSAL_SQL,
    Batch,
    Execution,
    Outcome,
    Phase,
    Session,
    StatementHook,
    Verdict,
    prepared_batch,
    refuse,
)
from tests.unit import pgwire_traffic as t

# --- fakes ----------------------------------------------------------------------------


class FakePeer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "wrote to a closed peer"
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        """Everything written since the last take."""
        data = b"".join(self.writes)
        self.writes.clear()
        return data


class FakeIO:
    def __init__(self, tls: Awaitable[None] | None = None) -> None:
        self.client = FakePeer()
        self.upstream = FakePeer()
        self.tls = tls
        self.tls_requests = 0
        self.upstream_error: Exception | None = None
        self.opened = 0
        self.cancels: list[tuple[int, bytes]] = []
        self.registered: list[tuple[int, bytes]] = []
        self.unregistered = 0

    def start_client_tls(self) -> Awaitable[None] | None:
        self.tls_requests += 1
        return self.tls

    async def open_upstream(self, session: Session) -> FakePeer:
        self.opened += 1
        if self.upstream_error is not None:
            raise self.upstream_error
        return self.upstream

    def cancel(self, pid: int, secret: bytes) -> None:
        self.cancels.append((pid, secret))

    def register_backend(self, session: Session, pid: int, secret: bytes) -> None:
        self.registered.append((pid, secret))

    def unregister_backend(self, session: Session) -> None:
        self.unregistered += 1


Decision = Verdict | Awaitable[Verdict]


class ScriptedHook(StatementHook):
    """Records what it is asked; answers with `on_query` / `on_batch` (FORWARD by default)."""

    def __init__(
        self,
        on_query: Callable[[str], Decision] | None = None,
        on_batch: Callable[[Batch], Decision] | None = None,
        startup_refusal: bytes | None = None,
    ) -> None:
        self.on_query = on_query or (lambda sql: FORWARD)
        self.on_batch = on_batch or (lambda batch: FORWARD)
        self.startup_refusal = startup_refusal
        self.queries: list[str] = []
        self.batches: list[Batch] = []
        self.params: list[tuple[str, str]] = []
        self.ready = 0
        self.ended = 0

    def check_startup(self, session: Session, startup: StartupMessage) -> bytes | None:
        return self.startup_refusal

    def check_query(self, session: Session, sql: str) -> Decision:  # type: ignore[override]
        self.queries.append(sql)
        return self.on_query(sql)

    def check_batch(self, session: Session, batch: Batch) -> Decision:  # type: ignore[override]
        self.batches.append(batch)
        return self.on_batch(batch)

    def check_prepared(  # type: ignore[override]
        self, session: Session, statement: bytes, sql: str, bind: bytes
    ) -> Decision:
        return self.check_batch(session, prepared_batch(statement, sql, bind))

    def on_parameter_status(self, session: Session, name: str, value: str) -> None:
        self.params.append((name, value))

    def session_ready(self, session: Session) -> None:
        self.ready += 1

    def session_ended(self, session: Session) -> None:
        self.ended += 1


async def settle() -> None:
    """Let the session's background tasks (connect, TLS, held decisions) run."""
    for _ in range(5):
        await asyncio.sleep(0)


def new_session(
    hook: ScriptedHook | None = None, io: FakeIO | None = None
) -> tuple[Session, FakeIO]:
    io = io or FakeIO()
    session = Session(io=io, hook=hook or ScriptedHook(), session_id="s-1", client_address="test")
    return session, io


async def connect(hook: ScriptedHook | None = None) -> tuple[Session, FakeIO]:
    """A session taken through startup and trust authentication, with the outputs cleared."""
    session, io = new_session(hook)
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    assert io.upstream.take() == t.CLIENT_STARTUP
    session.server_data(b"".join(t.SERVER_STARTUP))
    assert io.client.take() == b"".join(t.SERVER_STARTUP)
    assert session.phase is Phase.READY
    return session, io


def our_error(message: str, sqlstate: str = "42501", hint: str | None = None) -> bytes:
    """The ErrorResponse a refusal must put on the wire, spelled out field by field."""
    body = b"SERROR\x00VERROR\x00C" + sqlstate.encode() + b"\x00M" + message.encode() + b"\x00"
    if hint:
        body += b"H" + hint.encode() + b"\x00"
    return t.frame(b"E", body + b"\x00")


def fatal_fields(data: bytes) -> dict[str, str]:
    assert data[:1] == b"E", data
    fields = decode_error_fields(data[5:])
    assert fields["S"] == "FATAL"
    return fields


SYNTAX_ERROR = t.error_response(
    f'syntax error at or near "{REFUSAL_SQL}"', "42601"
)  # what PostgreSQL answers to the refusal statement

NO_DROPS = "backstop: DROP TABLE is not allowed by policy rule no-drops"


def refuse_drops(sql: str) -> Verdict:
    return refuse(NO_DROPS, hint="ask an operator") if "DROP" in sql else FORWARD


def refuse_deletes(batch: Batch) -> Verdict:
    if any("DELETE" in sql for _, sql in batch.parses):
        return refuse("backstop: DELETE needs approval")
    return FORWARD


# --- startup and authentication ---------------------------------------------------------


async def test_startup_is_relayed_and_authentication_passes_through() -> None:
    hook = ScriptedHook()
    session, io = new_session(hook)
    session.client_data(t.CLIENT_STARTUP)
    assert io.client.paused  # nothing more is read until the server is connected
    await settle()
    assert io.upstream.take() == t.CLIENT_STARTUP
    assert not io.client.paused
    assert session.user == "agent"
    assert session.database == "shop"

    session.server_data(t.auth_md5())
    assert io.client.take() == t.auth_md5()
    session.client_data(t.password("md5aabbcc"))
    assert io.upstream.take() == t.password("md5aabbcc")

    session.server_data(b"".join(t.SERVER_STARTUP))
    assert io.client.take() == b"".join(t.SERVER_STARTUP)
    assert session.phase is Phase.READY
    assert hook.ready == 1
    assert session.server_params["server_version"] == "17.2"
    assert ("TimeZone", "UTC") in hook.params
    assert session.application_name == "psql"


async def test_ssl_request_answered_n_without_tls_then_startup() -> None:
    session, io = new_session()
    session.client_data(t.ssl_request())
    assert io.client.take() == b"N"
    assert session.phase is Phase.STARTUP
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    assert io.upstream.take() == t.CLIENT_STARTUP


async def test_ssl_request_answered_s_and_startup_waits_for_the_handshake() -> None:
    handshake = asyncio.get_running_loop().create_future()
    session, io = new_session(io=FakeIO(tls=handshake))
    session.client_data(t.ssl_request())
    assert io.client.take() == b"S"
    assert io.client.paused
    handshake.set_result(None)
    await settle()
    assert session.client_tls
    assert not io.client.paused
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    assert io.upstream.take() == t.CLIENT_STARTUP


async def test_failed_tls_handshake_closes_the_client() -> None:
    handshake = asyncio.get_running_loop().create_future()
    session, io = new_session(io=FakeIO(tls=handshake))
    session.client_data(t.ssl_request())
    handshake.set_exception(OSError("bad certificate"))
    await settle()
    assert io.client.closed
    assert io.opened == 0


@pytest.mark.parametrize("with_tls", [False, True])
async def test_bytes_after_ssl_request_in_the_same_packet_close_the_connection(
    with_tls: bool,
) -> None:
    # CVE-2021-23214: bytes that arrive before the TLS handshake could have been injected.
    handshake = asyncio.get_running_loop().create_future()
    session, io = new_session(io=FakeIO(tls=handshake if with_tls else None))
    session.client_data(t.ssl_request() + t.CLIENT_STARTUP)
    await settle()
    fields = fatal_fields(io.client.take())
    assert fields["C"] == "08P01"
    assert fields["M"] == "received unencrypted data after SSL request"
    assert io.client.closed
    assert io.tls_requests == 0
    assert io.opened == 0


async def test_gssenc_request_answered_n() -> None:
    session, io = new_session()
    session.client_data(t.gssenc_request())
    assert io.client.take() == b"N"
    session.client_data(t.gssenc_request() + t.query("SELECT 1"))
    assert fatal_fields(io.client.take())["M"] == "received unencrypted data after GSSENC request"
    assert io.client.closed


@pytest.mark.parametrize("key", [b"\x0b\xad\xca\xfe", bytes(range(32))], ids=["3.0", "3.2"])
async def test_cancel_request_is_routed_to_the_backend_owner(key: bytes) -> None:
    session, io = new_session()
    session.client_data(t.cancel_request(4242, key))
    await settle()
    assert io.cancels == [(4242, key)]
    assert io.client.closed
    assert io.client.writes == []  # PostgreSQL answers a cancel with nothing
    assert io.opened == 0


async def test_sasl_offer_loses_channel_binding() -> None:
    session, io = new_session()
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    session.server_data(t.auth_sasl("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert io.client.take() == t.auth_sasl("SCRAM-SHA-256")
    # Split in the middle, and with nothing to strip: relayed as sent.
    offer = t.auth_sasl("SCRAM-SHA-256")
    session.server_data(offer[:7])
    session.server_data(offer[7:])
    assert io.client.take() == offer


async def test_backend_key_data_is_registered_for_cancels() -> None:
    session, io = await connect()
    assert io.registered == [(4242, b"\x0b\xad\xca\xfe")]
    assert session.backend_pid == 4242
    assert session.backend_secret == b"\x0b\xad\xca\xfe"


async def test_query_sent_before_authentication_completes_waits_for_ready() -> None:
    hook = ScriptedHook(on_query=refuse_drops)
    session, io = new_session(hook)
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    io.upstream.take()
    session.server_data(t.auth_md5())
    # A client that pipelines its first statement behind the password.
    session.client_data(t.password("md5aabbcc") + t.query("DROP TABLE orders"))
    assert io.upstream.take() == t.password("md5aabbcc")
    assert hook.queries == []
    session.server_data(t.auth_ok() + t.backend_key_data(1, b"\x00\x00\x00\x01"))
    assert io.upstream.take() == b""
    session.server_data(t.ready("I"))
    assert hook.queries == ["DROP TABLE orders"]
    assert io.upstream.take() == t.query(REFUSAL_SQL)


async def test_replication_connections_are_refused() -> None:
    session, io = new_session()
    session.client_data(t.startup([("user", "agent"), ("replication", "database")]))
    await settle()
    fields = fatal_fields(io.client.take())
    assert fields["C"] == "28000"
    assert "replication" in fields["M"]
    assert io.client.closed
    assert io.opened == 0


async def test_hook_refuses_the_connection() -> None:
    refusal = our_error("backstop: unknown agent", "28000")
    session, io = new_session(ScriptedHook(startup_refusal=refusal))
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    assert io.client.take() == refusal
    assert io.client.closed
    assert io.opened == 0


async def test_unreachable_server_is_reported_to_the_client() -> None:
    io = FakeIO()
    io.upstream_error = ConnectionRefusedError("connection refused")
    session, _ = new_session(io=io)
    session.client_data(t.CLIENT_STARTUP)
    await settle()
    fields = fatal_fields(io.client.take())
    assert fields["C"] == "08006"
    assert "not reachable (connection refused)" in fields["M"]
    assert io.client.closed


# --- simple queries ---------------------------------------------------------------------


async def test_simple_query_is_forwarded_byte_identical() -> None:
    hook = ScriptedHook()
    session, io = await connect(hook)
    q = t.query("SELECT id, name FROM customers WHERE id = 1")
    session.client_data(q)
    assert io.upstream.writes == [q]
    assert hook.queries == ["SELECT id, name FROM customers WHERE id = 1"]
    answer = t.row_description("id", "name") + t.data_row(b"1", b"Ada")
    answer += t.command_complete("SELECT 1") + t.ready("I")
    session.server_data(answer)
    assert io.client.take() == answer


async def test_refused_query_is_replaced_and_the_error_swapped() -> None:
    session, io = await connect(ScriptedHook(on_query=refuse_drops))
    session.client_data(t.query("DROP TABLE orders"))
    assert io.upstream.take() == t.query(REFUSAL_SQL)
    # Inside a transaction block the refusal fails the block, and the client is told so.
    session.server_data(SYNTAX_ERROR + t.ready("E"))
    assert io.client.take() == our_error(NO_DROPS, hint="ask an operator") + t.ready("E")
    assert session.txn_status == "E"


async def test_pipelined_forwarded_then_refused_query_answer_in_order() -> None:
    session, io = await connect(ScriptedHook(on_query=refuse_drops))
    session.client_data(t.query("SELECT 1") + t.query("DROP TABLE orders"))
    assert io.upstream.take() == t.query("SELECT 1") + t.query(REFUSAL_SQL)
    first = t.row_description("?column?") + t.data_row(b"1") + t.command_complete("SELECT 1")
    session.server_data(first + t.ready("I") + SYNTAX_ERROR + t.ready("I"))
    assert io.client.take() == (
        first + t.ready("I") + our_error(NO_DROPS, hint="ask an operator") + t.ready("I")
    )


async def test_server_error_of_a_forwarded_query_reaches_the_client_unchanged() -> None:
    session, io = await connect(ScriptedHook(on_query=refuse_drops))
    session.client_data(t.query("SELECT * FROM nope"))
    error = t.error_response('relation "nope" does not exist', "42P01")
    session.server_data(error + t.ready("I"))
    assert io.client.take() == error + t.ready("I")


async def test_function_call_is_refused() -> None:
    session, io = await connect()
    session.client_data(t.function_call(1598, (b"\x00\x00\x00\x01",)))  # lo_open
    assert io.upstream.take() == t.query(REFUSAL_SQL)
    session.server_data(SYNTAX_ERROR + t.ready("I"))
    received = io.client.take()
    fields = decode_error_fields(received[5:])
    assert fields["C"] == "42501"
    assert "fast-path function call protocol is not allowed" in fields["M"]
    assert received.endswith(t.ready("I"))


async def test_terminate_closes_both_sides() -> None:
    hook = ScriptedHook()
    session, io = await connect(hook)
    session.client_data(t.terminate())
    assert io.upstream.take() == t.terminate()
    assert io.client.closed
    assert io.upstream.closed
    assert session.phase is Phase.CLOSED
    assert hook.ended == 1
    assert io.unregistered == 1


async def test_malformed_client_message_is_fatal() -> None:
    session, io = await connect()
    session.client_data(b"A\x00\x00\x00\x04")
    fields = fatal_fields(io.client.take())
    assert fields["C"] == "08P01"
    assert "invalid frontend message type 65" in fields["M"]
    assert io.client.closed
    assert io.upstream.closed


async def test_server_going_away_mid_statement_is_reported() -> None:
    outcomes: list[Outcome] = []
    hook = ScriptedHook(on_query=lambda sql: Verdict(True, on_complete=outcomes.append))
    session, io = await connect(hook)
    session.client_data(t.query("SELECT pg_sleep(60)"))
    session.server_lost()
    fields = fatal_fields(io.client.take())
    assert fields["C"] == "08006"
    assert fields["M"] == "backstop: the database server closed the connection"
    assert io.client.closed
    assert outcomes == [Outcome(False, "the database server closed the connection", "08006", "I")]


# --- completion callbacks and notices --------------------------------------------------


async def test_on_complete_reports_server_errors_and_transaction_status() -> None:
    outcomes: list[Outcome] = []
    hook = ScriptedHook(on_query=lambda sql: Verdict(True, on_complete=outcomes.append))
    session, _ = await connect(hook)

    session.client_data(t.query("SELECT * FROM nope"))
    session.server_data(t.error_response('relation "nope" does not exist', "42P01"))
    assert outcomes == []  # not done until ReadyForQuery
    session.server_data(t.ready("I"))
    assert outcomes == [Outcome(False, 'relation "nope" does not exist', "42P01", "I")]

    session.client_data(t.query("BEGIN"))
    session.server_data(t.command_complete("BEGIN") + t.ready("T"))
    assert outcomes[1] == Outcome(True, None, None, "T")


async def test_completions_run_in_order_once_the_client_has_the_answers() -> None:
    seen: list[tuple[str, bytes]] = []

    def completion(name: str) -> Callable[[Outcome], None]:
        def complete(outcome: Outcome) -> None:
            seen.append((name, b"".join(io.client.writes)))

        return complete

    names = iter(["first", "second"])
    hook = ScriptedHook(on_query=lambda sql: Verdict(True, on_complete=completion(next(names))))
    session, io = await connect(hook)
    session.client_data(t.query("SELECT 1") + t.query("SELECT 2"))
    answer = t.command_complete("SELECT 1") + t.ready("I")
    answers = answer + answer
    session.server_data(answers)
    # Both answers reached the client before either unit's audit outcome was recorded.
    assert seen == [("first", answers), ("second", answers)]


async def test_a_bad_message_after_an_answer_still_completes_the_answered_unit() -> None:
    outcomes: list[Outcome] = []
    hook = ScriptedHook(on_query=lambda sql: Verdict(True, on_complete=outcomes.append))
    session, io = await connect(hook)
    session.client_data(t.query("SELECT 1") + t.query("SELECT 2"))
    too_short = b"K" + (6).to_bytes(4, "big") + b"\0\0"  # BackendKeyData without its key
    session.server_data(t.command_complete("SELECT 1") + t.ready("I") + too_short)
    assert outcomes[0] == Outcome(True, None, None, "I")  # the first unit was answered
    assert not outcomes[1].ok  # the second was not: the session ended
    assert io.client.closed


async def test_on_complete_of_a_flush_batch_fires_at_the_next_sync() -> None:
    outcomes: list[Outcome] = []
    hook = ScriptedHook(on_batch=lambda b: Verdict(True, on_complete=outcomes.append))
    session, _ = await connect(hook)
    session.client_data(t.parse("", "SELECT 1") + t.bind("", "") + t.execute() + t.flush())
    session.server_data(t.parse_complete() + t.bind_complete() + t.command_complete("SELECT 1"))
    assert outcomes == []
    session.client_data(t.sync())
    session.server_data(t.ready("I"))
    assert [o.ok for o in outcomes] == [True, True]  # the Flush batch, then the Sync


async def test_notice_waits_for_the_in_flight_result_to_finish() -> None:
    session, io = await connect()
    session.client_data(t.query("SELECT payload FROM big"))
    row = t.data_row(b"x" * 1000)
    head = t.row_description("payload") + row[:100]
    session.server_data(head)
    assert io.client.take() == head

    session.send_notice("backstop: statement approved by ops", detail="ticket 7")
    assert io.client.take() == b""  # never inside the row, nor between rows of the result

    tail = row[100:] + t.command_complete("SELECT 1")
    session.server_data(tail)
    assert io.client.take() == tail
    session.server_data(t.ready("I"))
    notice = t.frame(
        b"N",
        b"SNOTICE\x00VNOTICE\x00C00000\x00Mbackstop: statement approved by ops\x00"
        b"Dticket 7\x00\x00",
    )
    assert io.client.take() == t.ready("I") + notice


async def test_notice_lands_between_the_units_it_was_sent_between() -> None:
    session, io = await connect()
    session.client_data(t.query("SELECT 1"))
    session.send_notice("backstop: second statement is being checked")
    session.client_data(t.query("SELECT 2"))
    first = t.data_row(b"1") + t.command_complete("SELECT 1") + t.ready("I")
    second = t.data_row(b"2") + t.command_complete("SELECT 1") + t.ready("I")
    session.server_data(first + second)  # both answers in one read
    notice = t.frame(
        b"N",
        b"SNOTICE\x00VNOTICE\x00C00000\x00Mbackstop: second statement is being checked\x00\x00",
    )
    assert io.client.take() == first + notice + second


async def test_notice_to_an_idle_client_goes_out_at_once() -> None:
    session, io = await connect()
    session.send_notice("backstop: policy reloaded")
    assert decode_error_fields(io.client.take()[5:])["M"] == "backstop: policy reloaded"


# --- holds --------------------------------------------------------------------------------


def hold_updates(decision: asyncio.Future[Verdict]) -> Callable[[str], Decision]:
    return lambda sql: decision if sql.startswith("UPDATE") else FORWARD


async def test_held_query_and_everything_after_it_wait_for_the_decision() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    hook = ScriptedHook(on_query=hold_updates(decision))
    session, io = await connect(hook)
    update = t.query("UPDATE orders SET total = 0")
    select = t.query("SELECT 1")

    session.client_data(update)
    # Reading goes on, so a client that hangs up while waiting is noticed at once ...
    assert not io.client.paused
    session.client_data(select)  # ... and what it sends meanwhile waits its turn
    await settle()
    assert io.upstream.take() == b""
    assert hook.queries == ["UPDATE orders SET total = 0"]

    decision.set_result(FORWARD)
    await settle()
    assert io.upstream.take() == update + select
    assert hook.queries == ["UPDATE orders SET total = 0", "SELECT 1"]
    assert not io.client.paused


async def test_a_client_that_floods_while_held_is_paused() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    session, io = await connect(ScriptedHook(on_query=hold_updates(decision)))
    session.client_data(t.query("UPDATE orders SET total = 0"))
    flood = t.query("SELECT '" + "x" * 60000 + "'")
    for _ in range(20):
        session.client_data(flood)
    assert io.client.paused
    decision.set_result(FORWARD)
    await settle()
    assert not io.client.paused


async def test_a_backslash_statement_waits_until_nothing_is_in_flight() -> None:
    session, io = await connect()
    first = t.query("SELECT set_my_settings()")
    second = t.query("SELECT 'a\\b'")
    session.client_data(first + second)
    # The first could change how the server lexes backslashes: the second waits for it.
    assert io.upstream.take() == first
    session.server_data(t.command_complete("SELECT 1") + t.ready("I"))
    assert io.upstream.take() == second


async def test_held_query_refused_by_a_human() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    session, io = await connect(ScriptedHook(on_query=hold_updates(decision)))
    session.client_data(t.query("UPDATE orders SET total = 0") + t.query("SELECT 1"))
    decision.set_result(refuse("backstop: rejected by ops"))
    await settle()
    assert io.upstream.take() == t.query(REFUSAL_SQL) + t.query("SELECT 1")
    session.server_data(SYNTAX_ERROR + t.ready("I"))
    assert io.client.take() == our_error("backstop: rejected by ops") + t.ready("I")


async def test_a_decision_that_fails_refuses() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    session, io = await connect(ScriptedHook(on_query=hold_updates(decision)))
    session.client_data(t.query("UPDATE orders SET total = 0"))
    decision.set_exception(RuntimeError("approval service down"))
    await settle()
    assert io.upstream.take() == t.query(REFUSAL_SQL)
    session.server_data(SYNTAX_ERROR + t.ready("I"))
    fields = decode_error_fields(io.client.take()[5:])
    assert fields["M"] == (
        "backstop: the statement was refused because its check failed: approval service down"
    )


async def test_client_leaving_during_a_hold_forwards_nothing() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    hook = ScriptedHook(on_query=hold_updates(decision))
    session, io = await connect(hook)
    session.client_data(t.query("UPDATE orders SET total = 0"))
    session.client_lost()
    await settle()
    if not decision.done():
        decision.set_result(FORWARD)  # approved after the client left: must not run
    await settle()
    assert io.upstream.take() == b""
    assert io.upstream.closed
    assert hook.ended == 1


# --- extended protocol ------------------------------------------------------------------


async def test_forwarded_batch_is_relayed_byte_identical() -> None:
    hook = ScriptedHook()
    session, io = await connect(hook)
    chunk = b"".join(t.CLIENT_FRAMES[1:6])  # Parse, Bind, Describe, Execute, Sync
    session.client_data(chunk)
    assert io.upstream.writes == [chunk]
    [batch] = hook.batches
    assert batch.parses == ((b"s1", "SELECT * FROM orders WHERE customer_id = $1"),)
    [execution] = batch.executions
    assert execution.sql == "SELECT * FROM orders WHERE customer_id = $1"
    assert execution.params() == (b"42",)
    assert batch.sync


async def test_refused_batch_ending_in_sync_sends_only_the_refusal() -> None:
    hook = ScriptedHook(on_batch=refuse_deletes)
    session, io = await connect(hook)
    batch = t.parse("", "DELETE FROM orders") + t.bind("", "") + t.describe("P")
    batch += t.execute() + t.sync()
    session.client_data(batch)
    assert io.upstream.take() == t.parse("", REFUSAL_SQL) + t.sync()
    session.server_data(SYNTAX_ERROR + t.ready("I"))
    assert io.client.take() == our_error("backstop: DELETE needs approval") + t.ready("I")


async def test_refused_batch_split_across_reads_sends_only_the_refusal() -> None:
    session, io = await connect(ScriptedHook(on_batch=refuse_deletes))
    batch = t.parse("", "DELETE FROM orders") + t.bind("", "") + t.execute() + t.sync()
    for i in range(0, len(batch), 7):
        session.client_data(batch[i : i + 7])
    assert io.upstream.take() == t.parse("", REFUSAL_SQL) + t.sync()


async def test_refused_batch_ending_in_flush_relays_the_rest_until_sync() -> None:
    hook = ScriptedHook(on_batch=refuse_deletes)
    session, io = await connect(hook)
    session.client_data(t.parse("", "DELETE FROM orders") + t.describe("S") + t.flush())
    assert io.upstream.take() == t.parse("", REFUSAL_SQL) + t.flush()
    session.server_data(SYNTAX_ERROR)
    assert io.client.take() == our_error("backstop: DELETE needs approval")
    # The server now discards everything up to Sync, so the rest goes through unchecked.
    rest = t.bind("", "") + t.execute() + t.sync()
    session.client_data(rest)
    assert io.upstream.take() == rest
    assert len(hook.batches) == 1
    session.server_data(t.ready("I"))
    assert io.client.take() == t.ready("I")
    # After the Sync, batches are checked again.
    session.client_data(t.parse("", "SELECT 1") + t.sync())
    assert len(hook.batches) == 2


async def test_fast_path_prepared_execution() -> None:
    hook = ScriptedHook()
    session, io = await connect(hook)
    session.client_data(t.parse("s1", "SELECT * FROM orders WHERE id = $1") + t.sync())
    session.server_data(t.parse_complete() + t.ready("I"))
    io.upstream.take()
    hook.batches.clear()

    run = t.bind("", "s1", (b"\x00\x00\x00\x07",), (1,)) + t.execute() + t.sync()
    session.client_data(run)
    assert io.upstream.writes == [run]
    assert hook.batches == [
        Batch(
            (),
            (Execution(b"s1", b"", "SELECT * FROM orders WHERE id = $1", run[:-15]),),
            sync=True,
        )
    ]
    assert hook.batches[0].executions[0].params() == (b"\x00\x00\x00\x07",)


async def test_fast_path_refusal() -> None:
    hook = ScriptedHook()
    session, io = await connect(hook)
    session.client_data(t.parse("s1", "DELETE FROM orders WHERE id = $1") + t.sync())
    session.server_data(t.parse_complete() + t.ready("I"))
    io.upstream.take()
    hook.on_batch = lambda b: refuse("backstop: no") if b.executions else FORWARD
    session.client_data(t.bind("", "s1", (b"7",)) + t.execute() + t.sync())
    assert io.upstream.take() == t.parse("", REFUSAL_SQL) + t.sync()


async def test_statement_parsed_in_an_earlier_batch_resolves_its_sql() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(t.parse("s1", "UPDATE orders SET total = $1") + t.sync())
    session.server_data(t.parse_complete() + t.ready("I"))
    # Named portal, Describe in between: not the fast path.
    session.client_data(
        t.bind("p1", "s1", (b"0",)) + t.describe("P", "p1") + t.execute("p1") + t.sync()
    )
    [execution] = hook.batches[-1].executions
    assert execution.statement == b"s1"
    assert execution.portal == b"p1"
    assert execution.sql == "UPDATE orders SET total = $1"
    assert hook.batches[-1].parses == ()


async def test_portal_bound_in_an_earlier_batch_resolves_its_sql() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(
        t.parse("s1", "SELECT * FROM big") + t.bind("c1", "s1") + t.execute("c1", 100) + t.flush()
    )
    session.client_data(t.execute("c1", 100) + t.sync())
    assert hook.batches[-1].executions == (
        Execution(b"s1", b"c1", "SELECT * FROM big", t.bind("c1", "s1")),
    )


async def test_execute_of_an_unknown_portal_is_unresolved() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(t.execute("cursor_from_sql") + t.sync())
    assert hook.batches[-1].executions == (Execution(b"", b"cursor_from_sql", None, None),)


async def test_closed_statement_no_longer_resolves() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(t.parse("s1", "SELECT 1") + t.sync())
    session.client_data(t.close("S", "s1") + t.sync())
    session.client_data(t.bind("p", "s1") + t.execute("p") + t.sync())
    assert hook.batches[-1].executions[0].sql is None


# --- regressions: each test states what a client or operator should see --------------------------


async def test_function_call_followed_by_sync_never_reaches_the_server() -> None:
    session, io = await connect()
    session.client_data(t.function_call(1598, (b"\x00\x00\x00\x01",)) + t.sync())
    assert io.upstream.take() == t.query(REFUSAL_SQL) + t.sync()


async def test_sync_after_refused_flush_batch_is_sent_once() -> None:
    session, io = await connect(ScriptedHook(on_batch=refuse_deletes))
    session.client_data(t.parse("", "DELETE FROM orders") + t.flush())
    session.server_data(SYNTAX_ERROR)
    io.upstream.take()
    # The client ends the failed pipeline and starts the next one in one write.
    chunk = t.sync() + t.parse("", "SELECT 1") + t.bind("", "") + t.execute() + t.sync()
    session.client_data(chunk)
    assert io.upstream.take() == chunk  # one Sync, one ReadyForQuery, as the client expects


async def test_copy_done_then_batch_in_one_chunk_is_relayed_once() -> None:
    session, io = await connect()
    session.client_data(t.query("COPY orders FROM STDIN"))
    session.server_data(t.copy_in_response(3))
    io.upstream.take()
    chunk = t.copy_data(b"1\t42\t9.99\n") + t.copy_done() + t.parse("", "SELECT 1") + t.sync()
    session.client_data(chunk)
    assert io.upstream.take() == chunk


async def test_rejected_redefinition_does_not_change_what_a_statement_runs() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    # Preparing runs nothing, so a hook lets Parse-only batches through.
    session.client_data(t.parse("s", "DROP TABLE orders") + t.sync())
    session.server_data(t.parse_complete() + t.ready("I"))
    session.client_data(t.parse("s", "SELECT 1") + t.sync())
    session.server_data(t.error_response('prepared statement "s" already exists', "42P05"))
    session.server_data(t.ready("I"))
    session.client_data(t.bind("", "s") + t.execute() + t.sync())
    # PostgreSQL will run DROP TABLE orders: the hook must not be told it is SELECT 1.
    assert hook.batches[-1].executions[0].sql in ("DROP TABLE orders", None)


async def test_close_then_reparse_of_a_name_in_one_batch_keeps_the_new_statement() -> None:
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(t.parse("s", "SELECT 1") + t.sync())
    session.client_data(t.close("S", "s") + t.parse("s", "SELECT 2") + t.sync())
    session.client_data(t.bind("", "s") + t.execute() + t.sync())
    assert hook.batches[-1].executions[0].sql == "SELECT 2"


async def test_notice_queued_mid_message_is_delivered_and_refusals_stay_aligned() -> None:
    session, io = await connect(ScriptedHook(on_query=refuse_drops))
    note = t.notification(4242, "jobs", "x" * 50)
    session.server_data(note[:20])  # an async NotificationResponse, half received
    session.send_notice("backstop: approved")
    session.client_data(t.query("SELECT 1"))
    session.server_data(note[20:] + t.command_complete("SELECT 1") + t.ready("I"))
    received = io.client.take()
    assert b"Mbackstop: approved\x00" in received
    session.client_data(t.query("DROP TABLE orders"))
    session.server_data(SYNTAX_ERROR + t.ready("I"))
    assert io.client.take() == our_error(NO_DROPS, hint="ask an operator") + t.ready("I")


async def test_query_after_extended_messages_keeps_the_client_order() -> None:
    # Seen in the wild (pgsql-hackers, "When extended query protocol ends?"): Parse/Bind/
    # Execute twice, then a Query instead of Sync. PostgreSQL runs them in order.
    session, io = await connect()
    extended = t.parse("", "SET extra_float_digits = 3") + t.bind("", "") + t.execute()
    chunk = extended + extended + t.query("SET extra_float_digits = 3")
    session.client_data(chunk)
    assert io.upstream.take() == chunk


@pytest.mark.parametrize(
    "message",
    [
        t.frame(b"B", b"portal-without-nul"),
        t.frame(b"P", b"name\x00sql-without-nul"),
        t.frame(b"E", b"portal"),
        t.frame(b"C", b""),
        t.frame(b"C", b"Sname"),
    ],
    ids=["bind", "parse", "execute", "close-empty", "close-name"],
)
async def test_malformed_extended_message_is_fatal(message: bytes) -> None:
    session, io = await connect()
    session.client_data(message)
    assert fatal_fields(io.client.take())["C"] == "08P01"
    assert io.client.closed


async def test_malformed_parameter_status_from_the_server_is_fatal() -> None:
    session, io = await connect()
    session.server_data(t.frame(b"S", b"TimeZone"))
    assert fatal_fields(io.client.take())["C"] == "08P01"
    assert io.client.closed


async def test_fatal_error_is_never_written_into_the_middle_of_a_row() -> None:
    session, io = await connect()
    session.client_data(t.query("SELECT payload FROM big"))
    row = t.data_row(b"x" * 1000)
    session.server_data(row[:100])
    io.client.take()
    session.client_data(b"A\x00\x00\x00\x04")  # garbage from the client
    assert io.client.closed
    assert io.client.take() == b""


async def test_unnamed_portal_of_a_held_fast_path_run_resolves_later() -> None:
    decision: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    hook = ScriptedHook()
    session, _ = await connect(hook)
    session.client_data(t.query("BEGIN"))
    session.server_data(t.command_complete("BEGIN") + t.ready("T"))
    session.client_data(t.parse("s1", "SELECT * FROM big") + t.sync())
    session.server_data(t.parse_complete() + t.ready("T"))
    hook.on_batch = lambda b: decision
    session.client_data(t.bind("", "s1") + t.execute("", 100) + t.sync())
    hook.on_batch = lambda b: FORWARD
    decision.set_result(FORWARD)
    await settle()
    session.server_data(t.bind_complete() + t.frame(b"s", b"") + t.ready("T"))
    session.client_data(t.execute("", 100) + t.sync())  # fetch the next 100 rows
    assert hook.batches[-1].executions[0].sql == "SELECT * FROM big"
