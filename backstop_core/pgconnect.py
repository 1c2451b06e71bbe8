"""Backstop's own connections to PostgreSQL (snapshots, restores, drills).

Each is registered by backend pid while it is open, so the bypass monitor of this process
knows them as Backstop's own: the pid is what counts, never the application_name.
"""

from __future__ import annotations

from typing import Any

import asyncpg

_OWN_PIDS: set[int] = set()


async def connect(dsn: str, *, purpose: str = "sidecar", **kwargs: Any) -> asyncpg.Connection:
    settings = dict(kwargs.pop("server_settings", None) or {})
    settings.setdefault("application_name", f"backstop-{purpose}")
    conn = await asyncpg.connect(dsn, server_settings=settings, **kwargs)
    pid = int(conn.get_server_pid())
    _OWN_PIDS.add(pid)
    conn.add_termination_listener(lambda _conn: _OWN_PIDS.discard(pid))
    return conn


def own_pids() -> frozenset[int]:
    return frozenset(_OWN_PIDS)
