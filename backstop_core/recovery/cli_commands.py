"""`backstop recover`, `backstop drill` and `backstop pitr`.

`register(command)` adds the three subcommands through the `command(name, handler, help)`
helper of `backstop_core.cli`, which gives each the common settings flags (--upstream,
--store, --state-dir, --policy, ...). Until the main CLI registers them, `python -m
backstop_core.recovery.cli_commands recover ...` runs them with the same flags.

Exit codes: 0 done; 1 the recovery, drill or check found a problem (validation failed, a
damaged snapshot, PITR not possible); 2 the command cannot run as asked (a missing flag,
no store, no such table, snapshot or event, PostgreSQL unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from backstop_core.config import Settings, SettingsError, effective_sslmode

Handler = Callable[[argparse.Namespace, Settings], int]
Command = Callable[[str, Handler, str], argparse.ArgumentParser]

__all__ = ["cmd_drill", "cmd_pitr", "cmd_recover", "main", "register"]

RECOVER_HELP = (
    "restore a table (or a recovery group) from a snapshot into a side table, validate it,"
    " show what differs and write the copy-back SQL; guided when no --table/--group"
)
DRILL_HELP = (
    "restore drill: restore the newest snapshot of each protected table into a scratch"
    " schema, validate it, record how long it took, drop it"
)
PITR_HELP = (
    "point-in-time recovery: `pitr check` (is WAL archived?), `pitr target --event N`"
    " (recovery settings that stop just before audit event N)"
)


def register(command: Command) -> None:
    """Add `recover`, `drill` and `pitr` with the CLI's `command(name, handler, help)`."""
    p = command("recover", cmd_recover, RECOVER_HELP)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--table", help="the table to recover (schema.table; bare names too)")
    which.add_argument("--group", help="a recovery group of the policy: all its tables")
    p.add_argument(
        "--snapshot",
        nargs="+",
        metavar="SNAPSHOT",
        help="ID, latest (the default), or before-event N: the last snapshot before audit event N",
    )
    p.add_argument("--yes", action="store_true", help="do not ask before --apply")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--apply", action="store_true", help="run the copy-back SQL (after a confirmation)"
    )
    p.add_argument("--out", type=Path, help="write the SQL here (default: STATE_DIR/recovery/...)")
    p.add_argument(
        "--replace", action="store_true", help="drop a side table left by an earlier restore"
    )
    p.add_argument("--workers", type=int, help="connections that load in parallel")

    p = command("drill", cmd_drill, DRILL_HELP)
    p.add_argument("tables", nargs="*", metavar="TABLE", help="tables to drill")
    p.add_argument("--all", action="store_true", help="every protected table (the default)")
    p.add_argument("--last", action="store_true", help="show the last drill of each table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--workers", type=int, help="connections that load in parallel")

    p = command("pitr", cmd_pitr, PITR_HELP)
    p.add_argument("action", choices=["check", "target"])
    p.add_argument("--event", type=int, help="audit event number (pitr target)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# --------------------------------------------------------------------------- shared


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run(coro: Coroutine[Any, Any, int], *, json_output: bool = False) -> int:
    try:
        return asyncio.run(coro)
    except _Exit as exc:
        if json_output:
            print(json.dumps({"error": exc.message, "exit_code": exc.code}, indent=2))
        print(f"backstop: {exc.message}", file=sys.stderr)
        return exc.code


def _upstream(settings: Settings) -> str:
    """The upstream DSN with the configured TLS mode, for asyncpg."""
    if not settings.upstream:
        raise _Exit(
            2,
            "no database to recover into: pass --upstream postgresql://HOST:PORT/DB (or set"
            " BACKSTOP_UPSTREAM)",
        )
    parts = urlsplit(settings.upstream)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query.setdefault("sslmode", effective_sslmode(settings))
    if settings.upstream_sslrootcert is not None:
        query.setdefault("sslrootcert", str(settings.upstream_sslrootcert))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _policy(settings: Settings) -> Any:
    from backstop_core.policy import PolicyError, default_policy, load_policy

    if settings.policy is None:
        return default_policy()
    try:
        return load_policy(settings.policy)
    except PolicyError as exc:
        raise _Exit(2, f"policy: {exc}") from None


def _store(settings: Settings, policy: Any) -> Any:
    from backstop_core.sidecar.objectstore import ObjectStoreError, open_object_store

    url = settings.store or policy.snapshot.store
    if not url:
        raise _Exit(
            2,
            "no snapshot store: pass --store s3://BUCKET/PREFIX or --store file:///PATH (or"
            " set BACKSTOP_STORE, or snapshot.store in the policy)",
        )
    try:
        return open_object_store(url)
    except ObjectStoreError as exc:
        raise _Exit(2, str(exc)) from None


async def _check_upstream(dsn: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        where = urlsplit(dsn)
        raise _Exit(
            2, f"cannot connect to PostgreSQL at {where.hostname}:{where.port or 5432}: {exc}"
        ) from None
    await conn.close()


def _console(*, stderr: bool = True) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a log or a pipe: no need to wrap early
    return console


# --------------------------------------------------------------------------- recover


def cmd_recover(args: argparse.Namespace, settings: Settings) -> int:
    return _run(_recover(args, settings), json_output=args.json)


async def _recover(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from backstop_core.recovery.restore import RestoreError
    from backstop_core.recovery.wizard import (
        Recovery,
        RecoveryOutcome,
        SnapshotDamaged,
        UsageError,
        confirm,
        guided,
        parse_snapshot_spec,
        progress_bar,
        render_checks,
        render_diff,
    )
    from backstop_core.sidecar.objectstore import ObjectStoreError
    from backstop_core.sidecar.snapshot import SnapshotError
    from backstop_core.store import Store

    console = _console()
    if args.snapshot and not (args.table or args.group):
        raise _Exit(2, "--snapshot needs --table or --group")
    policy = _policy(settings)
    dsn = _upstream(settings)
    store = _store(settings, policy)
    await _check_upstream(dsn)
    state = await Store.open(settings.state_dir)
    recovery = Recovery(
        dsn,
        store,
        state,
        policy=policy,
        workers=args.workers,
        state_dir=settings.state_dir,
    )
    outcome: RecoveryOutcome | None = None
    try:
        try:
            table: str | None = None
            group: str | None = args.group
            if args.table is None and args.group is None:
                choice = await guided(recovery, console)
                table, group, snapshot_id = choice.table, choice.group, choice.snapshot_id
            else:
                spec = parse_snapshot_spec(args.snapshot or "latest")
                if args.table is not None:
                    table = await recovery.resolve_table(args.table)
                    snapshot_id = (await recovery.choose(table, spec)).id
                else:
                    snapshot_id = (await recovery.choose_group(args.group, spec)).id
            target = table or f"group {group}"
            if not args.json:
                console.print(
                    f"Restoring [bold]{target}[/] from snapshot [bold]{snapshot_id}[/] into a"
                    " side table; the original is not touched."
                )
            bar, update = progress_bar(console)
            if args.json or not console.is_terminal:
                bar.disable = True
            with bar:
                outcome = await recovery.recover(
                    table=table,
                    group=group,
                    snapshot_id=snapshot_id,
                    progress=update,
                    replace_existing=args.replace,
                    out=args.out,
                    on_restored=None
                    if args.json
                    else lambda r: console.print(
                        f"Restored {r.rows:,} rows into [bold]{r.restored_table}[/] in"
                        f" {r.seconds:.1f} s"
                    ),
                )
        except UsageError as exc:
            raise _Exit(2, str(exc)) from None
        except (RestoreError, SnapshotDamaged, SnapshotError, ObjectStoreError) as exc:
            outcome = outcome or RecoveryOutcome(args.table or f"group {args.group}", args.group)
            outcome.error = str(exc)
            if args.json:
                print(json.dumps(outcome.as_dict(), indent=2, default=str))
            print(f"backstop: restore failed: {exc}", file=sys.stderr)
            return 1
        if not args.json:
            for report in outcome.reports:
                render_checks(console, report)
        if not outcome.passed:
            kept = ", ".join(r.restored_table for r in outcome.results)
            message = (
                f"validation failed: no copy-back SQL. The side table is kept for a look: {kept}"
            )
            if args.json:
                outcome.error = message
                print(json.dumps(outcome.as_dict(), indent=2, default=str))
            print(f"backstop: {message}", file=sys.stderr)
            return 1
        copy_back = outcome.copy_back
        assert copy_back is not None
        if not args.json:
            for diff in outcome.diffs.values():
                render_diff(console, diff)
            if outcome.sql_file is not None:
                console.print(f"Copy-back SQL, also saved to [bold]{outcome.sql_file}[/]:")
            sys.stdout.write(copy_back.sql)
            sys.stdout.flush()
        if args.apply and copy_back.has_work:
            question = f"Run this copy-back on {urlsplit(dsn).hostname} now?"
            if not args.yes and not confirm(console, question):
                console.print("Not applied. The SQL is in the file above.")
            else:
                try:
                    outcome.applied = await recovery.apply(copy_back)
                except asyncpg.PostgresError as exc:
                    outcome.error = f"the copy-back failed and was rolled back: {exc}"
                    if args.json:
                        print(json.dumps(outcome.as_dict(), indent=2, default=str))
                    print(f"backstop: {outcome.error}", file=sys.stderr)
                    return 1
                if not args.json:
                    console.print(
                        f"Applied in {outcome.applied.seconds:.1f} s and recorded in the audit"
                        " trail (RECOVER)."
                    )
        if args.json:
            print(json.dumps(outcome.as_dict(), indent=2, default=str))
        return 0
    finally:
        await recovery.close()
        await state.close()


# --------------------------------------------------------------------------- drill


def cmd_drill(args: argparse.Namespace, settings: Settings) -> int:
    return _run(_drill(args, settings), json_output=args.json)


async def _drill(args: argparse.Namespace, settings: Settings) -> int:
    from backstop_core.recovery.drill import DrillResult, last_drills, run_drills
    from backstop_core.store import Store

    if args.last:
        state = await Store.open(settings.state_dir)
        try:
            drills = await last_drills(state)
        finally:
            await state.close()
        if args.json:
            print(json.dumps([d.as_dict() for d in drills.values()], indent=2))
        elif not drills:
            print("No drill on record yet: run `backstop drill`.")
        for summary in drills.values() if not args.json else ():
            print(f"{summary.table}: {summary.describe()}")
        return 0
    if args.all and args.tables:
        raise _Exit(2, "name tables or pass --all, not both")
    policy = _policy(settings)
    dsn = _upstream(settings)
    store = _store(settings, policy)
    await _check_upstream(dsn)
    console = _console(stderr=False)

    def show(result: DrillResult) -> None:
        if args.json:
            return
        if result.passed:
            console.print(
                f"[green]✓[/] {result.table}: {result.rows:,} rows from {result.snapshot_id}"
                f" restored and checked in {result.seconds:.1f} s"
                f" (restore {result.restore_seconds:.1f} s)"
            )
        else:
            failed = [c for c in result.checks if not c.passed]
            why = result.error or "; ".join(f"{c.name}: {c.detail}" for c in failed)
            console.print(f"[red]✗[/] {result.table}: drill failed: {why}")

    state = await Store.open(settings.state_dir)
    try:
        results = await run_drills(
            dsn,
            store,
            state,
            tables=args.tables or None,
            policy=policy,
            workers=args.workers,
            on_result=show,
        )
    finally:
        await state.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2, default=str))
    if not results:
        print(
            "backstop: no protected table has a snapshot to drill; take snapshots first",
            file=sys.stderr,
        )
        return 1
    return 0 if all(r.passed for r in results) else 1


# --------------------------------------------------------------------------- pitr


def cmd_pitr(args: argparse.Namespace, settings: Settings) -> int:
    return _run(_pitr(args, settings), json_output=args.json)


async def _pitr(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from backstop_core.recovery.pitr import PitrError, check_pitr, recovery_target
    from backstop_core.store import Store

    if args.action == "check":
        dsn = _upstream(settings)
        await _check_upstream(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            report = await check_pitr(conn)
        finally:
            await conn.close()
        if args.json:
            print(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            print("\n".join(report.lines()))
        return 0 if report.possible else 1
    if args.event is None:
        raise _Exit(2, "pitr target needs --event N (an audit event number: backstop audit)")
    state = await Store.open(settings.state_dir)
    try:
        target = await recovery_target(state, args.event)
    except PitrError as exc:
        raise _Exit(1, str(exc)) from None
    finally:
        await state.close()
    if args.json:
        print(json.dumps(target.as_dict(), indent=2, default=str))
    else:
        print("\n".join(target.lines()))
    return 0


# --------------------------------------------------------------------------- standalone


def main(argv: Sequence[str] | None = None) -> int:
    """The three commands on their own, with the same settings flags as `backstop`."""
    from backstop_core.config import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="backstop")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_settings_arguments(p)
        p.set_defaults(handler=handler)
        return p

    register(command)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"backstop: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
