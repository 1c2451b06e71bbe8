"""The only socket code of the gateway: the listener, TLS, upstream connections, cancels.

Built on asyncio Protocols (uvloop when installed) rather than streams: the relay's own CPU
is the limit on a small box, so bytes go from one transport to the other with as little
Python in between as possible.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from backstop_core.gateway.pgwire import SSL_REQUEST_CODE, encode_cancel_request
from backstop_core.gateway.session import Session, StatementHook
from backstop_core.native import status as native_status

log = logging.getLogger("backstop.gateway")

_SSL_REQUEST = (8).to_bytes(4, "big") + SSL_REQUEST_CODE.to_bytes(4, "big")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where PostgreSQL is, and how to reach it (the client's own startup names user/db)."""

    host: str
    port: int
    sslmode: str = "prefer"
    sslrootcert: Path | None = None
    connect_timeout: float = 10.0

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def describe(self) -> str:
        return f"{self.host}:{self.port}" if not self.is_unix else f"{self.host} (port {self.port})"


class UpstreamError(Exception):
    pass


def client_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def upstream_tls_context(target: UpstreamTarget) -> ssl.SSLContext:
    if target.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(
            cafile=str(target.sslrootcert) if target.sslrootcert else None
        )
        ctx.check_hostname = target.sslmode == "verify-full"
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, session: Session | None, client: _ClientProtocol | None) -> None:
        self.session = session
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.ssl_answer: asyncio.Future[bytes] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Use `transport`; from now on `write` is its own write, one call less per message."""
        self.transport = transport  # type: ignore[assignment]
        self.write = transport.write  # type: ignore[attr-defined, method-assign]

    def relay_directly(self) -> None:
        """TLS settled: the server's bytes go straight to the session, one call less per
        read (the transport looks the method up again when given its protocol anew)."""
        if self.session is not None and self.transport is not None:
            self.data_received = self.session.server_data  # type: ignore[method-assign]
            self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        answer = self.ssl_answer
        if answer is not None:
            self.ssl_answer = None
            if not answer.done():
                answer.set_result(data[:1])
            data = data[1:]
            if not data:
                return
        if self.session is not None:
            self.session.server_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ssl_answer is not None and not self.ssl_answer.done():
            self.ssl_answer.set_exception(UpstreamError("connection closed during SSL request"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.session is not None:
            self.session.server_lost()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for("upstream-buffer")

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for("upstream-buffer")

    # Peer, as the session sees the upstream side
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect_upstream(
    target: UpstreamTarget,
    factory: Callable[[], _UpstreamProtocol],
) -> _UpstreamProtocol:
    """Open a connection to PostgreSQL, negotiating TLS the way libpq's sslmode does."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(target.connect_timeout):
            if target.is_unix:
                path = os.path.join(target.host, f".s.PGSQL.{target.port}")
                transport, proto = await loop.create_unix_connection(factory, path)
            else:
                transport, proto = await loop.create_connection(factory, target.host, target.port)
            if target.is_unix or target.sslmode in ("disable", "allow"):
                proto.relay_directly()
                return proto
            proto.ssl_answer = loop.create_future()
            transport.write(_SSL_REQUEST)
            answer = await proto.ssl_answer
            if answer == b"S":
                ctx = upstream_tls_context(target)
                tls_transport = await loop.start_tls(
                    transport,
                    proto,
                    ctx,
                    server_hostname=target.host if ctx.check_hostname else None,
                )
                assert tls_transport is not None
                proto.attach(tls_transport)
                proto.relay_directly()
                return proto
            if answer == b"N" and target.sslmode == "prefer":
                proto.relay_directly()
                return proto
            transport.close()
            raise UpstreamError(
                f"the server at {target.describe()} does not accept TLS, "
                f"but upstream sslmode is {target.sslmode}"
            )
    except TimeoutError as exc:
        raise UpstreamError(f"timed out connecting to {target.describe()}") from exc
    except OSError as exc:
        raise UpstreamError(
            f"cannot connect to {target.describe()}: {exc.strerror or exc}"
        ) from exc
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS with {target.describe()} failed: {exc}") from exc


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, gateway: GatewayServer) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.upstream: _UpstreamProtocol | None = None
        self._pauses: set[str] = set()
        self.session = Session(
            io=self,
            hook=gateway.hook,
            session_id=f"{gateway.id_prefix}{next(gateway.counter)}",
            client_address="",
            max_message_size=gateway.max_message_size,
        )
        # The client's bytes go straight to the session: the transport takes this method
        # from its protocol once, when it is made, so it is set before that.
        self.data_received = self.session.client_data  # type: ignore[method-assign]

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)
        peer = transport.get_extra_info("peername")
        self.session.client_address = (
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        )
        self.gateway.sessions[self.session.session_id] = self.session

    def data_received(self, data: bytes) -> None:
        self.session.client_data(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        self.gateway.sessions.pop(session.session_id, None)
        if session.backend_pid is not None:
            self.gateway.recently_closed.append((time.monotonic(), session.backend_pid))
        session.client_lost()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Use `transport`; from now on `write` is its own write, one call less per message."""
        self.transport = transport  # type: ignore[assignment]
        self.write = transport.write  # type: ignore[attr-defined, method-assign]

    # --- Peer
    @property
    def client(self) -> _ClientProtocol:
        return self

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self.pause_reading_for("session")

    def resume_reading(self) -> None:
        self.resume_reading_for("session")

    def pause_reading_for(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._pauses.add(reason)

    def resume_reading_for(self, reason: str) -> None:
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- SessionIO
    def start_client_tls(self) -> Awaitable[None] | None:
        ctx = self.gateway.tls_context
        if ctx is None:
            return None
        return self._start_tls(ctx)

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        # start_tls wants a transport that is reading; the session paused it.
        self.transport.resume_reading()
        new = await loop.start_tls(self.transport, self, ctx, server_side=True)
        assert new is not None
        self.attach(new)
        if self._pauses:
            self.transport.pause_reading()

    async def open_upstream(self, session: Session) -> _UpstreamProtocol:
        upstream = await connect_upstream(
            self.gateway.target, lambda: _UpstreamProtocol(session, self)
        )
        self.upstream = upstream
        return upstream

    def cancel(self, pid: int, secret: bytes) -> None:
        self.gateway.cancel(pid, secret)

    def register_backend(self, session: Session, pid: int, secret: bytes) -> None:
        self.gateway.backends[(pid, secret)] = session

    def unregister_backend(self, session: Session) -> None:
        if session.backend_pid is not None and session.backend_secret is not None:
            self.gateway.backends.pop((session.backend_pid, session.backend_secret), None)


class GatewayServer:
    """Listens for PostgreSQL clients and relays each to its own upstream connection."""

    def __init__(
        self,
        *,
        target: UpstreamTarget,
        hook: StatementHook,
        host: str = "127.0.0.1",
        port: int = 6432,
        tls_context: ssl.SSLContext | None = None,
        max_message_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.hook = hook
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.max_message_size = max_message_size
        self.sessions: dict[str, Session] = {}
        self.backends: dict[tuple[int, bytes], Session] = {}
        # Backends of sessions that just ended may still be finishing their last query.
        self.recently_closed: deque[tuple[float, int]] = deque(maxlen=10000)
        self.counter = itertools.count(1)
        self.id_prefix = os.urandom(2).hex() + "-"
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientProtocol(self), self.host, self.port, backlog=1024, reuse_address=True
        )
        sockets = self._server.sockets
        if sockets and self.port == 0:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "gateway listening on %s:%s, upstream %s", self.host, self.port, self.target.describe()
        )
        native = native_status()
        (log.warning if native.stale else log.info)("%s", native.describe())

    def recently_closed_pids(self, within: float = 60.0) -> frozenset[int]:
        horizon = time.monotonic() - within
        while self.recently_closed and self.recently_closed[0][0] < horizon:
            self.recently_closed.popleft()
        return frozenset(pid for _, pid in self.recently_closed)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            session.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cancel(self, pid: int, secret: bytes) -> None:
        session = self.backends.get((pid, secret))
        if session is None:
            return  # PostgreSQL, too, ignores a cancel with an unknown key
        if session.cancel_hold():
            return  # the statement was held here, not running upstream
        task = asyncio.ensure_future(self._send_cancel(pid, secret))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, pid: int, secret: bytes) -> None:
        try:
            proto = await connect_upstream(self.target, lambda: _UpstreamProtocol(None, None))
            proto.write(encode_cancel_request(pid, secret))
            async with asyncio.timeout(5):
                await proto.closed
        except (UpstreamError, TimeoutError) as exc:
            log.warning("cancel request for backend %s failed: %s", pid, exc)
