from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backstop_core.classify import Category, Classification, Risk
from backstop_core.policy import (
    Action,
    Policy,
    PolicyError,
    PolicyWatcher,
    default_policy,
    evaluate,
    explain,
    load_policy,
    parse_policy,
    resolve_agent,
)

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy.json"

ALL_ALLOW = {"LOW": "allow", "MEDIUM": "allow", "HIGH": "allow", "CRITICAL": "allow"}


def make_doc(**extra: Any) -> dict[str, Any]:
    return {"defaults": dict(ALL_ALLOW), **extra}


def make_policy(rules: list[dict[str, Any]] | None = None, **extra: Any) -> Policy:
    return parse_policy(json.dumps(make_doc(rules=rules or [], **extra)))


def rule(name: str, action: str, reason: str | None = None, **match: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "match": match, "action": action}
    if reason:
        entry["reason"] = reason
    return entry


def stmt(
    operation: str = "SELECT",
    *tables: str,
    category: Category = Category.READ,
    risk: Risk = Risk.LOW,
    **kwargs: Any,
) -> Classification:
    return Classification(
        sql=f"-- {operation}",
        operation=operation,
        category=category,
        tables=tables,
        risk=risk,
        **kwargs,
    )


def delete(*tables: str, **kwargs: Any) -> Classification:
    kwargs.setdefault("risk", Risk.MEDIUM)
    kwargs.setdefault("has_where", True)
    return stmt("DELETE", *tables, category=Category.WRITE, **kwargs)


def shipped_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REPO_POLICY.read_text())
    return doc


def problems_for(doc: dict[str, Any] | str) -> list[str]:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value.problems


# --- validation ----------------------------------------------------------------------------


def test_wrong_action_names_the_rule_and_the_choices() -> None:
    doc = shipped_doc()
    doc["rules"][2]["action"] = "delete"
    assert problems_for(doc) == [
        "rules[2].action: 'delete' is not one of allow, require_snapshot, approve,"
        " approve_with_snapshot, block"
    ]


def test_misspelt_match_key_is_an_unknown_key_not_a_rule_that_matches_everything() -> None:
    doc = shipped_doc()
    doc["rules"][0]["match"]["tabels"] = "public.orders"
    [problem] = problems_for(doc)
    assert problem.startswith("rules[0].match.tabels: unknown key")
    assert "tables" in problem


def test_unknown_top_level_key_is_rejected() -> None:
    doc = shipped_doc()
    doc["snapshots"] = {}
    [problem] = problems_for(doc)
    assert problem.startswith("snapshots: unknown key")


def test_wrong_type_says_what_was_expected_and_what_was_found() -> None:
    doc = shipped_doc()
    doc["approval"]["timeout_seconds"] = "300"
    assert problems_for(doc) == ["approval.timeout_seconds: expected an integer, got string '300'"]


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        (5, "rules[0].match.tables: expected a string or a list, got number 5"),
        (["public.a", 1], "rules[0].match.tables[1]: expected a string, got number 1"),
        ({"glob": "a"}, "rules[0].match.tables: expected a string or a list, got an object"),
        ([], "rules[0].match.tables: must not be empty"),
    ],
)
def test_bad_glob_types_name_the_path(tables: Any, expected: str) -> None:
    doc = make_doc(rules=[rule("r", "block", tables="x")])
    doc["rules"][0]["match"]["tables"] = tables
    assert problems_for(doc) == [expected]


def test_every_problem_is_reported_at_once() -> None:
    doc = shipped_doc()
    doc["rules"][0]["action"] = "nope"
    doc["rules"][1]["match"]["category"] = ["READ", "WRTIE"]
    del doc["defaults"]["HIGH"]
    problems = problems_for(doc)
    assert "defaults.HIGH: missing (required)" in problems
    assert any(p.startswith("rules[0].action: 'nope'") for p in problems)
    assert any(p.startswith("rules[1].match.category[1]: 'WRTIE' is not one of") for p in problems)


def test_duplicate_rule_names_are_rejected() -> None:
    doc = make_doc(rules=[rule("same", "block", operation="DROP_TABLE"), rule("same", "allow")])
    assert problems_for(doc) == ["rules[1].name: 'same' is already used by rules[0]"]


def test_a_key_given_twice_is_rejected_rather_than_silently_overridden() -> None:
    text = '{"defaults": {"LOW": "allow", "MEDIUM": "allow", "HIGH": "block", "HIGH": "allow",'
    text += ' "CRITICAL": "block"}}'
    assert problems_for(text) == ["key 'HIGH' appears twice in the same object"]


def test_invalid_json_reports_line_and_column() -> None:
    [problem] = problems_for('{\n  "defaults": {,\n}')
    assert problem.startswith("line 2, column 16: not valid JSON")


def test_bypass_addresses_must_be_addresses() -> None:
    doc = make_doc(bypass={"allowed_addresses": ["10.0.0.0/8", "gateway"]})
    assert problems_for(doc) == [
        "bypass.allowed_addresses[1]: 'gateway' is not an IP address or CIDR network"
    ]


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"defaults": {}}')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid policy (4 problems)")
    assert "defaults.LOW: missing (required)" in message


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the file"):
        load_policy(tmp_path / "absent.json")


# --- the shipped policy --------------------------------------------------------------------


def test_shipped_policy_json_is_the_default_policy() -> None:
    shipped = load_policy(REPO_POLICY)
    assert shipped == default_policy()
    # Same bytes, same version: an audit entry names the same policy either way.
    assert shipped.version == default_policy().version


def test_shipped_policy_settings() -> None:
    policy = default_policy()
    assert dict(policy.defaults) == {
        Risk.LOW: Action.ALLOW,
        Risk.MEDIUM: Action.ALLOW,
        Risk.HIGH: Action.APPROVE,
        Risk.CRITICAL: Action.APPROVE_WITH_SNAPSHOT,
    }
    assert policy.approval.timeout_seconds == 300
    assert (policy.snapshot.max_age_seconds, policy.snapshot.on_demand) == (3600, True)
    protection = policy.protection_for("public.orders")
    assert protection is not None
    assert (protection.interval_seconds, protection.retention_count) == (3600, 24)
    assert policy.protection_for("audit.log") is None
    assert (policy.bypass.enabled, policy.bypass.interval_seconds) == (True, 5)
    assert policy.audit.redact_literals is False
    assert policy.estimate.timeout_ms == 200


@pytest.mark.parametrize(
    ("operation", "rule_name"),
    [
        ("DROP_DATABASE", "no-drop-database"),
        ("DROP_SCHEMA", "no-drop-schema"),
        ("ALTER_SYSTEM", "no-alter-system"),
    ],
)
def test_shipped_policy_blocks_what_no_snapshot_can_undo(operation: str, rule_name: str) -> None:
    decision = evaluate(
        default_policy(), [stmt(operation, category=Category.DDL, risk=Risk.CRITICAL)], "a"
    )
    assert decision.action is Action.BLOCK
    assert decision.rule == rule_name
    assert operation.replace("_", " ") in decision.reason


def test_shipped_policy_snapshots_and_approves_before_a_table_is_destroyed() -> None:
    truncate = stmt(
        "TRUNCATE", "public.orders", category=Category.WRITE, risk=Risk.HIGH,
        table_destructive=True,
    )  # fmt: skip
    decision = evaluate(default_policy(), [truncate], "cursor")
    assert decision.action is Action.APPROVE_WITH_SNAPSHOT
    assert decision.rule == "snapshot-before-destroying-a-table"
    assert decision.needs_snapshot_tables == ("public.orders",)


def test_shipped_policy_lets_reads_and_small_writes_through() -> None:
    policy = default_policy()
    assert evaluate(policy, [stmt("SELECT", "public.orders")], "a").action is Action.ALLOW
    small = delete("public.orders", row_estimate=12)
    assert evaluate(policy, [small], "a").action is Action.ALLOW


def test_explain_lists_rules_defaults_and_settings() -> None:
    text = explain(default_policy())
    assert text.startswith(f"Policy {default_policy().version}")
    assert "no-drop-database" in text and "when operation DROP_DATABASE" in text
    assert "approve-large-writes" in text and "more than 10,000 rows" in text
    assert "CRITICAL  approve_with_snapshot" in text
    assert "time out after 300 s" in text
    assert "public.*: every 3600 s, keep 24" in text


def test_drills_default_to_daily_and_zero_turns_them_off() -> None:
    assert default_policy().drills.interval_seconds == 86400
    assert make_policy().drills.interval_seconds == 86400  # no "drills" section
    hourly = make_policy(drills={"interval_seconds": 3600})
    assert (hourly.drills.interval_seconds, hourly.drills.enabled) == (3600, True)
    off = make_policy(drills={"interval_seconds": 0})
    assert (off.drills.interval_seconds, off.drills.enabled) == (0, False)
    assert "Restore drills: every 86400 s" in explain(default_policy())
    assert "Restore drills: off." in explain(off)


@pytest.mark.parametrize(
    ("drills", "expected"),
    [
        ({"interval_seconds": -1}, "drills.interval_seconds: -1 is below the minimum of 0"),
        (
            {"interval_seconds": "daily"},
            "drills.interval_seconds: expected an integer, got string 'daily'",
        ),
        ({"interval_seconds": 1.5}, "drills.interval_seconds: expected an integer, got number 1.5"),
        ({"interval_seconds": None}, "drills.interval_seconds: expected an integer, got null"),
        ({"every": 60}, "drills.every: unknown key (expected one of interval_seconds)"),
        (True, "drills: expected an object, got true"),
    ],
)
def test_bad_drill_settings_say_what_is_wrong(drills: Any, expected: str) -> None:
    assert problems_for(make_doc(drills=drills)) == [expected]


# --- evaluation ----------------------------------------------------------------------------


def test_risk_defaults_decide_when_no_rule_matches() -> None:
    policy = default_policy()
    for risk, action in [
        (Risk.LOW, Action.ALLOW),
        (Risk.MEDIUM, Action.ALLOW),
        (Risk.HIGH, Action.APPROVE),
        (Risk.CRITICAL, Action.APPROVE_WITH_SNAPSHOT),
    ]:
        decision = evaluate(policy, [stmt("CALL", "public.jobs", risk=risk)], "a")
        assert (decision.action, decision.rule) == (action, f"default:{risk.name}")


def test_the_strictest_matching_rule_wins_whatever_its_position() -> None:
    policy = make_policy(
        [
            rule("loose", "allow", operation="DELETE"),
            rule("strict", "block", tables="public.orders"),
            rule("middle", "approve", category="WRITE"),
        ]
    )
    decision = evaluate(policy, [delete("public.orders")], "a")
    assert (decision.action, decision.rule) == (Action.BLOCK, "strict")


def test_a_rule_cannot_loosen_the_risk_default() -> None:
    policy = parse_policy(
        json.dumps(
            {
                "defaults": {**ALL_ALLOW, "HIGH": "approve"},
                "rules": [rule("trust-deletes", "allow", operation="DELETE")],
            }
        )
    )
    decision = evaluate(policy, [delete("public.orders", risk=Risk.HIGH)], "a")
    assert (decision.action, decision.rule) == (Action.APPROVE, "default:HIGH")


def test_approval_and_snapshot_from_different_rules_add_up() -> None:
    policy = make_policy(
        [
            rule("approve-deletes", "approve", operation="DELETE"),
            rule("snapshot-orders", "require_snapshot", tables="public.orders"),
        ]
    )
    decision = evaluate(policy, [delete("public.orders")], "a")
    assert decision.action is Action.APPROVE_WITH_SNAPSHOT
    assert decision.needs_snapshot_tables == ("public.orders",)
    assert "'approve-deletes'" in decision.reason and "'snapshot-orders'" in decision.reason


def test_the_strictest_statement_decides_a_multi_statement_query() -> None:
    policy = make_policy([rule("approve-deletes", "approve", operation="DELETE")])
    statements = [stmt("SELECT", "public.a"), delete("public.b"), stmt("SELECT", "public.c")]
    decision = evaluate(policy, statements, "a")
    assert (decision.action, decision.rule) == (Action.APPROVE, "approve-deletes")
    assert "statement 2 of 3" in decision.reason


def test_a_block_anywhere_blocks_the_whole_query() -> None:
    policy = make_policy(
        [
            rule("snap", "approve_with_snapshot", table_destructive=True),
            rule("no-drop-schema", "block", operation="DROP_SCHEMA"),
        ]
    )
    statements = [
        stmt("TRUNCATE", "public.a", category=Category.WRITE, table_destructive=True),
        stmt("DROP_SCHEMA", category=Category.DDL),
        stmt("SELECT", "public.b"),
    ]
    decision = evaluate(policy, statements, "a")
    assert (decision.action, decision.rule) == (Action.BLOCK, "no-drop-schema")
    assert decision.needs_snapshot_tables == ()


def test_snapshot_tables_come_from_the_statements_that_need_them() -> None:
    policy = make_policy([rule("snap", "require_snapshot", table_destructive=True)])
    statements = [
        stmt("SELECT", "public.reports"),
        stmt("TRUNCATE", "public.a", "public.b", category=Category.WRITE, table_destructive=True),
        stmt("DROP_TABLE", "public.c", category=Category.DDL, table_destructive=True),
    ]
    decision = evaluate(policy, statements, "a")
    assert decision.action is Action.REQUIRE_SNAPSHOT
    assert decision.needs_snapshot_tables == ("public.a", "public.b", "public.c")


@pytest.mark.parametrize(
    ("glob", "table", "matches"),
    [
        ("public.orders", "public.orders", True),
        ("public.*", "public.orders", True),
        ("orders", "sales.orders", True),  # a bare name matches in any schema
        ("billing.*", "public.orders", False),
        ("public.orders", "orders", True),  # unqualified: could be public.orders
        ("public.ORDERS", "public.orders", True),
        ("public.order_?", "public.order_1", True),
        ("public.orders", "public.orders_archive", False),
    ],
)
def test_table_globs(glob: str, table: str, matches: bool) -> None:
    policy = make_policy([rule("guard", "block", tables=[glob])])
    decision = evaluate(policy, [delete(table)], "a")
    assert (decision.action is Action.BLOCK) is matches


def test_a_rule_matches_if_any_target_table_matches() -> None:
    policy = make_policy([rule("guard", "block", tables="billing.*")])
    statement = stmt("SELECT", "public.users", "billing.invoices")
    assert evaluate(policy, [statement], "a").action is Action.BLOCK


def test_agent_globs() -> None:
    policy = make_policy([rule("cursor-off-billing", "block", agent="cursor*", tables="billing.*")])
    statement = delete("billing.invoices")
    assert evaluate(policy, [statement], "cursor/ide").action is Action.BLOCK
    assert evaluate(policy, [statement], "reporting").action is Action.ALLOW


def test_all_match_keys_must_match() -> None:
    policy = make_policy(
        [
            rule(
                "big-unbounded",
                "block",
                operation=["DELETE", "UPDATE"],
                unbounded=True,
                risk="HIGH",
            )
        ]
    )
    assert evaluate(policy, [delete("t", unbounded=True, risk=Risk.HIGH)], "a").action is (
        Action.BLOCK
    )
    assert evaluate(policy, [delete("t", unbounded=True, risk=Risk.MEDIUM)], "a").action is (
        Action.ALLOW
    )
    assert evaluate(policy, [delete("t", risk=Risk.CRITICAL)], "a").action is Action.ALLOW


def test_operation_names_may_be_written_as_sql() -> None:
    policy = make_policy([rule("no-drop", "block", operation="drop table")])
    drop = stmt("DROP_TABLE", "public.t", category=Category.DDL)
    assert evaluate(policy, [drop], "a").action is Action.BLOCK


def test_rows_over_with_a_known_estimate() -> None:
    policy = make_policy([rule("big-deletes", "approve", operation="DELETE", rows_over=1000)])
    assert evaluate(policy, [delete("t", row_estimate=1001)], "a").action is Action.APPROVE
    assert evaluate(policy, [delete("t", row_estimate=1000)], "a").action is Action.ALLOW
    # No estimate, but the whole table is this small: the count is known.
    assert evaluate(policy, [delete("t", table_rows=5000)], "a").action is Action.APPROVE


def test_rows_over_with_an_unknown_estimate_does_not_match_but_says_so() -> None:
    policy = make_policy([rule("big-deletes", "approve", operation="DELETE", rows_over=1000)])
    decision = evaluate(policy, [delete("public.orders")], "a")
    assert decision.action is Action.ALLOW
    assert "'big-deletes'" in decision.reason and "no row estimate" in decision.reason


def test_lexer_unsafe_statements_are_blocked_whatever_the_policy() -> None:
    policy = make_policy([rule("anything-goes", "allow")])
    statement = stmt("SET", category=Category.ADMIN, lexer_unsafe=True)
    decision = evaluate(policy, [stmt("SELECT", "public.a"), statement], "a")
    assert (decision.action, decision.rule) == (Action.BLOCK, "lexer-safety")
    assert "standard_conforming_strings" in decision.reason


def test_block_reason_tells_the_agent_what_and_how_to_proceed() -> None:
    policy = make_policy([rule("no-unbounded-delete", "block", operation="DELETE", unbounded=True)])
    decision = evaluate(policy, [delete("public.orders", has_where=False, unbounded=True)], "a")
    assert decision.reason == (
        "backstop: DELETE on public.orders without a WHERE clause is blocked by rule"
        " 'no-unbounded-delete'. Add a WHERE clause that selects only the rows to delete,"
        " or ask an operator."
    )


def test_reason_carries_the_operators_text_and_the_approval_timeout() -> None:
    policy = make_policy(
        [rule("approve-orders", "approve", "Orders feed billing.", tables="public.orders")],
        approval={"timeout_seconds": 120},
    )
    decision = evaluate(policy, [delete("public.orders", row_estimate=40)], "a")
    assert decision.reason == (
        "backstop: DELETE on public.orders (about 40 rows) needs an operator's approval under"
        " rule 'approve-orders'. Orders feed billing. It waits until an operator approves or"
        " denies it (at most 120 s)."
    )


def test_allow_reason_names_the_default() -> None:
    decision = evaluate(default_policy(), [stmt("SELECT", "public.orders")], "a")
    assert decision.reason == (
        "backstop: SELECT on public.orders is allowed by the default for LOW risk."
    )


# --- agents --------------------------------------------------------------------------------


def test_resolve_agent_first_match_wins_and_falls_back_to_user_and_application() -> None:
    policy = make_policy(
        agents=[
            {"match": {"user": "svc_*", "application_name": "Cursor*"}, "agent": "cursor"},
            {"match": {"user": "svc_*"}, "agent": "service"},
        ]
    )
    assert resolve_agent(policy, "svc_ai", "Cursor 1.2") == "cursor"
    assert resolve_agent(policy, "svc_ai", "psql") == "service"
    assert resolve_agent(policy, "alice", "psql") == "alice/psql"
    assert resolve_agent(policy, "alice", "") == "alice"
    # Role names are case-sensitive in PostgreSQL, so the mapping is too.
    assert resolve_agent(policy, "SVC_ai", "") == "SVC_ai"


# --- hot reload ----------------------------------------------------------------------------


async def _until(
    condition: Callable[[], object], write: Callable[[], object], seconds: float = 10.0
) -> None:
    """Write, then wait for `condition`; rewrite while waiting, in case the watch was not
    yet in place when the first write landed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "the watcher did not react in time"
        write()
        for _ in range(10):
            await asyncio.sleep(0.1)
            if condition():
                return


def _policy_text(high: str) -> str:
    return json.dumps({"defaults": {**ALL_ALLOW, "HIGH": high}})


async def test_watcher_applies_a_valid_change(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(_policy_text("allow"))
    changes: list[Policy] = []
    errors: list[str] = []
    watcher = PolicyWatcher(path, changes.append, errors.append)
    task = asyncio.create_task(watcher.run())
    try:
        await _until(lambda: changes, lambda: path.write_text(_policy_text("block")))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert changes[-1].defaults[Risk.HIGH] is Action.BLOCK
    assert watcher.current is changes[-1]
    assert errors == []


async def test_watcher_keeps_the_last_good_policy_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(_policy_text("approve"))
    changes: list[Policy] = []
    errors: list[str] = []
    watcher = PolicyWatcher(path, changes.append, errors.append)
    good = watcher.current
    task = asyncio.create_task(watcher.run())
    try:
        await _until(lambda: errors, lambda: path.write_text('{"defaults": {"LOW": "allow",'))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "not valid JSON" in errors[0] and str(path) in errors[0]
    assert f"keeping policy {good.version}" in errors[0]
    assert watcher.current is good
    assert watcher.current.defaults[Risk.HIGH] is Action.APPROVE
    assert changes == []


async def test_watcher_follows_an_editor_that_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(_policy_text("allow"))
    changes: list[Policy] = []
    watcher = PolicyWatcher(path, changes.append, lambda message: None)
    task = asyncio.create_task(watcher.run())

    def save_like_an_editor() -> None:
        temporary = tmp_path / ".policy.json.swp-new"
        temporary.write_text(_policy_text("require_snapshot"))
        os.replace(temporary, path)

    try:
        await _until(lambda: changes, save_like_an_editor)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert watcher.current.defaults[Risk.HIGH] is Action.REQUIRE_SNAPSHOT


def test_the_full_example_in_the_docs_is_the_shipped_policy() -> None:
    docs = (REPO_POLICY.parent / "docs" / "policy.md").read_text()
    example = docs.split("```json\n", 1)[1].split("```", 1)[0]
    assert parse_policy(example) == default_policy()
