"""`backstop-tui`: runs the runtime with the terminal dashboard, or headless with --no-ui."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from backstop_core.config import Settings, SettingsError, add_settings_arguments, settings_from_args
from backstop_core.events import Event, StatementDecided, StatementFinished, json_line
from backstop_core.runtime import Runtime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backstop-tui",
        description="Backstop: a PostgreSQL safety gateway for SQL written by AI agents.",
    )
    parser.add_argument(
        "--no-ui", action="store_true", help="run headless, one JSON line per event"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start a throwaway PostgreSQL with sample data and protect it",
    )
    parser.add_argument(
        "--log-statements",
        choices=("all", "refused", "none"),
        default="refused",
        help="with --no-ui: which statements get a JSON line (default: refused ones — held, "
        "blocked, denied, failed; every statement is always in the audit)",
    )
    add_settings_arguments(parser)
    return parser


def _print_event(event: Event) -> None:
    sys.stdout.write(json_line(event) + "\n")
    sys.stdout.flush()


def event_printer(log_statements: str) -> Callable[[Event], None]:
    """The --no-ui log: one JSON line per event, statements filtered as asked."""
    if log_statements == "all":
        return _print_event

    def print_event(event: Event) -> None:
        if isinstance(event, StatementDecided):
            quiet = log_statements == "none" or event.action == "allow"
        elif isinstance(event, StatementFinished):
            quiet = log_statements == "none" or event.outcome == "forwarded"
        else:
            quiet = False
        if not quiet:
            _print_event(event)

    return print_event


async def run_headless(
    settings: Settings, *, banner: str | None = None, log_statements: str = "refused"
) -> None:
    runtime = Runtime(settings)
    runtime.bus.subscribe(event_printer(log_statements))
    await runtime.start()
    if banner:
        print(banner, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runtime.stop()


def _run(coro_factory: object) -> None:
    try:
        import uvloop

        uvloop.run(coro_factory)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro_factory)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    demo = None
    try:
        settings = settings_from_args(args)
        banner = None
        if args.demo:
            from backstop_core.demo import Demo

            demo = Demo()
            env = demo.start()
            settings = replace(
                settings,
                upstream=env.upstream_dsn,
                store=settings.store or env.snapshot_dir.as_uri(),
                state_dir=env.base_dir / "state"
                if settings.state_dir == Path(".backstop")
                else settings.state_dir,
            )
            banner = (
                f"Backstop demo: PostgreSQL {env.postgres.version}, sample database shop.\n"
                f"Connect through the gateway:  psql 'postgresql://postgres@{settings.listen}/shop'\n"
                "Press Ctrl-C to stop and remove everything."
            )
        if not args.no_ui:
            print(
                "backstop-tui: the terminal dashboard is not built yet; "
                "run with --no-ui for the headless gateway.",
                file=sys.stderr,
            )
            return 2
        settings.upstream_dsn()
        _run(run_headless(settings, banner=banner, log_statements=args.log_statements))
        return 0
    except SettingsError as exc:
        print(f"backstop-tui: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if demo is not None:
            demo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
