"""`backstop` as an operator runs it: classify, policy check, audit, and settings errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from backstop_core.store import AuditStart, Store
from tests.conftest import AGENT_ROLE, PgServer
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import (
    REPO,
    audit_where,
    backstop_cli,
    policy_file,
    unique,
    upstream,
)

pytestmark = pytest.mark.integration

CLASSIFICATION_KEYS = {
    "operation",
    "category",
    "tables",
    "has_where",
    "unbounded",
    "table_destructive",
    "risk",
    "reasons",
}


# ------------------------------------------------------------------ classify


def test_classify_json_shape() -> None:
    result = backstop_cli("classify", "--json", "DELETE FROM t")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"risk", "statements"}
    (statement,) = data["statements"]
    assert set(statement) == CLASSIFICATION_KEYS
    assert statement["operation"] == "DELETE"
    assert statement["category"] == "WRITE"
    assert statement["tables"] == ["public.t"]
    assert (statement["has_where"], statement["unbounded"], statement["table_destructive"]) == (
        False,
        True,
        True,
    )
    assert statement["risk"] == data["risk"] == "CRITICAL"
    assert statement["reasons"] and all(isinstance(r, str) for r in statement["reasons"])


def test_classify_reads_standard_input() -> None:
    result = backstop_cli("classify", "--json", stdin="UPDATE orders SET paid = true WHERE id = 7")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (statement,) = data["statements"]
    assert (statement["operation"], statement["has_where"], statement["unbounded"]) == (
        "UPDATE",
        True,
        False,
    )
    assert statement["tables"] == ["public.orders"]


def test_classify_several_statements_shows_each_and_the_worst() -> None:
    sql = "SELECT * FROM a; DELETE FROM b WHERE id = 1; DROP TABLE c"
    text = backstop_cli("classify", sql)
    assert text.returncode == 0, text.stderr
    numbered = [line for line in text.stdout.splitlines() if line[:1].isdigit()]
    assert [line.split()[1] for line in numbered] == ["SELECT", "DELETE", "DROP_TABLE"]
    assert "tables: public.c" in numbered[2]
    assert text.stdout.splitlines()[-1] == "Overall risk: CRITICAL"
    data = json.loads(backstop_cli("classify", "--json", sql).stdout)
    risks = [s["risk"] for s in data["statements"]]
    assert risks[0] == "LOW" and risks[2] == "CRITICAL"
    assert data["risk"] == "CRITICAL"


def test_classify_the_lexer_payload() -> None:
    result = backstop_cli("classify", "--json", stdin="SELECT 'a\\', $$'; DROP TABLE users; --$$")
    data = json.loads(result.stdout)
    assert [s["operation"] for s in data["statements"]] == ["SELECT"]
    unsafe = json.loads(
        backstop_cli("classify", "--json", "SET standard_conforming_strings = off").stdout
    )
    assert unsafe["risk"] == "CRITICAL"
    assert any("standard_conforming_strings" in r for r in unsafe["statements"][0]["reasons"])


# ------------------------------------------------------------------ policy check


def test_policy_check_explains_a_valid_file(tmp_path: Path) -> None:
    shipped = REPO / "policy.json"
    result = backstop_cli("policy", "check", str(shipped), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    version = hashlib.sha256(shipped.read_bytes()).hexdigest()[:12]
    assert f"valid (version {version})" in result.stdout
    for words in ("no-drop-schema", "snapshot-before-destroying-a-table", "lexer-safety"):
        assert words in result.stdout
    assert "user cursor_agent -> cursor" in result.stdout


def test_policy_check_lists_every_problem_with_its_json_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "defaults": {"LOW": "allow", "MEDIUM": "allow", "CRITICAL": "block"},
                "rules": [
                    {"name": "r", "match": {"tabels": "x"}, "action": "delete"},
                ],
            }
        )
    )
    result = backstop_cli("policy", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "defaults.HIGH: missing (required)" in result.stderr
    assert "rules[0].action: 'delete' is not one of" in result.stderr
    assert "rules[0].match.tabels: unknown key" in result.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"defaults": {\n  "LOW": allow}}')
    result = backstop_cli("policy", "check", str(broken), cwd=tmp_path)
    assert result.returncode == 1
    assert "line 2" in result.stderr and "not valid JSON" in result.stderr


# ------------------------------------------------------------------ audit


@pytest.fixture
def busy_state(
    pg: PgServer, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> tuple[Path, str]:
    """A state directory holding the audit of two agents' statements, some refused."""
    table = unique("cli")
    upstream(
        pg,
        f"CREATE TABLE {table} (id int PRIMARY KEY); INSERT INTO {table} VALUES (1), (2);"
        f"GRANT ALL ON {table} TO {AGENT_ROLE.name}",
    )
    rules = [{"name": "keep-rows", "match": {"operation": "DELETE"}, "action": "block"}]
    agents = [{"match": {"user": AGENT_ROLE.name}, "agent": "robot"}]
    state = tmp_path / "state"
    gateway = gateway_factory(policy=policy_file(tmp_path, rules, agents=agents), state_dir=state)
    with psycopg.connect(gateway.dsn(user=AGENT_ROLE.name), autocommit=True) as robot:
        robot.execute(f"SELECT * FROM {table}")
        robot.execute(f"INSERT INTO {table} VALUES (3)")
        for sql in (f"DELETE FROM {table} WHERE id = 1", f"DELETE FROM {table}"):
            with pytest.raises(errors.InsufficientPrivilege):
                robot.execute(sql)
    with psycopg.connect(gateway.dsn(), autocommit=True) as admin:
        admin.execute(f"UPDATE {table} SET id = 4 WHERE id = 3")
        with pytest.raises(errors.InsufficientPrivilege):
            admin.execute(f"DELETE FROM {table} WHERE id = 2")
    rows = audit_where(gateway, lambda r: True)
    assert len(rows) == 6
    upstream(pg, f"DROP TABLE {table}")
    return state, table


def cli_audit(state: Path, *args: str) -> list[dict[str, Any]]:
    result = backstop_cli("audit", "--json", "--state-dir", str(state), *args)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_audit_filters(busy_state: tuple[Path, str]) -> None:
    state, table = busy_state
    everything = cli_audit(state)
    assert len(everything) == 6
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)

    newest = cli_audit(state, "--limit", "2")
    assert [e["id"] for e in newest] == [e["id"] for e in everything[:2]]

    robot = cli_audit(state, "--agent", "robot")
    assert len(robot) == 4 and {e["agent"] for e in robot} == {"robot"}

    critical = cli_audit(state, "--risk", "critical")
    assert [e["sql"] for e in critical] == [f"DELETE FROM {table}"]
    assert [e["sql"] for e in cli_audit(state, "--risk", "LOW")] == [f"SELECT * FROM {table}"]

    blocked = cli_audit(state, "--decision", "block")
    assert len(blocked) == 3
    assert {(e["rule"], e["outcome"]) for e in blocked} == {("keep-rows", "blocked")}

    both = cli_audit(state, "--agent", "robot", "--decision", "allow", "--limit", "1")
    assert len(both) == 1 and str(both[0]["sql"]).startswith("INSERT INTO")
    assert cli_audit(state, "--agent", "nobody") == []


def test_audit_prune_deletes_old_events_while_the_gateway_records_new_ones(
    pg: PgServer, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    table = unique("prune")
    upstream(pg, f"CREATE TABLE {table} (id int); GRANT ALL ON {table} TO {AGENT_ROLE.name}")
    agents = [{"match": {"user": AGENT_ROLE.name}, "agent": "robot"}]
    state = tmp_path / "state"
    gateway = gateway_factory(policy=policy_file(tmp_path, [], agents=agents), state_dir=state)
    with psycopg.connect(gateway.dsn(user=AGENT_ROLE.name), autocommit=True) as robot:
        for i in range(3):
            robot.execute(f"INSERT INTO {table} VALUES ({i})")
        where = ("--state-dir", str(state))

        recent = backstop_cli("audit", "prune", "--before", "1d", "--dry-run", *where)
        assert recent.returncode == 0, recent.stderr
        assert recent.stdout.startswith("Would delete 0 audit events recorded before ")
        counted = backstop_cli("audit", "prune", "--before", "0s", "--dry-run", "--json", *where)
        assert json.loads(counted.stdout)["events"] == 3
        assert len(cli_audit(state)) == 3

        pruned = backstop_cli("audit", "prune", "--before", "0s", *where)
        assert pruned.returncode == 0, pruned.stderr
        assert pruned.stdout.startswith("Deleted 3 audit events recorded before ")
        assert cli_audit(state) == []

        # The session goes on, and its next statement is on the record whole.
        robot.execute(f"SELECT count(*) FROM {table}")
    (after,) = cli_audit(state)
    assert (after["agent"], after["decision"], after["sql"]) == (
        "robot",
        "allow",
        f"SELECT count(*) FROM {table}",
    )
    upstream(pg, f"DROP TABLE {table}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune"], "backstop audit prune needs --before"),
        (["prune", "--before", "2999-01-01"], "is in the future"),
        (["prune", "--before", "soon"], "give an age such as 90d"),
        (["prune", "--before=-3d"], "give an age such as 90d"),
        (["prune", "--before", "1e20d"], "reaches back before the year 1"),
        (["--before", "1d"], "--before and --dry-run go with `backstop audit prune`"),
    ],
)
def test_audit_prune_refuses_what_it_cannot_mean(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = backstop_cli("audit", *args, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "backstop.db").exists()  # refused before touching the state


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--listen", "nonsense"], "listen:"),
        (["--listen", "127.0.0.1:99999"], "listen:"),
        (["--upstream", "mysql://x"], "upstream:"),
        (["--upstream-sslmode", "maybe"], "upstream_sslmode:"),
        (["--max-message-size", "lots"], "max_message_size (--max-message-size)"),
        (["--config", "missing.toml"], "config:"),
        (["--policy", "missing.json"], "policy:"),
        (["--store", "ftp://x"], "store:"),
    ],
)
def test_a_wrong_setting_exits_2_naming_it(tmp_path: Path, args: list[str], setting: str) -> None:
    result = backstop_cli("audit", "--state-dir", str(tmp_path / "s"), *args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"backstop: {setting}"), result.stderr
    assert result.stdout == ""


def test_unknown_key_in_the_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "backstop.toml"
    config.write_text('[backstop]\nlisten = "127.0.0.1:7000"\ncolour = "blue"\n')
    result = backstop_cli("audit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "config: unknown setting 'colour'" in result.stderr
    config.write_text('state_dir = ["a", "b"]\n')
    result = backstop_cli("audit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "state_dir" in result.stderr and "expected a string" in result.stderr


def test_gateway_refuses_a_wrong_setting_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "backstop_tui.main",
            "--no-ui",
            "--upstream",
            "postgresql://127.0.0.1:1/x",
            "--listen",
            "nonsense",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "backstop-tui: listen:" in result.stderr


async def _one_record(state: Path, marker: str) -> None:
    store = await Store.open(state)
    try:
        key = store.audit_begin(
            AuditStart(
                session_id="s",
                agent="operator",
                client="127.0.0.1:1",
                sql=f"SELECT '{marker}'",
                operation="SELECT",
                risk="LOW",
                tables=(),
                classification_json="[]",
                decision="allow",
                rule="default:LOW",
                reason="",
            )
        )
        store.audit_finish(key, "forwarded", 1.0)
    finally:
        await store.close()


def test_env_overrides_the_config_file_and_flags_override_env(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("from-file", "from-env", "from-flag")}
    for name, path in dirs.items():
        asyncio.run(_one_record(path, name))
    config = tmp_path / "backstop.toml"
    config.write_text(f'[backstop]\nstate_dir = "{dirs["from-file"]}"\n')

    def marker(*args: str, env: dict[str, str] | None = None) -> str:
        result = backstop_cli("audit", "--json", *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        (record,) = json.loads(result.stdout)
        return str(record["sql"]).split("'")[1]

    assert marker("--config", str(config)) == "from-file"
    assert marker(env={"BACKSTOP_CONFIG": str(config)}) == "from-file"
    env = {"BACKSTOP_STATE_DIR": str(dirs["from-env"])}
    assert marker("--config", str(config), env=env) == "from-env"
    flag = ("--state-dir", str(dirs["from-flag"]))
    assert marker("--config", str(config), *flag, env=env) == "from-flag"


def test_config_file_keys_outside_the_backstop_table_are_not_lost(tmp_path: Path) -> None:
    state = tmp_path / "chosen"
    asyncio.run(_one_record(state, "chosen"))
    config = tmp_path / "backstop.toml"
    config.write_text(f'state_dir = "{state}"\n\n[backstop]\nlisten = "127.0.0.1:7000"\n')
    result = backstop_cli("audit", "--json", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 or "chosen" in result.stdout, result.stdout
