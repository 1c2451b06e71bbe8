"""pgbench -S through nothing, a bare relay, and the gateway, in one run.

    python bench/bench_gateway.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
        [--seconds 10] [--clients 8] [--threads 2] [--modes simple,prepared]
        [--policy policy.json] [--pass-through] [--cpu-rate 8000]

Without --dsn a throwaway PostgreSQL is started. Prints TPS per path and mode and the
gateway/relay ratio (the issue's target: >= 0.90 with a pass-through hook, >= 0.85 with
policy and audit on). Each path gets the same warm-up and run length; the paths
alternate per round, in reverse order every other round, so drift on a shared machine
affects them alike. Each round's gateway/relay ratio is printed, with their mean and its 95%
confidence interval: how far the machine's drift leaves the figure uncertain.

Every statement through the gateway is journaled before it is forwarded; moving the
journal into SQLite waits while the gateway is busy. After each gateway run the bench
waits for that ingest to finish, so it does not run during the next path's measurement,
and prints how long it took.

Each proxy is one thread that every transaction passes through twice: its CPU time per
transaction under full load is what it costs there. The bench prints it for the throughput
runs. (The throughput ratio has come out above relay/gateway of it: under load the busier
proxy also gets more of the machine.)

Throughput on a small shared machine drifts from minute to minute; what each proxy costs
per transaction drifts far less. So the bench also runs relay and gateway at one fixed
rate (`--cpu-rate`, 0 to skip; Linux only) and prints the CPU time (user + system) each
proxy process spent per transaction, and the gateway's extra over the relay.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# What the fixed-rate run measures per mode, in the order it is printed.
CPU_PATHS = ("relay", "gateway", "ingest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def process(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def pgbench(
    dsn: str, mode: str, seconds: int, clients: int, threads: int, rate: int = 0
) -> tuple[float, int]:
    """(TPS, transactions) of one pgbench -S run, at most `rate` TPS when given."""
    limit = ["-R", str(rate)] if rate else []
    out = subprocess.run(
        [
            "pgbench",
            "-n",
            "-S",
            "-c",
            str(clients),
            "-j",
            str(threads),
            *limit,
            "-T",
            str(seconds),
            "-M",
            mode,
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if not match or not done:
        raise RuntimeError(out)
    return float(match.group(1)), int(done.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Student's t at 97.5% for n - 1 degrees of freedom, n = 2..12 rounds (then about 2.2).
_T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20)


def spread(ratios: list[float]) -> str:
    """The per-round ratios' mean with its 95% confidence interval: how far the machine's
    drift leaves the figure uncertain."""
    if len(ratios) < 2:
        return ""
    t = _T975[min(len(ratios), len(_T975) + 1) - 2]
    half = t * statistics.stdev(ratios) / len(ratios) ** 0.5
    return f"   mean {statistics.mean(ratios):.2f} +/- {half:.2f} (95%)"


def children(pid: int) -> list[int]:
    """Child processes of `pid` (the gateway's audit ingest)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def cpu_per_transaction(
    pid: int,
    dsn: str,
    mode: str,
    settings: argparse.Namespace,
    state_dir: Path | None = None,
) -> tuple[float, float]:
    """Microseconds of CPU per transaction of a pgbench run at the fixed rate: of `pid`, and
    of its children until the audit journal in `state_dir` is ingested."""
    kids = children(pid)
    before, kids_before = cpu_seconds(pid), sum(map(cpu_seconds, kids))
    _, transactions = pgbench(
        dsn, mode, settings.seconds, settings.clients, settings.threads, settings.cpu_rate
    )
    spent = cpu_seconds(pid) - before
    if state_dir is not None:
        wait_for_ingest(state_dir)
    kids_spent = sum(map(cpu_seconds, kids)) - kids_before
    return spent * 1e6 / transactions, kids_spent * 1e6 / transactions


def wait_for_ingest(state_dir: Path, timeout: float = 300.0) -> float:
    """Seconds until the audit journal in `state_dir` is ingested (0 without a journal)."""
    journal, database = state_dir / "audit.journal", state_dir / "backstop.db"
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with journal.open("rb") as handle:
                header = handle.readline()
                size = handle.seek(0, os.SEEK_END)
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                known, position = db.execute(
                    "SELECT journal_id, position FROM journal_state"
                ).fetchone()
        except (FileNotFoundError, sqlite3.Error, TypeError):
            return time.monotonic() - started
        if known is not None and f'"{known}"'.encode() in header and position >= size:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"the audit journal in {state_dir} was not ingested in {timeout:.0f} s")


def with_port(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}127.0.0.1:{port}{parts.path}?sslmode=disable"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="simple,prepared")
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="run the gateway with this policy (default: the shipped policy.json)",
    )
    parser.add_argument(
        "--pass-through",
        action="store_true",
        help="run the gateway without classification, policy or audit",
    )
    parser.add_argument(
        "--cpu-rate",
        type=int,
        default=8000,
        help="also measure proxy CPU per transaction at this fixed TPS (0: skip)",
    )
    args = parser.parse_args()
    on_linux = Path("/proc/self/stat").exists()  # process CPU times from /proc
    measure_cpu = args.cpu_rate > 0 and on_linux

    local = None
    dsn = args.dsn
    if dsn is None:
        from backstop_core.localpg import LocalPostgres

        local = LocalPostgres(settings={"max_connections": "100"})
        info = local.start()
        dsn = info.dsn(database="postgres")
    try:
        parts = urlsplit(dsn)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        subprocess.run(["pgbench", "-i", "-q", "-s", "10", dsn], check=True, capture_output=True)
        relay_port, gw_port = free_port(), free_port()
        state = tempfile.mkdtemp(prefix="backstop-bench-")
        atexit.register(shutil.rmtree, state, ignore_errors=True)  # GBs of audit
        gw_cmd = [
            sys.executable,
            "-m",
            "backstop_tui.main",
            "--no-ui",
            "--upstream",
            dsn,
            "--listen",
            f"127.0.0.1:{gw_port}",
            "--state-dir",
            state,
        ]
        if args.policy:
            gw_cmd += ["--policy", str(args.policy)]
        env = dict(os.environ)
        if args.pass_through:
            env["BACKSTOP_PASS_THROUGH"] = "1"
        results: dict[tuple[str, str], list[float]] = {}
        ingest_waits: list[float] = []
        cpu: dict[tuple[str, str], list[float]] = {}
        relay_cmd = [
            sys.executable,
            str(ROOT / "bench" / "bare_relay.py"),
            str(relay_port),
            host,
            str(port),
        ]
        # CPU per transaction of each proxy process during the throughput runs.
        loaded: dict[tuple[str, str], list[float]] = {}
        with process(relay_cmd, relay_port) as relay_pid, process(gw_cmd, gw_port, env) as gw_pid:
            pids = {"relay": relay_pid, "gateway": gw_pid}
            paths = {
                "direct": dsn + ("&" if "?" in dsn else "?") + "sslmode=disable",
                "relay": with_port(dsn, relay_port),
                "gateway": with_port(dsn, gw_port),
            }
            for mode in args.modes.split(","):
                for path_dsn in paths.values():  # warm-up: connections, caches, plans
                    pgbench(path_dsn, mode, 1, args.clients, args.threads)
                wait_for_ingest(Path(state))
                for round_ in range(args.rounds):
                    # Odd rounds run the paths in reverse, so no path always runs after
                    # another (just after the ingest, or on a warmer cache).
                    order = list(paths.items())
                    for name, path_dsn in order[::-1] if round_ % 2 else order:
                        pid = pids.get(name) if on_linux else None
                        before = cpu_seconds(pid) if pid is not None else 0.0
                        tps, done = pgbench(
                            path_dsn, mode, args.seconds, args.clients, args.threads
                        )
                        results.setdefault((name, mode), []).append(tps)
                        if pid is not None:
                            spent = cpu_seconds(pid) - before
                            loaded.setdefault((name, mode), []).append(spent * 1e6 / done)
                        if name == "gateway":
                            ingest_waits.append(wait_for_ingest(Path(state)))
                for _ in range(args.rounds if measure_cpu else 0):
                    cost, _ = cpu_per_transaction(relay_pid, paths["relay"], mode, args)
                    cpu.setdefault(("relay", mode), []).append(cost)
                    cost, ingest = cpu_per_transaction(
                        gw_pid, paths["gateway"], mode, args, Path(state)
                    )
                    cpu.setdefault(("gateway", mode), []).append(cost)
                    cpu.setdefault(("ingest", mode), []).append(ingest)
        from backstop_core.native import status as native_status

        label = "pass-through" if args.pass_through else "policy + audit"
        print(
            f"pgbench -S -c {args.clients} -j {args.threads}, {args.rounds}x{args.seconds}s "
            f"per path, gateway with {label}\n{native_status().describe()}"
        )
        medians = {key: statistics.median(runs) for key, runs in results.items()}
        for mode in args.modes.split(","):
            direct, relay, gateway = (medians[(name, mode)] for name in paths)
            # Each round's gateway run against that round's relay run: the spread shows
            # how far drift on the machine moves the ratio.
            ratios = [
                g / r
                for r, g in zip(results[("relay", mode)], results[("gateway", mode)], strict=True)
            ]
            rounds = " ".join(f"{ratio:.2f}" for ratio in ratios)
            print(
                f"  {mode:9s} direct {direct:9.0f} tps   bare relay {relay:9.0f} tps   "
                f"gateway {gateway:9.0f} tps   gateway/relay {gateway / relay:.2f}   "
                f"gateway/direct {gateway / direct:.2f}   by round {rounds}{spread(ratios)}"
            )
        if loaded:
            print("proxy CPU per transaction in the runs above (user + system, median)")
            for mode in args.modes.split(","):
                relay, gateway = (statistics.median(loaded[(name, mode)]) for name in pids)
                print(
                    f"  {mode:9s} bare relay {relay:5.1f} us   gateway {gateway:5.1f} us   "
                    f"gateway extra {gateway - relay:5.1f} us   relay/gateway {relay / gateway:.2f}"
                )
        if cpu:
            print(f"proxy CPU per transaction at {args.cpu_rate} tps (user + system, median)")
            costs = {key: statistics.median(runs) for key, runs in cpu.items()}
            for mode in args.modes.split(","):
                relay, gateway, ingest = (costs[(name, mode)] for name in CPU_PATHS)
                print(
                    f"  {mode:9s} bare relay {relay:5.1f} us   gateway {gateway:5.1f} us   "
                    f"gateway extra {gateway - relay:5.1f} us   "
                    f"gateway/relay {gateway / relay:.2f}   "
                    f"audit ingest, later {ingest:5.1f} us"
                )
        if not args.pass_through:
            print(
                f"  audit ingest after each gateway run took {statistics.median(ingest_waits):.1f}"
                f" s (median; up to {max(ingest_waits):.1f} s), outside the measured runs"
            )
    finally:
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()
