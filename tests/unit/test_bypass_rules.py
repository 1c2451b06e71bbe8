"""Bypass detection's pure rules: which direct sessions count, and which are Backstop's own."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from backstop_core.policy import BypassSettings, parse_policy
from backstop_core.sidecar.bypass import (
    Backend,
    GatewayBackends,
    address_allowed,
    gateway_backends_of,
    judge,
)

DEFAULT = BypassSettings()

# (settings, role, application_name, client_addr, is a bypass)
CASES: list[tuple[BypassSettings, str, str, str | None, bool]] = [
    # The shipped default: every role's direct session counts, nobody is excused.
    (DEFAULT, "agent_role", "psql", "127.0.0.1", True),
    (DEFAULT, "postgres", "", None, True),
    # agent_roles narrows who is watched at all.
    (BypassSettings(agent_roles=("cursor_*",)), "cursor_agent", "", "10.0.0.5", True),
    (BypassSettings(agent_roles=("cursor_*",)), "dba", "", "10.0.0.5", False),
    (BypassSettings(agent_roles=()), "cursor_agent", "", "10.0.0.5", False),
    # Globs are case-sensitive, like role names.
    (BypassSettings(agent_roles=("cursor_*",)), "Cursor_agent", "", "10.0.0.5", False),
    (BypassSettings(allowed_roles=("dba",)), "DBA", "", "10.0.0.5", True),
    # Any one excuse is enough.
    (BypassSettings(allowed_roles=("dba", "repl*")), "replicator", "x", "10.0.0.5", False),
    (BypassSettings(allowed_applications=("pg_dump*",)), "agent", "pg_dumpall", None, False),
    (BypassSettings(allowed_applications=("pg_dump*",)), "agent", "psql", None, True),
    (BypassSettings(allowed_addresses=("10.0.5.0/24",)), "agent", "", "10.0.5.17", False),
    (BypassSettings(allowed_addresses=("10.0.5.0/24",)), "agent", "", "10.0.6.17", True),
    (BypassSettings(allowed_addresses=("10.0.5.7",)), "agent", "", "10.0.5.7", False),
    (BypassSettings(allowed_addresses=("10.0.5.7",)), "agent", "", "10.0.5.8", True),
    (BypassSettings(allowed_addresses=("fd00::/8",)), "agent", "", "fd00::1", False),
    # A Unix-socket session has no address: an address never excuses it.
    (BypassSettings(allowed_addresses=("0.0.0.0/0", "::/0")), "agent", "", None, True),
    # An IPv4 client seen through an IPv6 socket is still that IPv4 address.
    (BypassSettings(allowed_addresses=("10.0.5.0/24",)), "agent", "", "::ffff:10.0.5.3", False),
    # An excuse that does not apply leaves the session a bypass.
    (
        BypassSettings(
            allowed_roles=("dba",),
            allowed_applications=("etl",),
            allowed_addresses=("192.168.0.0/16",),
        ),
        "agent",
        "psql",
        "10.0.0.1",
        True,
    ),
]


@pytest.mark.parametrize(("settings", "role", "app", "addr", "bypass"), CASES)
def test_judge(
    settings: BypassSettings, role: str, app: str, addr: str | None, bypass: bool
) -> None:
    assert judge(settings, role, app, addr).bypass is bypass


def test_verdict_names_the_setting_that_decided() -> None:
    settings = BypassSettings(
        agent_roles=("agent*",),
        allowed_roles=("agent_dba",),
        allowed_applications=("etl-*",),
        allowed_addresses=("10.1.0.0/16",),
    )
    assert "allowed_roles 'agent_dba'" in judge(settings, "agent_dba", "", None).reason
    assert "allowed_applications 'etl-*'" in judge(settings, "agent", "etl-nightly", None).reason
    assert "allowed_addresses '10.1.0.0/16'" in judge(settings, "agent", "", "10.1.2.3").reason
    assert "agent_roles 'agent*'" in judge(settings, "agent", "psql", "10.2.0.1").reason
    assert "matches no bypass.agent_roles" in judge(settings, "web", "", None).reason


def test_judge_uses_the_settings_a_policy_file_gives() -> None:
    policy = parse_policy(
        """{"defaults": {"LOW": "allow", "MEDIUM": "allow", "HIGH": "approve",
                         "CRITICAL": "block"},
            "bypass": {"agent_roles": ["ai_*"], "allowed_addresses": ["10.9.0.0/16"]}}"""
    )
    assert judge(policy.bypass, "ai_cursor", "psql", "10.8.0.1").bypass
    assert not judge(policy.bypass, "ai_cursor", "psql", "10.9.0.1").bypass
    assert not judge(policy.bypass, "app", "psql", "10.8.0.1").bypass


def test_address_allowed_returns_the_matching_entry() -> None:
    allowed = ["10.0.0.0/8", "192.168.1.10", "2001:db8::/32"]
    assert address_allowed(allowed, "10.200.1.1") == "10.0.0.0/8"
    assert address_allowed(allowed, "192.168.1.10") == "192.168.1.10"
    assert address_allowed(allowed, "2001:db8::42") == "2001:db8::/32"
    assert address_allowed(allowed, "192.168.1.11") is None
    assert address_allowed(allowed, None) is None
    assert address_allowed(allowed, "not-an-address") is None


# (GatewayBackends, pid, client_addr, client_port, owned by the gateway)
OWNERSHIP: list[tuple[GatewayBackends, int, str | None, int | None, bool]] = [
    (GatewayBackends(pids=frozenset({101})), 101, "127.0.0.1", 50000, True),
    (GatewayBackends(pids=frozenset({101})), 102, "127.0.0.1", 50000, False),
    (GatewayBackends(addresses=frozenset({("127.0.0.1", 50000)})), 7, "127.0.0.1", 50000, True),
    # Same address, another port: another client on the gateway's host, not the gateway.
    (GatewayBackends(addresses=frozenset({("127.0.0.1", 50000)})), 7, "127.0.0.1", 50001, False),
    (GatewayBackends(addresses=frozenset({("127.0.0.1", 50000)})), 7, "127.0.0.2", 50000, False),
    (GatewayBackends(addresses=frozenset({("127.0.0.1", 50000)})), 7, None, None, False),
    # Spellings of one IPv6 address are one address.
    (GatewayBackends(addresses=frozenset({("0:0:0:0:0:0:0:1", 5)})), 7, "::1", 5, True),
    (GatewayBackends(addresses=frozenset({("::ffff:10.0.0.1", 5)})), 7, "10.0.0.1", 5, True),
    # A Unix socket name is no address: only the pid can identify such a backend.
    (GatewayBackends(addresses=frozenset({("/tmp/.s.PGSQL.5432", 0)})), 7, None, -1, False),
    (GatewayBackends(), 7, "127.0.0.1", 50000, False),
]


@pytest.mark.parametrize(("gateway", "pid", "addr", "port", "owned"), OWNERSHIP)
def test_gateway_owns_only_exact_pid_or_socket_matches(
    gateway: GatewayBackends, pid: int, addr: str | None, port: int | None, owned: bool
) -> None:
    assert gateway.owns(pid, addr, port) is owned


def _fake_session(pid: int | None, sockname: Any) -> Any:
    extra = {"sockname": sockname}
    transport = SimpleNamespace(get_extra_info=extra.get)
    return SimpleNamespace(backend_pid=pid, upstream=SimpleNamespace(transport=transport))


def test_gateway_backends_of_reads_pids_and_upstream_sockets() -> None:
    sessions = [
        _fake_session(11, ("127.0.0.1", 40001)),
        _fake_session(None, ("::1", 40002, 0, 0)),  # still authenticating: no pid yet
        _fake_session(13, "/run/postgresql/.s.PGSQL.5432"),  # Unix socket: pid only
        SimpleNamespace(backend_pid=None, upstream=None),  # upstream not connected yet
    ]
    found = gateway_backends_of(sessions, extra_pids=[99])
    assert found.pids == {11, 13, 99}
    assert found.addresses == {("127.0.0.1", 40001), ("::1", 40002)}
    assert found.owns(500, "::1", 40002)


def _backend(**overrides: Any) -> Backend:
    values: dict[str, Any] = {
        "pid": 4242,
        "database": "shop",
        "role": "agent_role",
        "application_name": "psql",
        "client_addr": "127.0.0.1",
        "client_port": 51234,
        "backend_start": datetime(2025, 1, 2, 10, 0, 0, 123456, tzinfo=UTC),
        "xact_start": None,
        "query_start": None,
        "state": "idle",
        "query": "SELECT 1",
        "backend_type": "client backend",
    }
    values.update(overrides)
    return Backend(**values)


def test_backend_key_names_pid_and_start_so_a_reused_pid_is_a_new_alert() -> None:
    first = _backend()
    again = _backend(state="active", query="SELECT 2")
    reused = _backend(backend_start=datetime(2025, 1, 2, 11, 0, tzinfo=UTC))
    assert first.key == "4242:2025-01-02 10:00:00.123456+00:00"
    assert again.key == first.key
    assert reused.key != first.key


def test_backend_details_truncate_long_queries() -> None:
    details = _backend(query="SELECT " + "x, " * 400 + "1").details()
    assert len(details["query"]) == 501 and details["query"].endswith("…")
    assert details["query_truncated"] is True
    short = _backend().details()
    assert short["query"] == "SELECT 1" and short["query_truncated"] is False
    assert short["client_port"] == 51234 and short["backend_start"].startswith("2025-01-02T10")


def test_backend_client_describes_sockets() -> None:
    assert _backend().client == "127.0.0.1:51234"
    assert _backend(client_addr="::1", client_port=5).client == "[::1]:5"
    assert _backend(client_addr=None, client_port=-1).client == "a local socket"
