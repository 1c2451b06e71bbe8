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
from backstop_core.runtime import Runtime, tune_gc


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
        "--demo-agent",
        action="store_true",
        help="with --demo: run a simulated agent that sends reads, writes and now and then "
        "a statement the policy holds for approval",
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
    runtime.bus.subscribe(event_printer(log_statements), routine=log_statements == "all")
    await runtime.start()
    tune_gc()
    if banner:
        print(banner, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runtime.stop()


async def run_ui(
    settings: Settings, *, banner: str | None = None, agent_dsn: str | None = None
) -> None:
    """The dashboard in this terminal; the runtime stops when it quits, however it quits."""
    from backstop_tui.app import BackstopApp

    runtime = Runtime(settings)
    agent = None
    if agent_dsn is not None:
        from backstop_tui.demo_agent import DemoAgent

        agent = DemoAgent(agent_dsn)
    app = BackstopApp(runtime, banner=banner, demo_agent=agent)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, app.exit)
    try:
        await app.run_async()
    finally:
        await app.shutdown_runtime()


def _log_to_file(settings: Settings) -> None:
    """Under the dashboard, log lines would tear the screen: they go to a file instead."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(settings.state_dir / "backstop-tui.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def demo_agent_dsn(listen: str) -> str:
    """Where the simulated agent connects: the gateway's address, as a client reaches it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"postgresql://postgres@{host}:{port}/shop?sslmode=disable"


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
    if args.demo_agent and not args.demo:
        print(
            "backstop-tui: --demo-agent needs --demo (it works on the demo's shop database)",
            file=sys.stderr,
        )
        return 2
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
            connect = f"psql 'postgresql://postgres@{settings.listen}/shop'"
            if args.no_ui:
                banner = (
                    f"Backstop demo: PostgreSQL {env.postgres.version}, sample database shop.\n"
                    f"Connect through the gateway:  {connect}\n"
                    "Press Ctrl-C to stop and remove everything."
                )
            else:
                banner = f"demo PostgreSQL {env.postgres.version}, try: {connect}"
        settings.upstream_dsn()
        if args.no_ui:
            _run(run_headless(settings, banner=banner, log_statements=args.log_statements))
            return 0
        _log_to_file(settings)
        agent_dsn = demo_agent_dsn(settings.listen) if args.demo_agent else None
        _run(run_ui(settings, banner=banner, agent_dsn=agent_dsn))
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
