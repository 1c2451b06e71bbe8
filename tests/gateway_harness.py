"""A real Backstop runtime on a background thread, for tests that drive it with real clients.

Clients (psql, pgbench, psycopg, asyncpg) then talk to it exactly as they would to a
deployed gateway, while the test keeps a handle on the runtime's state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from backstop_core.config import Settings
from backstop_core.events import Event
from backstop_core.runtime import Runtime

T = TypeVar("T")


class GatewayThread:
    def __init__(self, settings: Settings, *, pass_through: bool = False) -> None:
        self.settings = replace(settings, listen="127.0.0.1:0")
        self.pass_through = pass_through
        self.loop = asyncio.new_event_loop()
        self.runtime: Runtime | None = None
        self.events: list[Event] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> GatewayThread:
        self._thread.start()

        async def boot() -> Runtime:
            runtime = Runtime(self.settings, pass_through=self.pass_through)
            runtime.bus.subscribe(self.events.append)
            await runtime.start()
            return runtime

        self.runtime = self.call(boot())
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call_soon(self, fn: Callable[[], T], timeout: float = 10) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    @property
    def port(self) -> int:
        assert self.runtime is not None and self.runtime.gateway is not None
        return self.runtime.gateway.port

    def dsn(
        self,
        user: str = "postgres",
        password: str | None = None,
        database: str = "postgres",
        **params: str,
    ) -> str:
        auth = quote(user) + (f":{quote(password)}" if password else "")
        query = {"sslmode": "disable", **params}
        tail = "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(database)}?{tail}"

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.runtime is not None:
            self.call(self.runtime.stop())
            self.runtime = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def settings_for(upstream: str, state_dir: Path, **overrides: Any) -> Settings:
    return Settings(upstream=upstream, state_dir=state_dir, **overrides)
