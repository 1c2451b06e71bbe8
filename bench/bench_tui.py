"""Does the dashboard stay responsive while the gateway relays thousands of statements a second?

    python bench/bench_tui.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
        [--rate 5000] [--clients 8] [--threads 2] [--presses 40]

A real runtime and `BackstopApp` run headless (Pilot) in this process, as in `backstop-tui`;
`pgbench -S -R RATE` sends read-only statements through the gateway from a subprocess. Two
interactions are timed: `?` / Esc (the help over the dashboard and back) and `2` / `1` (the
dashboard and the audit screen, both full repaints of busy screens). The figure is the time
from the key press to the first repaint of the screen it asked for, taken where Textual hands
the compositor's update to the terminal driver. Both are measured twice in the same run, with
no load (the baseline) and under load, and printed as median, p95 and their ratio, with the
statement rate pgbench got through the gateway. Without --dsn a throwaway PostgreSQL is
started.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backstop_core.config import Settings  # noqa: E402
from backstop_core.runtime import Runtime  # noqa: E402
from backstop_tui.app import BackstopApp  # noqa: E402
from backstop_tui.screens.audit import AuditScreen  # noqa: E402
from backstop_tui.screens.dashboard import DashboardScreen  # noqa: E402
from backstop_tui.screens.help import HelpScreen  # noqa: E402


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def instrument(app: BackstopApp) -> list[tuple[float, object]]:
    """Record (time, screen) whenever a compositor update reaches the driver."""
    repaints: list[tuple[float, object]] = []
    original = app._display

    def display(screen: Any, renderable: Any) -> None:
        if renderable is not None:
            repaints.append((time.perf_counter(), screen))
        original(screen, renderable)

    app._display = display  # type: ignore[method-assign]
    return repaints


INTERACTIONS: dict[str, tuple[tuple[str, type], tuple[str, type]]] = {
    "? / Esc (help)": (("question_mark", HelpScreen), ("escape", DashboardScreen)),
    "2 / 1 (audit)": (("2", AuditScreen), ("1", DashboardScreen)),
}


async def key_to_repaint(
    app: BackstopApp,
    pilot: Any,
    repaints: list[tuple[float, object]],
    presses: int,
    interaction: str,
) -> list[float]:
    """Milliseconds from each key press to the first repaint of the screen it asked for."""
    samples: list[float] = []
    there, back = INTERACTIONS[interaction]
    for index in range(presses):
        key, wanted = there if index % 2 == 0 else back
        mark = len(repaints)
        started = time.perf_counter()
        await pilot.press(key)
        deadline = started + 10
        while True:
            shown = next((t for t, s in repaints[mark:] if isinstance(s, wanted)), None)
            if shown is not None:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no repaint of {wanted.__name__} within 10 s")
            await asyncio.sleep(0.001)
        samples.append((shown - started) * 1000)
        await asyncio.sleep(0.15)  # an operator's pace, and time for the feed to flow
    return samples


async def run(args: argparse.Namespace, dsn: str) -> None:
    state = Path(tempfile.mkdtemp(prefix="backstop-bench-tui-"))
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    runtime = Runtime(
        Settings(
            upstream=dsn,
            listen="127.0.0.1:0",
            state_dir=state,
            policy=ROOT / "policy.json",
            upstream_sslmode="disable",
        )
    )
    app = BackstopApp(runtime)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.header.gateway != "running":
            if app.header.gateway == "failed":
                raise RuntimeError(app.header.error)
            await pilot.pause(0.05)
        assert runtime.gateway is not None
        gateway = dsn_with_port(dsn, runtime.gateway.port)
        repaints = instrument(app)

        idle: dict[str, list[float]] = {}
        busy: dict[str, list[float]] = {}
        for name in INTERACTIONS:  # warm-up: every screen composed once
            await key_to_repaint(app, pilot, repaints, 6, name)
        for name in INTERACTIONS:
            idle[name] = await key_to_repaint(app, pilot, repaints, args.presses, name)

        seconds = int(args.presses * len(INTERACTIONS) * 0.3 + 10)
        load = await asyncio.create_subprocess_exec(
            "pgbench", "-n", "-S", "-M", "prepared", "-c", str(args.clients),
            "-j", str(args.threads), "-R", str(args.rate), "-T", str(seconds), gateway,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(2.0)  # let the clients connect and the rate settle
        before, started = app.feed.decided_total, time.perf_counter()
        for name in INTERACTIONS:
            busy[name] = await key_to_repaint(app, pilot, repaints, args.presses, name)
        seen = (app.feed.decided_total - before) / (time.perf_counter() - started)
        out, err = await load.communicate()
        text = out.decode() + err.decode()
        match = re.search(r"tps = ([\d.]+)", text)
        if load.returncode != 0 or match is None:
            raise RuntimeError(f"pgbench failed:\n{text}")
        tps = float(match.group(1))

    print(f"key press -> repaint, {args.presses} presses per line, 120x40, headless")
    worst = 0.0
    for name in INTERACTIONS:
        for label, samples in (("idle", idle[name]), ("under load", busy[name])):
            print(
                f"  {name:15s} {label:10s}  median {statistics.median(samples):6.1f} ms   "
                f"p95 {percentile(samples, 0.95):6.1f} ms   max {max(samples):6.1f} ms"
            )
        ratio = percentile(busy[name], 0.95) / percentile(idle[name], 0.95)
        print(f"  {name:15s} p95 under load / idle: {ratio:.2f}x")
        worst = max(worst, percentile(busy[name], 0.95))
    print(
        f"  load: pgbench -S -R {args.rate} -c {args.clients}: {tps:,.0f} statements/s "
        f"through the gateway over the run; {seen:,.0f}/s while keys were being pressed"
    )
    verdict = "met" if worst < 100 else "NOT met"
    print(f"  target p95 under load < 100 ms: {verdict} (worst p95 {worst:.1f} ms)")


def dsn_with_port(dsn: str, port: int) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}127.0.0.1:{port}{parts.path}?sslmode=disable"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn")
    parser.add_argument("--rate", type=int, default=5000, help="statements/s pgbench sends")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presses", type=int, default=40)
    args = parser.parse_args()

    local = None
    dsn = args.dsn
    if dsn is None:
        from backstop_core.localpg import LocalPostgres

        local = LocalPostgres(settings={"max_connections": "100"})
        dsn = local.start().dsn(database="postgres")
    try:
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", dsn], check=True, capture_output=True)
        try:
            import uvloop

            uvloop.run(run(args, dsn))
        except ImportError:
            asyncio.run(run(args, dsn))
    finally:
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()
