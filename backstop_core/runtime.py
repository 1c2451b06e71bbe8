"""Composes and supervises the gateway, policy, store and (later) sidecar.

The runtime is the one object the UI and the CLI hold. It owns no UI and imports none.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from backstop_core.config import Settings, SettingsError, effective_sslmode
from backstop_core.events import EventBus, GatewayStarted, GatewayStopped
from backstop_core.gateway.server import (
    GatewayServer,
    UpstreamTarget,
    client_tls_context,
)
from backstop_core.gateway.session import PassThroughHook, StatementHook

log = logging.getLogger("backstop.runtime")


def upstream_target(settings: Settings) -> UpstreamTarget:
    dsn = settings.upstream_dsn()
    root = settings.upstream_sslrootcert or (Path(dsn.sslrootcert) if dsn.sslrootcert else None)
    return UpstreamTarget(
        host=dsn.host, port=dsn.port, sslmode=effective_sslmode(settings), sslrootcert=root
    )


class Runtime:
    """Everything Backstop runs, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus | None = None,
        hook: StatementHook | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus or EventBus()
        self.target = upstream_target(settings)
        self.hook: StatementHook = hook or PassThroughHook()
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            try:
                tls = client_tls_context(settings.tls_cert, settings.tls_key)
            except (OSError, ValueError) as exc:
                raise SettingsError(f"tls_cert/tls_key: cannot load them: {exc}") from exc
        self.gateway = GatewayServer(
            target=self.target,
            hook=self.hook,
            host=settings.listen_host,
            port=settings.listen_port,
            tls_context=tls,
            max_message_size=settings.max_message_size,
        )
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        try:
            await self.gateway.start()
        except OSError as exc:
            raise SettingsError(f"listen: cannot listen on {self.settings.listen}: {exc}") from exc
        self.bus.publish(
            GatewayStarted(listen=self.gateway.address, upstream=self.target.describe())
        )

    async def stop(self) -> None:
        await self.gateway.stop()
        self.bus.publish(GatewayStopped(listen=self.gateway.address))
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
