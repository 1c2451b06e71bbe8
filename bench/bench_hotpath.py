"""CPU per statement of the gateway's own code, without sockets or a server.

    python bench/bench_hotpath.py [--statements 200000]

Drives one session through the pgbench -S exchange (the simple protocol with a literal,
and Bind/Describe/Execute/Sync of a prepared statement) with recorded server answers, and
prints the process CPU time per statement for the pass-through hook and for the guard
(classification, policy, the audit spool and journal on real files). What the kernel and
the event loop cost (about as much as the relay itself) is not in these figures; what is,
is all that the gateway adds over a relay, measured without the machine's noise, so a
change on the hot path can be judged in seconds. `bench_gateway.py` measures the whole path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backstop_core.classify import Classifier
from backstop_core.events import EventBus
from backstop_core.gateway.guard import CurrentPolicy, Guard
from backstop_core.gateway.session import PassThroughHook, Phase, Session, StatementHook
from backstop_core.native import status as native_status
from backstop_core.policy import load_policy
from backstop_core.store import Store
from tests.unit import pgwire_traffic as t

ROOT = Path(__file__).resolve().parent.parent
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


# The pgbench -S exchange, byte for byte as libpq and PostgreSQL write it.
CLIENT_STARTUP = t.startup(
    [("user", "postgres"), ("database", "postgres"), ("application_name", "pgbench")]
)
SERVER_STARTUP = b"".join(
    (
        t.auth_ok(),
        t.parameter_status("server_version", "16.0"),
        t.parameter_status("standard_conforming_strings", "on"),
        t.parameter_status("client_encoding", "UTF8"),
        t.backend_key_data(4242, b"\1\2\3\4"),
        t.ready("I"),
    )
)
PARSE = t.parse("P0_1", SELECT + "$1") + t.sync()
PARSED = t.parse_complete() + t.ready("I")
ANSWER = (
    t.row_description("abalance") + t.data_row(b"0") + t.command_complete("SELECT 1") + t.ready()
)
PREPARED_ANSWER = t.bind_complete() + ANSWER


def execute_prepared(aid: int) -> bytes:
    return t.bind("", "P0_1", (str(aid).encode(),)) + t.describe("P") + t.execute() + t.sync()


class Peer:
    def __init__(self) -> None:
        self.sent = 0

    def write(self, data: bytes) -> None:
        self.sent += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class IO:
    def __init__(self) -> None:
        self.client = Peer()
        self.upstream = Peer()

    def start_client_tls(self) -> Awaitable[None] | None:
        return None

    async def open_upstream(self, session: Session) -> Peer:
        return self.upstream

    def cancel(self, pid: int, secret: bytes) -> None:
        pass

    def register_backend(self, session: Session, pid: int, secret: bytes) -> None:
        pass

    def unregister_backend(self, session: Session) -> None:
        pass


async def ready_session(hook: StatementHook) -> tuple[Session, IO]:
    io = IO()
    session = Session(io=io, hook=hook, session_id="bench", client_address="127.0.0.1:1")
    session.client_data(CLIENT_STARTUP)
    for _ in range(5):
        await asyncio.sleep(0)
    session.server_data(SERVER_STARTUP)
    if session.phase is not Phase.READY:
        raise SystemExit("the session did not reach READY")
    return session, io


def run(session: Session, io: IO, mode: str, count: int) -> float:
    """CPU seconds per statement over `count` statements, each of them forwarded."""
    if mode == "simple":
        requests = [t.query(f"{SELECT}{aid};") for aid in range(1, 1001)]
        answer = ANSWER
    else:
        requests = [execute_prepared(aid) for aid in range(1, 1001)]
        answer = PREPARED_ANSWER
    client, server = session.client_data, session.server_data
    forwarded = io.upstream.sent
    started = time.process_time()
    for i in range(count):
        client(requests[i % 1000])
        server(answer)
    spent = time.process_time() - started
    if io.upstream.sent - forwarded != count:
        raise SystemExit(f"not every {mode} statement was forwarded: check the policy")
    return spent / count


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--statements", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policy", type=Path, default=ROOT / "policy.json")
    args = parser.parse_args()
    print(native_status().describe())
    with tempfile.TemporaryDirectory(prefix="backstop-hotpath-") as state:
        store = await Store.open(Path(state))
        store.use_spool()  # as the gateway does
        policy = load_policy(args.policy)
        guard = Guard(
            classifier=Classifier(), policy=CurrentPolicy(policy), store=store, bus=EventBus()
        )
        hooks: dict[str, StatementHook] = {"pass-through": PassThroughHook(), "guard": guard}
        results: dict[tuple[str, str], list[float]] = {}
        for mode in ("simple", "prepared"):
            sessions = {name: await ready_session(hook) for name, hook in hooks.items()}
            for session, io in sessions.values():
                if mode == "prepared":
                    session.client_data(PARSE)
                    session.server_data(PARSED)
                run(session, io, mode, 2000)  # warm-up: caches, lanes, the journal file
            for _ in range(args.rounds):
                for name, (session, io) in sessions.items():
                    cost = run(session, io, mode, args.statements // args.rounds)
                    results.setdefault((name, mode), []).append(cost)
                store.journal.flush()
        await store.close()
    print(f"CPU per statement, median of {args.rounds} rounds, no sockets:")
    for mode in ("simple", "prepared"):
        plain, guarded = (statistics.median(results[(name, mode)]) * 1e6 for name in hooks)
        print(
            f"  {mode:9s} pass-through {plain:5.2f} us   guard {guarded:5.2f} us   "
            f"guard extra {guarded - plain:5.2f} us"
        )


if __name__ == "__main__":
    asyncio.run(main())
