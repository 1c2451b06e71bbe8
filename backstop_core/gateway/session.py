"""One client connection: startup and authentication relay, statement interception,
transaction status.

The session is driven by bytes (`client_data`, `server_data`) and writes to two peers; the
server module owns the sockets. Every simple Query and every extended-protocol batch
(Parse/Bind/Describe/Execute/Close up to Sync or Flush) goes through one hook, which can
forward it, refuse it, or hold it while a human decides. A refused unit is replaced on the
wire by a statement that fails at parse time, and the server's error is swapped for ours:
the server's view of the transaction (failed inside a block, rolled back in a pipeline)
stays exactly what the client is told.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol, final

from mypy_extensions import mypyc_attr

from backstop_core.gateway.pgwire import (
    CLIENT_MESSAGE_TYPES,
    BackendScanner,
    Bind,
    CancelRequest,
    FrameReader,
    GSSEncRequest,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    StartupReader,
    decode_bind,
    decode_error_fields,
    decode_startup_packet,
    encode_error,
    encode_notice,
    encode_parse,
    encode_query,
    encode_startup,
)
from backstop_core.gateway.pgwire.framing import read_i32

log = logging.getLogger("backstop.gateway")

# Sent upstream in place of a refused statement: it fails while being parsed, so nothing
# runs, and the server ends up in the same transaction state the client is told about.
REFUSAL_SQL = "backstop_refused_this_statement"
_FLUSH = b"H\x00\x00\x00\x04"
_EXECUTE_UNNAMED_HEAD = b"E\x00\x00\x00\x09\x00"  # Execute, length 9, portal ""
_DESCRIBE_UNNAMED_PORTAL = b"D\x00\x00\x00\x06P\x00"
_BACKLOG_LIMIT = 1024 * 1024  # client bytes buffered while a statement is held
# An int: `int in bytes` is a memchr, where `bytes in bytes` with a one-byte value first
# tries it as an int and formats an exception.
_BACKSLASH = 0x5C
_SYNC = b"S\x00\x00\x00\x04"

_Q, _P, _B, _D, _E, _C, _H, _S = (ord(c) for c in "QPBDECHS")
_F, _X, _p = ord("F"), ord("X"), ord("p")
_EXTENDED = frozenset((_P, _B, _D, _E, _C))
_AUTH_SASL = 10


class Peer(Protocol):
    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class SessionIO(Protocol):
    """What a session needs from the socket layer."""

    @property
    def client(self) -> Peer:
        """The client's side; one peer for the session's whole life, TLS or not."""

    def start_client_tls(self) -> Awaitable[None] | None:
        """Upgrade the client connection to TLS; None when no certificate is configured."""

    async def open_upstream(self, session: Session) -> Peer:
        """Connect to PostgreSQL; its bytes are then fed to `session.server_data`."""

    def cancel(self, pid: int, secret: bytes) -> None:
        """Forward a CancelRequest to the upstream backend that owns this key."""

    def register_backend(self, session: Session, pid: int, secret: bytes) -> None: ...

    def unregister_backend(self, session: Session) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a forwarded unit ended, once the server said ReadyForQuery."""

    ok: bool
    error: str | None
    sqlstate: str | None
    txn_status: str


CompletionCallback = Callable[[Outcome], None]

# A unit that succeeded ends with one of these: immutable, so shared by every such unit.
_SUCCEEDED = {status: Outcome(True, None, None, status) for status in "ITE"}


@final
class Verdict:
    """What the hook decided for one unit; its attributes are read-only (compiled, that is
    enforced at run time).

    A final class with `Final` attributes rather than a frozen dataclass or a named tuple:
    one is made for every forwarded statement, and compiled it is built natively (about a
    tenth of a frozen dataclass's cost, a seventh of a named tuple's, whose constructor is
    interpreted Python)."""

    __slots__ = ("error", "forward", "on_complete")

    def __init__(
        self,
        forward: bool,
        error: bytes = b"",
        on_complete: CompletionCallback | None = None,
    ) -> None:
        self.forward: Final = forward
        self.error: Final = error  # the ErrorResponse to send when not forwarding
        self.on_complete: Final = on_complete

    def __repr__(self) -> str:
        return f"Verdict(forward={self.forward!r}, error={self.error!r})"


FORWARD = Verdict(True)


def refuse(message: str, sqlstate: str = "42501", *, hint: str | None = None) -> Verdict:
    return Verdict(False, encode_error(message, sqlstate, hint=hint))


@dataclass(frozen=True, slots=True)
class Execution:
    """One Execute of a batch, resolved to the SQL of its prepared statement."""

    statement: bytes
    portal: bytes
    sql: str | None  # None when the statement was not prepared through the gateway
    bind: bytes | None  # the raw Bind message; parameters decoded only on demand

    def params(self) -> tuple[bytes | None, ...]:
        bind = self.bind_message()
        return bind.params if bind is not None else ()

    def bind_message(self) -> Bind | None:
        if self.bind is None:
            return None
        return decode_bind(memoryview(self.bind)[5:])


@dataclass(frozen=True, slots=True)
class Batch:
    parses: tuple[tuple[bytes, str], ...]  # (statement name, sql)
    executions: tuple[Execution, ...]
    sync: bool  # ends with Sync (else Flush)


def prepared_batch(statement: bytes, sql: str, bind: bytes) -> Batch:
    """The batch `check_prepared` stands for: Bind of `statement` to the unnamed portal,
    Execute of it, Sync."""
    return Batch((), (Execution(statement, b"", sql, bind),), sync=True)


@mypyc_attr(allow_interpreted_subclasses=True)
class StatementHook:
    """What the session asks about each unit. A base class rather than a protocol: compiled,
    the session then calls its hook's methods directly instead of looking them up by name
    on every statement. Every method must be overridden."""

    def check_startup(self, session: Session, startup: StartupMessage) -> bytes | None:
        """An ErrorResponse to refuse the connection with, or None."""
        raise NotImplementedError

    def check_query(self, session: Session, sql: str) -> Verdict | Awaitable[Verdict]:
        raise NotImplementedError

    def check_batch(self, session: Session, batch: Batch) -> Verdict | Awaitable[Verdict]:
        raise NotImplementedError

    def check_prepared(
        self, session: Session, statement: bytes, sql: str, bind: bytes
    ) -> Verdict | Awaitable[Verdict]:
        """`check_batch(prepared_batch(statement, sql, bind))`, the commonest batch of all
        (a prepared statement run again), asked without building the batch."""
        raise NotImplementedError

    def on_parameter_status(self, session: Session, name: str, value: str) -> None:
        raise NotImplementedError

    def session_ready(self, session: Session) -> None:
        raise NotImplementedError

    def session_ended(self, session: Session) -> None:
        raise NotImplementedError


class PassThroughHook(StatementHook):
    """Forwards everything: the gateway as a plain relay."""

    def check_startup(self, session: Session, startup: StartupMessage) -> bytes | None:
        return None

    def check_query(self, session: Session, sql: str) -> Verdict:
        return FORWARD

    def check_batch(self, session: Session, batch: Batch) -> Verdict:
        return FORWARD

    def check_prepared(self, session: Session, statement: bytes, sql: str, bind: bytes) -> Verdict:
        return FORWARD

    def on_parameter_status(self, session: Session, name: str, value: str) -> None:
        return None

    def session_ready(self, session: Session) -> None:
        return None

    def session_ended(self, session: Session) -> None:
        return None


class Phase(Enum):
    STARTUP = "startup"
    CONNECTING = "connecting"
    AUTH = "auth"
    READY = "ready"
    CLOSED = "closed"


class _Pending:
    """One unit in flight upstream: the server owes it exactly one ReadyForQuery."""

    __slots__ = (
        "after",
        "error",
        "on_complete",
        "parsed",
        "parses",
        "replace_error",
        "sqlstate",
        "swallow_ready",
    )

    def __init__(
        self,
        on_complete: CompletionCallback | None = None,
        replace_error: bytes | None = None,
        parses: list[tuple[bytes, str | None]] | None = None,
        swallow_ready: bool = False,
    ) -> None:
        self.on_complete = on_complete
        self.replace_error = replace_error  # our ErrorResponse, sent instead of the server's
        # The unit's Parse messages in order, each with the SQL its name had before: a Parse
        # the server rejects defines nothing, so its name gets its old meaning back.
        self.parses = parses
        self.parsed = 0  # ParseComplete messages seen
        self.swallow_ready = swallow_ready  # a ReadyForQuery the client never asked for
        self.after: list[bytes] | None = None  # our messages, sent once this unit is done
        self.error: str | None = None
        self.sqlstate: str | None = None


class Session:
    def __init__(
        self,
        *,
        io: SessionIO,
        hook: StatementHook,
        session_id: str,
        client_address: str,
        max_message_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.io = io
        self._client = io.client  # the same peer for the session's life (TLS or not)
        self.hook = hook
        self.session_id = session_id
        self.client_address = client_address
        self.phase = Phase.STARTUP
        self.startup: StartupMessage | None = None
        self.client_tls = False
        self.txn_status = "I"
        self.server_params: dict[str, str] = {}
        self.backend_pid: int | None = None
        self.backend_secret: bytes | None = None
        # Free for the hook: per-session state such as SQL-level PREPAREd statements.
        self.context: dict[str, object] = {}
        self.upstream: Peer | None = None
        self._startup_reader: StartupReader | None = StartupReader()
        self._frames = FrameReader(max_message_size, CLIENT_MESSAGE_TYPES)
        self._scanner = BackendScanner(max_message_size)
        self._pending: deque[_Pending] = deque()
        self._at_boundary: list[bytes] = []  # our messages, sent at the next message boundary
        self._statements: dict[bytes, str] = {}  # prepared statement name -> SQL
        self._portals: dict[bytes, tuple[bytes, bytes]] = {}  # portal -> (statement, Bind)
        self._batch: list[bytes] = []
        self._batch_kinds: list[int] = []
        # Waiting for every unit in flight to finish before judging the next one (see
        # _must_wait_for_quiet).
        self._quiet_wait = False
        self._batch_parses: list[tuple[bytes, str]] = []
        self._batch_execs: list[Execution] = []
        self._batch_local: dict[bytes, str] = {}
        self._batch_portals: dict[bytes, tuple[bytes, bytes]] = {}
        self._closed: list[bytes] = []
        self._absorb_until_sync = False
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._backlog_bytes = 0
        self._cancel_requested = False
        self._held: asyncio.Task[None] | None = None
        self._client_paused = False
        # Completion callbacks of batches forwarded on Flush: they end with the next unit
        # that gets a ReadyForQuery.
        self._carry: list[CompletionCallback] = []

    # ----------------------------------------------------------------- identity

    @property
    def user(self) -> str:
        return self.startup.get("user") if self.startup else ""

    @property
    def database(self) -> str:
        if not self.startup:
            return ""
        return self.startup.get("database") or self.startup.get("user")

    @property
    def application_name(self) -> str:
        name = self.server_params.get("application_name")
        if name is not None:
            return name
        return self.startup.get("application_name") if self.startup else ""

    def protocol_statement(self, name: str) -> str | None:
        """SQL of a statement prepared with a Parse message (shares SQL PREPARE's names)."""
        return self._statements.get(name.encode("utf-8", "surrogateescape"))

    def forget_statements(self, names: Iterable[str] | None) -> None:
        """DEALLOCATE/DISCARD ran: those names (None: all) no longer exist on the server."""
        if names is None:
            self._statements.clear()
            return
        for name in names:
            self._statements.pop(name.encode("utf-8", "surrogateescape"), None)

    # ----------------------------------------------------------------- client side

    def client_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.READY:
                head = data[:1]
                if (
                    (head == b"B" or head == b"Q")
                    and self._held is None
                    and not self._backlog
                    and not self._batch
                    and not self._absorb_until_sync
                    and self._frames.pending == 0
                    and (self._execute_prepared(data) if head == b"B" else self._query(data))
                ):
                    return
                frames = self._frames.feed(data)
                if self._held is not None or self._backlog:
                    # Keep reading while a statement is held, so a client that goes away
                    # is noticed at once; stop only if it sends a lot meanwhile.
                    self._backlog.extend(frames)
                    self._backlog_bytes += len(data)
                    if self._backlog_bytes > _BACKLOG_LIMIT:
                        self._pause_client()
                    return
                self._process_frames(frames, data if self._frames.whole else None)
            elif self.phase is Phase.AUTH:
                # Only authentication answers go through before the session is ready;
                # anything else waits, to be checked like every other statement.
                for kind, raw in self._frames.feed(data):
                    if kind == _p and not self._backlog and self.upstream is not None:
                        self.upstream.write(raw)
                    else:
                        self._backlog.append((kind, raw))
            elif self.phase is Phase.STARTUP:
                self._startup_data(data)
            elif self.phase is Phase.CONNECTING:
                self._backlog.extend(self._frames.feed(data))
        except ProtocolViolation as exc:
            self._fatal(str(exc), exc.sqlstate)
        # A message whose body is malformed. SystemError too: compiled (setup.py), a bytes
        # slice with its end before its start raises it instead of giving b"".
        except (ValueError, IndexError, SystemError) as malformed:
            self._fatal(f"invalid message from the client: {malformed}", "08P01")

    def _startup_data(self, data: bytes) -> None:
        reader = self._startup_reader
        assert reader is not None
        reader.feed(data)
        while self.phase is Phase.STARTUP:
            body = reader.next_packet()
            if body is None:
                return
            packet = decode_startup_packet(body)
            if isinstance(packet, SSLRequest):
                if reader.pending:
                    # Bytes sent before the TLS handshake could be injected by anyone on
                    # the path; PostgreSQL refuses them too.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                upgrade = None if self.client_tls else self.io.start_client_tls()
                if upgrade is None:
                    self.io.client.write(b"N")
                else:
                    self.io.client.write(b"S")
                    self._pause_client()
                    self._spawn(self._finish_tls(upgrade))
                    return
            elif isinstance(packet, GSSEncRequest):
                if reader.pending:
                    raise ProtocolViolation("received unencrypted data after GSSENC request")
                self.io.client.write(b"N")
            elif isinstance(packet, CancelRequest):
                self.io.cancel(packet.pid, packet.secret)
                self.close()
                return
            else:
                self._begin(packet, reader.take_rest())
                return

    async def _finish_tls(self, upgrade: Awaitable[None]) -> None:
        try:
            await upgrade
        except Exception as exc:
            log.info("session %s: TLS handshake failed: %s", self.session_id, exc)
            self.close()
            return
        self.client_tls = True
        self._resume_client()

    def _begin(self, startup: StartupMessage, rest: bytes) -> None:
        self.startup = startup
        self._startup_reader = None
        if startup.get("replication"):
            self._fatal("backstop: replication connections are not accepted", "28000")
            return
        refusal = self.hook.check_startup(self, startup)
        if refusal is not None:
            self.io.client.write(refusal)
            self.close()
            return
        self.phase = Phase.CONNECTING
        if rest:
            self._backlog.extend(self._frames.feed(rest))
        self._pause_client()
        self._spawn(self._connect(startup))

    async def _connect(self, startup: StartupMessage) -> None:
        try:
            self.upstream = await self.io.open_upstream(self)
        except Exception as exc:
            log.warning("session %s: upstream unavailable: %s", self.session_id, exc)
            self._fatal(
                f"backstop: the database server is not reachable ({exc}); try again shortly",
                "08006",
            )
            return
        if self.phase is Phase.CLOSED:
            self.upstream.close()
            return
        self.phase = Phase.AUTH
        self.upstream.write(encode_startup(startup.protocol, startup.params))
        self._resume_client()

    def client_lost(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self._held is not None:
            self._held.cancel()
        self._finish_all(Outcome(False, "client disconnected", "08006", self.txn_status))
        if self.upstream is not None:
            self.upstream.close()
        self.io.unregister_backend(self)
        self.hook.session_ended(self)

    # ----------------------------------------------------------------- statements

    def _process_frames(self, frames: list[tuple[int, bytes]], chunk: bytes | None = None) -> None:
        """Check and relay whole client messages. `chunk` is the bytes the frames came from,
        when they are exactly those bytes: a batch that is the whole chunk is relayed as is."""
        upstream = self.upstream
        assert upstream is not None
        out: list[bytes] = []
        index = 0
        count = len(frames)
        batch_begin = 0 if not self._batch else -1
        while index < count:
            kind, raw = frames[index]
            index += 1
            if self._absorb_until_sync:
                # The server is discarding messages until Sync after our refusal.
                out.append(raw)
                if kind == _S:
                    self._absorb_until_sync = False
                batch_begin = index
                continue
            if kind in _EXTENDED:
                self._batch.append(raw)
                self._batch_kinds.append(kind)
                self._track_extended(kind, raw)
                continue
            if kind in (_S, _H):
                self._batch.append(raw)
                self._batch_kinds.append(kind)
                if self._pending and self._parses_backslash():
                    self._flush(out)
                    self._defer(
                        [*zip(self._batch_kinds, self._batch, strict=True), *frames[index:]]
                    )
                    return
                whole = (
                    [chunk] if chunk is not None and batch_begin == 0 and index == count else None
                )
                if not self._decide_batch(kind == _S, frames, index, out, whole):
                    return
                batch_begin = index
                continue
            # A message that ends an extended sequence without Sync or Flush (a client
            # sending Query mid-pipeline): the pending messages are judged first.
            if self._batch and not self._decide_batch(
                False, frames, index - 1, out, None, implicit=True
            ):
                return
            batch_begin = index
            if kind == _Q:
                if self._pending and _BACKSLASH in raw:
                    self._flush(out)
                    self._defer(frames[index - 1 :])
                    return
                verdict = self.hook.check_query(self, _query_text(raw))
                if not isinstance(verdict, Verdict):
                    self._flush(out)
                    self._hold(verdict, [raw], None, frames[index:])
                    return
                self._apply(verdict, [raw], None, out)
            elif kind == _X:
                self._flush(out)
                upstream.write(raw)
                self.close()
                return
            elif kind == _F:
                out.append(encode_query(REFUSAL_SQL))
                self._pending.append(
                    _Pending(
                        replace_error=encode_error(
                            "backstop: the fast-path function call protocol is not allowed "
                            "through the gateway; call the function in a SQL statement instead",
                            "42501",
                        )
                    )
                )
            else:
                out.append(raw)  # CopyData/CopyDone/CopyFail, or a stray password message
        self._flush(out)

    def _decide_batch(
        self,
        sync: bool,
        frames: list[tuple[int, bytes]],
        index: int,
        out: list[bytes],
        whole: list[bytes] | None,
        *,
        implicit: bool = False,
    ) -> bool:
        """Judge the extended messages collected so far; False when the batch is held."""
        batch = Batch(tuple(self._batch_parses), tuple(self._batch_execs), sync=sync)
        raws = whole if whole is not None else self._batch
        unsafe = self._executes_then_parses_backslash()
        self._batch = []
        self._batch_kinds = []
        if unsafe:
            verdict: Verdict | Awaitable[Verdict] = refuse(
                "backstop: this pipeline parses a statement containing a backslash after "
                "executing another one, which could change how the server reads it; send "
                "that statement after a Sync",
                "42501",
            )
        else:
            verdict = self.hook.check_batch(self, batch)
        if not isinstance(verdict, Verdict):
            self._flush(out)
            self._hold(verdict, raws, batch, frames[index:], implicit=implicit)
            return False
        self._apply(verdict, raws, batch, out, implicit=implicit)
        return True

    # The server lexes a statement under the settings in force when it arrives, and a unit
    # still running may change them (set_config in a function, a trigger...). The lexers
    # only disagree about backslashes (standard_conforming_strings, backslash_quote, and
    # multibyte client encodings whose second byte can be 0x5C), so a statement with one
    # waits until nothing is in flight and the server has reported its settings.

    def _parses_backslash(self) -> bool:
        return any(
            kind == _P and _BACKSLASH in raw
            for kind, raw in zip(self._batch_kinds, self._batch, strict=True)
        )

    def _executes_then_parses_backslash(self) -> bool:
        executed = False
        for kind, raw in zip(self._batch_kinds, self._batch, strict=True):
            if kind == _E:
                executed = True
            elif kind == _P and executed and _BACKSLASH in raw:
                return True
        return False

    def _defer(self, frames: list[tuple[int, bytes]]) -> None:
        self._batch = []
        self._batch_kinds = []
        self._reset_batch()
        self._backlog.extendleft(reversed(frames))
        self._quiet_wait = True

    def _flush(self, out: list[bytes]) -> None:
        if out and self.upstream is not None:
            self.upstream.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _execute_prepared(self, data: bytes) -> bool:
        """The hot path of prepared statements: a chunk that is exactly Bind (unnamed portal,
        known statement), Execute of that portal, Sync. Returns False to take the full path."""
        end = len(data)
        if end < 26 or data[5] != 0 or not data.endswith(_SYNC):
            return False
        length = read_i32(data, 1)
        if length < 4:
            return False  # malformed: the full path refuses it
        execute = 1 + length
        # Slices, not startswith(prefix, offset): compiled, a slice and == are native where
        # startswith with an offset is a generic method call that parses its arguments.
        if data[execute : execute + 7] == _DESCRIBE_UNNAMED_PORTAL:
            execute += 7  # libpq's PQsendQueryPrepared describes the portal too
        if execute + 15 != end or data[execute : execute + 6] != _EXECUTE_UNNAMED_HEAD:
            return False
        statement = data[6 : data.index(0, 6)]
        sql = self._statements.get(statement)
        if sql is None or length > self._frames.max_message_size:
            return False
        bind = data[: 1 + length]
        verdict = self.hook.check_prepared(self, statement, sql, bind)
        if isinstance(verdict, Verdict) and verdict.forward:
            self._portals[b""] = (statement, bind)
            self._pending.append(_Pending(verdict.on_complete))
            self.upstream.write(data)  # type: ignore[union-attr]  # set once READY
            return True
        self._batch_portals[b""] = (statement, bind)
        self._settle_chunk(verdict, data, prepared_batch(statement, sql, bind))
        return True

    def _query(self, data: bytes) -> bool:
        """The hot path of the simple protocol: a chunk that is exactly one Query. Returns
        False to take the full path."""
        end = len(data)
        if end < 6 or data[-1] != 0:
            return False
        length = read_i32(data, 1)
        if length + 1 != end or length > self._frames.max_message_size:
            return False
        if self._pending and _BACKSLASH in data:
            return False  # waits for the units in flight: the full path defers it
        verdict = self.hook.check_query(self, data[5:-1].decode("utf-8", "surrogateescape"))
        if isinstance(verdict, Verdict) and verdict.forward:
            self._pending.append(_Pending(verdict.on_complete))
            self.upstream.write(data)  # type: ignore[union-attr]  # set once READY
            return True
        self._settle_chunk(verdict, data, None)
        return True

    def _settle_chunk(
        self, verdict: Verdict | Awaitable[Verdict], data: bytes, batch: Batch | None
    ) -> None:
        """A hot-path chunk that is not simply forwarded: held for a decision, or refused."""
        if not isinstance(verdict, Verdict):
            self._hold(verdict, [data], batch, [])
            return
        out: list[bytes] = []
        self._apply(verdict, [data], batch, out)
        self._flush(out)

    def _track_extended(self, kind: int, raw: bytes) -> None:
        # Names stay bytes: they are only ever compared, and decoding costs on the hot path.
        if kind == _B:
            first = raw.index(0, 5)
            self._batch_portals[raw[5:first]] = (raw[first + 1 : raw.index(0, first + 1)], raw)
        elif kind == _E:
            portal = raw[5 : raw.index(0, 5)]
            bound = self._batch_portals.get(portal) or self._portals.get(portal)
            if bound is None:
                # A portal the gateway never saw bound (a SQL-level cursor, say): the hook
                # decides what an unresolved execution may do.
                self._batch_execs.append(Execution(b"", portal, None, None))
                return
            statement, bind = bound
            sql: str | None = self._batch_local.get(statement)
            if sql is None and statement not in self._closed:
                sql = self._statements.get(statement)
            self._batch_execs.append(Execution(statement, portal, sql, bind))
        elif kind == _P:
            first = raw.index(0, 5)
            name = raw[5:first]
            text = raw[first + 1 : raw.index(0, first + 1)].decode("utf-8", "surrogateescape")
            self._batch_local[name] = text
            self._batch_parses.append((name, text))
        elif kind == _C and raw[5] == 83:  # Close of a statement ("S")
            name = raw[6 : raw.index(0, 6)]
            self._batch_local.pop(name, None)
            self._closed.append(name)

    def _commit_batch(self) -> list[tuple[bytes, str | None]]:
        """Apply the batch's names now (later messages may use them); return the Parses with
        each name's previous SQL, to restore those the server rejects."""
        statements = self._statements
        parses = [(name, statements.get(name)) for name, _ in self._batch_parses]
        for name in self._closed:
            statements.pop(name, None)
        if self._batch_local:
            statements.update(self._batch_local)
        if self._batch_portals:
            self._portals.update(self._batch_portals)
        self._reset_batch()
        return parses

    def _reset_batch(self) -> None:
        if self._batch_parses:
            self._batch_parses = []
        if self._batch_execs:
            self._batch_execs = []
        if self._batch_local:
            self._batch_local = {}
        if self._batch_portals:
            self._batch_portals = {}
        if self._closed:
            self._closed = []

    def _apply(
        self,
        verdict: Verdict,
        raws: list[bytes],
        batch: Batch | None,
        out: list[bytes],
        *,
        implicit: bool = False,
    ) -> None:
        sync = batch is None or batch.sync
        if verdict.forward:
            parses = self._commit_batch() if batch is not None else None
            out.extend(raws)
            if sync:
                self._pending.append(_Pending(verdict.on_complete, parses=parses or None))
            elif verdict.on_complete is not None:
                # Forwarded on Flush: done when the next ReadyForQuery comes. Its names are
                # kept even if a Parse fails (no Sync to tell which): the server then
                # answers "does not exist" for them, so nothing runs unchecked.
                self._carry.append(verdict.on_complete)
            return
        if batch is None:
            out.append(encode_query(REFUSAL_SQL))
            self._pending.append(_Pending(verdict.on_complete, replace_error=verdict.error))
            return
        self._reset_batch()
        out.append(encode_parse("", REFUSAL_SQL))
        if sync or implicit:
            # An implicit end (a Query mid-pipeline) gets a Sync of ours, whose
            # ReadyForQuery the client never asked for and does not see.
            out.append(_SYNC)
            self._pending.append(
                _Pending(verdict.on_complete, replace_error=verdict.error, swallow_ready=implicit)
            )
        else:
            out.append(_FLUSH)
            self._absorb_until_sync = True
            self._pending.append(_Pending(verdict.on_complete, replace_error=verdict.error))

    def _hold(
        self,
        waiting: Awaitable[Verdict],
        raws: list[bytes],
        batch: Batch | None,
        rest: list[tuple[int, bytes]],
        *,
        implicit: bool = False,
    ) -> None:
        self._backlog.extendleft(reversed(rest))
        self._held = self._spawn(self._await_verdict(waiting, raws, batch, implicit))

    def cancel_hold(self) -> bool:
        """A CancelRequest for this session: ends a held statement as PostgreSQL ends a
        cancelled one. False when nothing is held (the cancel then goes to the server)."""
        if self._held is None or self._held.done():
            return False
        self._cancel_requested = True
        self._held.cancel()
        return True

    async def _await_verdict(
        self, waiting: Awaitable[Verdict], raws: list[bytes], batch: Batch | None, implicit: bool
    ) -> None:
        try:
            verdict = await waiting
        except asyncio.CancelledError:
            if not self._cancel_requested or self.phase is not Phase.READY:
                return
            self._cancel_requested = False
            verdict = refuse(
                "backstop: canceling statement due to user request; it did not run", "57014"
            )
        except Exception as exc:  # fail closed: a broken decision never forwards
            log.exception("session %s: decision failed", self.session_id)
            verdict = refuse(f"backstop: the statement was refused because its check failed: {exc}")
        self._held = None
        if self.phase is not Phase.READY:
            return
        out: list[bytes] = []
        self._apply(verdict, raws, batch, out, implicit=implicit)
        self._flush(out)
        self._drain_backlog()

    def _drain_backlog(self) -> None:
        self._backlog_bytes = 0
        if self._backlog:
            backlog = list(self._backlog)
            self._backlog.clear()
            self._process_frames(backlog)
            if self._held is not None:
                return
        self._resume_client()

    # ----------------------------------------------------------------- server side

    def server_data(self, data: bytes) -> None:
        # Units whose ReadyForQuery is in this chunk: their completions (the audit outcome,
        # session state) run once the client has its answer, off the round trip's path.
        finished: list[tuple[_Pending, str]] | None = None
        try:
            out, events = self._scanner.feed(data)
            client = self._client
            if not events and not self._at_boundary:
                if out:
                    client.write(out)
                return
            sent = 0
            became_ready = False
            pending = self._pending
            for kind, start, stop in events:
                if self._at_boundary:  # every watched message starts at a boundary
                    client.write(out[sent:start])
                    sent = start
                    self._write_at_boundary()
                if kind == 90:  # Z ReadyForQuery
                    status = chr(out[stop - 1])
                    self.txn_status = status
                    if self.phase is not Phase.READY:
                        self.phase = Phase.READY
                        became_ready = True
                    elif pending:
                        entry = pending.popleft()
                        if not (entry.swallow_ready or entry.after):
                            if finished is None:
                                finished = []
                            finished.append((entry, status))
                            continue
                        if finished is not None:  # completions keep their order
                            self._complete_each(finished)
                            finished = None
                        self._complete(entry, status)
                        client.write(out[sent:start])
                        if not entry.swallow_ready:
                            client.write(out[start:stop])
                        sent = stop
                        for message in entry.after or ():
                            client.write(message)
                elif kind == 69:  # E ErrorResponse
                    if pending:
                        head = pending[0]
                        if head.error is None:
                            fields = decode_error_fields(memoryview(out)[start + 5 : stop])
                            head.error = fields.get("M", "")
                            head.sqlstate = fields.get("C")
                        if head.replace_error is not None:
                            client.write(out[sent:start])
                            client.write(head.replace_error)
                            head.replace_error = None
                            sent = stop
                elif kind == 49:  # 1 ParseComplete
                    if pending:
                        pending[0].parsed += 1
                elif kind == 83:  # S ParameterStatus
                    name, value = _two_cstrings(out[start:stop])
                    self.server_params[name] = value
                    self.hook.on_parameter_status(self, name, value)
                elif kind == 75:  # K BackendKeyData
                    body = out[start + 5 : stop]
                    if len(body) < 8:
                        raise ProtocolViolation("BackendKeyData is too short")
                    self.backend_pid = int.from_bytes(body[:4], "big", signed=True)
                    self.backend_secret = bytes(body[4:])
                    self.io.register_backend(self, self.backend_pid, self.backend_secret)
                elif kind == 82 and _auth_code(out, start) == _AUTH_SASL:  # R AuthenticationSASL
                    client.write(out[sent:start])
                    client.write(_without_channel_binding(out[start:stop]))
                    sent = stop
            if sent == 0:
                client.write(out)
            elif sent < len(out):
                client.write(out[sent:])
            if finished is not None:
                done, finished = finished, None
                self._complete_each(done)
            if self._at_boundary and self._scanner.at_boundary:
                self._write_at_boundary()
            if became_ready:
                self.hook.session_ready(self)
                self._drain_backlog()
            elif self._quiet_wait and not pending and self._held is None:
                self._quiet_wait = False
                self._drain_backlog()
        except (ProtocolViolation, ValueError, IndexError, SystemError) as exc:
            if finished is not None:  # the server did answer these
                self._complete_each(finished)
            self._fatal(f"backstop: invalid data from the database server: {exc}", "08P01")

    def _write_at_boundary(self) -> None:
        messages, self._at_boundary = self._at_boundary, []
        for message in messages:
            self.io.client.write(message)

    def _complete_each(self, finished: list[tuple[_Pending, str]]) -> None:
        for entry, status in finished:
            self._complete(entry, status)

    def _complete(self, entry: _Pending, status: str) -> None:
        ok = entry.error is None
        if not ok and entry.parses:
            statements = self._statements
            for name, previous in reversed(entry.parses[entry.parsed :]):
                if previous is None:
                    statements.pop(name, None)
                else:
                    statements[name] = previous
        callbacks = self._carry
        on_complete = entry.on_complete
        if on_complete is None and not callbacks:
            return
        outcome = (ok and _SUCCEEDED.get(status)) or Outcome(
            ok, entry.error, entry.sqlstate, status
        )
        if callbacks:
            self._carry = []
            for callback in callbacks:
                _safe_call(callback, outcome)
        if on_complete is not None:
            _safe_call(on_complete, outcome)

    def send_notice(self, message: str, detail: str | None = None) -> None:
        """Tell the client something between whole messages of the server's stream: after
        the units still in flight, or at once when there are none."""
        notice = encode_notice(message, detail=detail)
        if self._pending:
            tail = self._pending[-1]
            if tail.after is None:
                tail.after = []
            tail.after.append(notice)
        elif self._scanner.at_boundary and not self._at_boundary:
            self.io.client.write(notice)
        else:
            self._at_boundary.append(notice)

    def _finish_all(self, outcome: Outcome) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if entry.on_complete is not None:
                _safe_call(entry.on_complete, outcome)
        for callback in self._carry:
            _safe_call(callback, outcome)
        self._carry = []

    def server_lost(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase in (Phase.READY, Phase.AUTH):
            self._finish_all(
                Outcome(False, "the database server closed the connection", "08006", "I")
            )
            if self._scanner.at_boundary:
                self.io.client.write(
                    encode_error(
                        "backstop: the database server closed the connection",
                        "08006",
                        severity="FATAL",
                    )
                )
        self.close()

    # ----------------------------------------------------------------- plumbing

    def _fatal(self, message: str, sqlstate: str) -> None:
        # Written only between whole server messages: inside one, the client could not read it.
        if self.phase is not Phase.CLOSED and self._scanner.at_boundary:
            self.io.client.write(encode_error(message, sqlstate, severity="FATAL"))
        self.close()

    def close(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.io.client.close()
        self.client_lost()

    def _pause_client(self) -> None:
        if not self._client_paused:
            self._client_paused = True
            self.io.client.pause_reading()

    def _resume_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self.io.client.resume_reading()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)
        return task


_background: set[asyncio.Future[None]] = set()


def _safe_call(callback: CompletionCallback, outcome: Outcome) -> None:
    try:
        callback(outcome)
    except Exception:
        log.exception("completion callback failed")


def _query_text(raw: bytes) -> str:
    """The SQL of a whole Query message, which PostgreSQL requires to end in a NUL."""
    if len(raw) < 6 or raw[-1] != 0:
        raise ProtocolViolation("Query message is not a NUL-terminated string")
    return raw[5:-1].decode("utf-8", "surrogateescape")


def _two_cstrings(raw: bytes) -> tuple[str, str]:
    """The first two NUL-terminated strings after a message header."""
    first_end = raw.index(0, 5)
    second_end = raw.index(0, first_end + 1)
    return (
        raw[5:first_end].decode("utf-8", "surrogateescape"),
        raw[first_end + 1 : second_end].decode("utf-8", "surrogateescape"),
    )


def _auth_code(out: bytes, start: int) -> int:
    return int.from_bytes(out[start + 5 : start + 9], "big")


def _without_channel_binding(message: bytes) -> bytes:
    """AuthenticationSASL without SCRAM-SHA-256-PLUS.

    Channel binding ties SCRAM to one TLS connection; the client's TLS ends at the gateway,
    so a client that picked -PLUS would fail at the server. Offer only plain SCRAM.
    """
    names = [n for n in message[9:].split(b"\x00") if n]
    kept = [n for n in names if not n.endswith(b"-PLUS")] or names
    body = (10).to_bytes(4, "big") + b"".join(n + b"\x00" for n in kept) + b"\x00"
    return b"R" + (len(body) + 4).to_bytes(4, "big") + body
