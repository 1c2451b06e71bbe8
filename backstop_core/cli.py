"""`backstop`: the operator's command line.

Every subcommand accepts the same settings flags as `backstop-tui` (--config, --upstream,
--listen, --policy, --state-dir, --store, ...). Commands that read state work on the state
directory directly, so they work whether or not a gateway is running.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backstop_core import __version__
from backstop_core.config import Settings, SettingsError, add_settings_arguments, settings_from_args
from backstop_core.recovery import cli_commands as recovery_cli

Handler = Callable[[argparse.Namespace, Settings], int]


def _read_sql(args: argparse.Namespace) -> str:
    if args.sql:
        return " ".join(args.sql)
    if sys.stdin.isatty():
        print("Reading SQL from standard input; end with Ctrl-D.", file=sys.stderr)
    return sys.stdin.read()


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.classify import classify, worst

    sql = _read_sql(args)
    statements = classify(sql)
    overall = worst(statements) if statements else None
    if args.json:
        print(
            json.dumps(
                {
                    "risk": str(overall) if overall is not None else "LOW",
                    "statements": [
                        {
                            "operation": c.operation,
                            "category": str(c.category),
                            "tables": list(c.tables),
                            "has_where": c.has_where,
                            "unbounded": c.unbounded,
                            "table_destructive": c.table_destructive,
                            "risk": str(c.risk),
                            "reasons": list(c.reasons),
                        }
                        for c in statements
                    ],
                },
                indent=2,
            )
        )
        return 0
    if not statements:
        print("No statements.")
        return 0
    for number, c in enumerate(statements, 1):
        tables = ", ".join(c.tables) or "-"
        print(f"{number}. {c.operation} ({c.category}) risk {c.risk}  tables: {tables}")
        flags = [
            name
            for name, on in (
                ("has WHERE", c.has_where),
                ("unbounded", c.unbounded),
                ("table-destructive", c.table_destructive),
            )
            if on
        ]
        if flags:
            print("   " + ", ".join(flags))
        for reason in c.reasons:
            print(f"   - {reason}")
    print(f"Overall risk: {overall}")
    return 0


def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.policy import PolicyError, explain, load_policy

    path = Path(args.file) if args.file else settings.policy
    if path is None:
        print("backstop: no policy file given (backstop policy check FILE)", file=sys.stderr)
        return 2
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"{path}: invalid policy", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{path}: valid (version {policy.version})")
    print(explain(policy))
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _jsonable(record: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(record)
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
        elif isinstance(value, tuple):
            data[key] = list(value)
    return data


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _cutoff(value: str, now: datetime) -> datetime:
    """`--before`: an age (90d, 12h, 30m, 2w) or a date or time (2026-09-01, local time
    unless it names its zone); raises ValueError with what to write instead."""
    text = value.strip().lower()
    if text and text[-1] in _AGE_UNITS:
        try:
            amount = float(text[:-1])
        except ValueError:
            amount = -1.0
        if amount >= 0:
            try:
                return now - timedelta(seconds=amount * _AGE_UNITS[text[-1]])
            except OverflowError:
                raise ValueError(f"--before {value!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--before {value!r}: give an age such as 90d, 12h or 2w, or a date such as 2026-09-01"
        ) from None
    return when.astimezone() if when.tzinfo is None else when


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "prune":
        return _audit_prune(args, settings)
    if args.before is not None or args.dry_run:
        print("--before and --dry-run go with `backstop audit prune`", file=sys.stderr)
        return 2
    from backstop_core.store import Store

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            records = await store.audit_query(
                limit=args.limit,
                agent=args.agent,
                risk=args.risk,
                decision=args.decision,
                table=args.table,
                text=args.text,
            )
        finally:
            await store.close()
        if args.json:
            print(json.dumps([_jsonable(r) for r in records], indent=2, default=str))
            return 0
        if not records:
            print("No audit events match.")
            return 0
        for r in reversed(records):
            sql = " ".join(r.sql.split())
            if len(sql) > 80:
                sql = sql[:77] + "..."
            outcome = r.outcome or "pending"
            print(
                f"#{r.id} {_when(r.time)} {r.agent} {r.operation} {r.risk} "
                f"{r.decision} -> {outcome}  {sql}"
            )
        return 0

    return _run(run())


def _audit_prune(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.store import Store

    if args.before is None:
        print(
            "backstop audit prune needs --before: the age (90d) or date (2026-09-01) "
            "of the oldest events to keep",
            file=sys.stderr,
        )
        return 2
    now = datetime.now(UTC)
    try:
        cutoff = _cutoff(args.before, now)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if cutoff > now:
        print(
            f"--before {args.before} is in the future: that would delete every event, "
            "including the ones still being recorded. Give an age or a past date.",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            count = await store.audit_prune(cutoff.timestamp(), dry_run=args.dry_run)
        finally:
            await store.close()
        if args.json:
            print(
                json.dumps({"before": cutoff.isoformat(), "dry_run": args.dry_run, "events": count})
            )
            return 0
        verb = "Would delete" if args.dry_run else "Deleted"
        noun = "audit event" if count == 1 else "audit events"
        print(f"{verb} {count:,} {noun} recorded before {_when(cutoff)}.")
        if count and not args.dry_run:
            print("The database file keeps its size; new events reuse the freed space.")
        return 0

    return _run(run())


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def cmd_pending(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.store import Store

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            records = await store.approvals_list(status="pending")
        finally:
            await store.close()
        if args.json:
            print(json.dumps([_jsonable(r) for r in records], indent=2, default=str))
            return 0
        if not records:
            print("No approvals are pending.")
            return 0
        now = datetime.now(UTC)
        for r in records:
            left = max(0, int((r.expires_at - now).total_seconds()))
            rows = f"~{r.row_estimate:,} rows" if r.row_estimate is not None else "rows unknown"
            tables = ", ".join(r.tables) or "-"
            print(f"#{r.id} {r.agent} {r.operation} on {tables}, {rows}, {left}s left")
            print(f"    {' '.join(r.sql.split())[:200]}")
        return 0

    return _run(run())


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.store import Store

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            record = await store.approval_get(args.id)
        finally:
            await store.close()
        if record is None:
            print(f"backstop: there is no approval {args.id}", file=sys.stderr)
            return 1
        data = _jsonable(record)
        if args.json:
            print(json.dumps(data, indent=2, default=str))
            return 0
        for key, value in data.items():
            print(f"{key:>26}: {value}")
        return 0

    return _run(run())


def _decide(args: argparse.Namespace, settings: Settings, approve: bool) -> int:
    from backstop_core.store import Store, StoreError

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            record = await store.approval_decide(
                args.id, approve=approve, decided_by=_operator(), reason=args.reason
            )
        except StoreError as exc:
            print(f"backstop: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        verb = "approved" if approve else "denied"
        print(f"Approval #{record.id} {verb} by {record.decided_by}.")
        return 0

    return _run(run())


def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    return _decide(args, settings, True)


def cmd_deny(args: argparse.Namespace, settings: Settings) -> int:
    return _decide(args, settings, False)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    path = settings.state_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        message = f"no Backstop instance is running on state directory {settings.state_dir}"
        if args.json:
            print(json.dumps({"running": False, "error": message}))
        else:
            print(f"backstop: {message}", file=sys.stderr)
        return 1
    age = time.time() - float(status.get("updated_at", 0))
    running = age < 15
    try:
        os.kill(int(status.get("pid", 0)), 0)
    except (OSError, ValueError):
        running = False
    status["running"] = running
    status["status_age_seconds"] = round(age, 1)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if running else 1
    state = "running" if running else f"NOT RUNNING (last report {age:.0f} s ago)"
    reach = {True: "reachable", False: "UNREACHABLE", None: "not checked yet"}[
        status.get("upstream_reachable")
    ]
    print(f"Backstop {state}, pid {status.get('pid')}")
    print(f"  gateway   {status.get('listen')}  ({status.get('sessions')} sessions)")
    print(f"  upstream  {status.get('upstream')}  {reach}")
    policy_line = f"version {status.get('policy_version')}"
    if status.get("policy_error"):
        policy_line += f"  (last edit INVALID, kept: {status['policy_error']})"
    print(f"  policy    {status.get('policy_path') or 'built-in default'}  {policy_line}")
    print(f"  approvals {status.get('pending_approvals')} pending")
    print(f"  alerts    {status.get('open_alerts')} open")
    for table in status.get("snapshot_health") or ():
        print(f"  snapshot  {table.get('table')}: {table.get('health')} {table.get('detail', '')}")
    return 0 if running else 1


def cmd_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.store import Store, StoreError

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        try:
            if args.action == "ack":
                if args.id is None:
                    print("backstop: alerts ack needs an alert id", file=sys.stderr)
                    return 2
                try:
                    record = await store.alert_ack(args.id, acked_by=_operator())
                except StoreError as exc:
                    print(f"backstop: {exc}", file=sys.stderr)
                    return 1
                print(f"Alert #{record.id} acknowledged by {record.acked_by}.")
                return 0
            records = await store.alerts_list(limit=args.limit)
        finally:
            await store.close()
        if args.open:
            records = [r for r in records if r.status != "closed"]
        if args.json:
            rows = []
            for record in records:
                data = _jsonable(record)
                try:
                    data["details"] = json.loads(record.details_json)
                except (TypeError, ValueError):
                    data["details"] = None
                rows.append(data)
            print(json.dumps(rows, indent=2, default=str))
            return 0
        if not records:
            print("No alerts." if not args.open else "No open alerts.")
            return 0
        for r in records:
            print(f"#{r.id} {_when(r.time)} [{r.status}] {r.severity} {r.kind}: {r.title}")
        return 0

    return _run(run())


def _scheduler_parts(settings: Settings) -> tuple[str, Any]:
    """The upstream DSN and the object store a snapshot command needs, or SettingsError."""
    from backstop_core.sidecar.objectstore import ObjectStoreError, open_object_store

    if not settings.store:
        raise SettingsError(
            "store: no snapshot store; pass --store s3://bucket/prefix or --store file:///path"
        )
    dsn = settings.upstream
    if not dsn:
        settings.upstream_dsn()  # raises the message that names the setting
    try:
        objects = open_object_store(settings.store)
    except ObjectStoreError as exc:
        raise SettingsError(f"store: {exc}") from exc
    assert dsn is not None
    return dsn, objects


def _policy_for(settings: Settings) -> Any:
    from backstop_core.runtime import load_configured_policy

    return load_configured_policy(settings)


def cmd_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from backstop_core.events import Event, EventBus
    from backstop_core.sidecar.scheduler import SnapshotScheduler
    from backstop_core.sidecar.snapshot import SnapshotError, SnapshotProgress
    from backstop_core.store import Store

    if bool(args.tables) == bool(args.group):
        print("backstop: name the tables to snapshot, or --group NAME", file=sys.stderr)
        return 2
    dsn, objects = _scheduler_parts(settings)
    policy = _policy_for(settings)

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        bus = EventBus()
        scheduler = SnapshotScheduler(dsn, objects, store, bus, lambda: policy)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
            TimeElapsedColumn(),
            transient=True,
            disable=args.json or not sys.stderr.isatty(),
        ) as progress:
            bars: dict[str, Any] = {}

            def show(event: Event) -> None:
                if isinstance(event, SnapshotProgress):
                    if event.table not in bars:
                        bars[event.table] = progress.add_task(
                            event.table, total=event.rows_estimate or None
                        )
                    progress.update(bars[event.table], completed=event.rows)

            bus.subscribe(show)
            try:
                manifest = await scheduler.snapshot_now(
                    tables=args.tables or None, group=args.group
                )
            except (SnapshotError, ValueError) as exc:
                print(f"backstop: snapshot failed: {exc}", file=sys.stderr)
                return 1
            finally:
                await scheduler.close()
                await store.close()
        summary: dict[str, Any] = {
            "id": manifest.id,
            "database": manifest.database,
            "group": manifest.group,
            "wal_lsn": manifest.wal_lsn,
            "manifest_sha256": manifest.sha256,
            "tables": [
                {
                    "table": t.name,
                    "rows": t.rows,
                    "parts": len(t.parts),
                    "bytes": sum(part.size for part in t.parts),
                    "checksum": t.checksum,
                }
                for t in manifest.tables
            ],
        }
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
            return 0
        print(f"Snapshot {manifest.id} of database {manifest.database} at WAL {manifest.wal_lsn}")
        for t in summary["tables"]:
            print(f"  {t['table']}: {t['rows']:,} rows, {t['parts']} parts, {t['bytes']:,} bytes")
        print(f"  manifest sha256 {manifest.sha256}")
        return 0

    return _run(run())


def cmd_snapshots(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.sidecar.scheduler import SnapshotScheduler
    from backstop_core.sidecar.snapshot import list_snapshots
    from backstop_core.store import Store

    dsn, objects = _scheduler_parts(settings)
    policy = _policy_for(settings)

    async def run() -> int:
        store = await Store.open(settings.state_dir)
        scheduler = SnapshotScheduler(dsn, objects, store, None, lambda: policy)
        try:
            database = await scheduler.database()
            snapshots = await list_snapshots(objects, database, args.table)
            await scheduler.refresh()
            health = {h.table: h for h in scheduler.health()}
            drills: dict[str, Any] = {}
            for drill in await store.drills_list(limit=1000):
                drills.setdefault(drill.table, drill)
        finally:
            await scheduler.close()
            await store.close()
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for snap in snapshots:
            h = health.get(snap.table)
            d = drills.get(snap.table)
            rows.append(
                {
                    "id": snap.id,
                    "table": snap.table,
                    "group": snap.group,
                    "taken_at": snap.finished_at.isoformat(),
                    "age_seconds": round((now - snap.finished_at).total_seconds(), 1),
                    "rows": snap.rows,
                    "size_bytes": snap.size_bytes,
                    "wal_lsn": snap.wal_lsn,
                    "complete": snap.complete,
                    "problems": list(snap.problems),
                    "health": h.health if h else "unprotected",
                    "last_drill": (
                        {"status": d.status, "at": _when(d.finished_at or d.started_at)}
                        if d
                        else None
                    ),
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("No snapshots." + ("" if args.table else " Take one: backstop snapshot TABLE"))
        for r in rows:
            last: Any = r["last_drill"]
            drilled = f", last drill {last['status']}" if last else ""
            state = "complete" if r["complete"] else "INCOMPLETE: " + "; ".join(r["problems"])
            print(
                f"{r['table']}  {r['id']}  {r['age_seconds']:.0f}s old  {r['rows']:,} rows  "
                f"{r['size_bytes']:,} bytes  [{r['health']}] {state}{drilled}"
            )
        return 0

    return _run(run())


def cmd_mcp(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.mcp_server import run_from_cli

    return run_from_cli(args, settings)


def cmd_version(args: argparse.Namespace, settings: Settings) -> int:
    print(f"backstop {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backstop", description="Backstop: a PostgreSQL safety gateway for AI agents."
    )
    parser.add_argument("--version", action="version", version=f"backstop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p)
        p.set_defaults(handler=handler)
        return p

    p = command("classify", cmd_classify, "classify SQL the way the gateway does")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("sql", nargs="*", help="SQL text (read from standard input when omitted)")

    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    p = policy_sub.add_parser("check", help="validate a policy file and explain it")
    add_settings_arguments(p)
    p.add_argument("file", nargs="?", help="policy file (default: the configured policy)")
    p.set_defaults(handler=cmd_policy_check)

    p = command(
        "audit",
        cmd_audit,
        "show the audit trail, newest last; `audit prune --before 90d` deletes old events",
    )
    p.add_argument("action", nargs="?", choices=["show", "prune"], default="show")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--before",
        metavar="AGE|DATE",
        help="prune: delete events recorded before this age (90d, 12h, 2w) or date",
    )
    p.add_argument("--dry-run", action="store_true", help="prune: only count them")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--agent")
    p.add_argument(
        "--risk", choices=["LOW", "MEDIUM", "HIGH", "CRITICAL", "low", "medium", "high", "critical"]
    )
    p.add_argument("--decision", help="allow, approve, block, ...")
    p.add_argument("--table")
    p.add_argument("--text", help="only statements whose SQL contains this text")

    p = command("pending", cmd_pending, "list approvals waiting for a decision")
    p.add_argument("--json", action="store_true")
    p = command("show", cmd_show, "show one approval")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p = command("approve", cmd_approve, "approve a pending statement")
    p.add_argument("id", type=int)
    p.add_argument("--reason")
    p = command("deny", cmd_deny, "deny a pending statement; the agent gets the reason")
    p.add_argument("id", type=int)
    p.add_argument("--reason", required=True)
    p = command("alerts", cmd_alerts, "bypass alerts and other alerts; `alerts ack ID`")
    p.add_argument("action", nargs="?", choices=["list", "ack"], default="list")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--open", action="store_true", help="only alerts that are not closed")
    p.add_argument("--limit", type=int, default=100)
    p = command("snapshot", cmd_snapshot, "snapshot tables (or a recovery group) now")
    p.add_argument("tables", nargs="*", help="tables to snapshot together")
    p.add_argument("--group", help="a recovery group from the policy")
    p.add_argument("--json", action="store_true")
    p = command("snapshots", cmd_snapshots, "list snapshots with age, rows, size, health")
    p.add_argument("table", nargs="?")
    p.add_argument("--json", action="store_true")
    from backstop_core.mcp_server import add_mcp_arguments

    p = command("mcp", cmd_mcp, "serve Backstop's database tools to MCP clients, via the gateway")
    add_mcp_arguments(p)
    p = command("status", cmd_status, "health of the running instance")
    p.add_argument("--json", action="store_true")
    command("version", cmd_version, "print the version")
    recovery_cli.register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"backstop: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except SettingsError as exc:
        print(f"backstop: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
