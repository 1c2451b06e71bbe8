"""CPU per statement of the gateway's own code, without sockets or a server.

    python bench/bench_hotpath.py [--statements 200000]

Drives one session through the pgbench -S exchange (the simple protocol with a literal,
and Bind/Describe/Execute/Sync of a prepared statement) with recorded server answers, and
prints the process CPU time per statement for the pass-through hook and for the guard
(classification, policy, the audit journal on a real file). What the kernel and the event
loop cost (about as much as the relay itself) is not in these figures; what is, is all
that the gateway adds over a relay, measured without the machine's noise, so a change on
the hot path can be judged in seconds. `bench_gateway.py` measures the whole path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backstop_core.classify import Classifier
from backstop_core.events import EventBus
from backstop_core.gateway.guard import Guard
from backstop_core.gateway.session import PassThroughHook, Phase, Session, StatementHook
from backstop_core.native import status as native_status
from backstop_core.policy import load_policy
from backstop_core.store import Store

ROOT = Path(__file__).resolve().parent.parent
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


STARTUP_BODY = (
    struct.pack("!i", 196608)
    + b"".join(
        cstr(s) for s in ("user", "postgres", "database", "postgres", "application_name", "pgbench")
    )
    + b"\0"
)
CLIENT_STARTUP = struct.pack("!i", len(STARTUP_BODY) + 4) + STARTUP_BODY
SERVER_STARTUP = b"".join(
    (
        message(b"R", struct.pack("!i", 0)),
        message(b"S", cstr("server_version") + cstr("16.0")),
        message(b"S", cstr("standard_conforming_strings") + cstr("on")),
        message(b"S", cstr("client_encoding") + cstr("UTF8")),
        message(b"K", struct.pack("!i", 4242) + b"\1\2\3\4"),
        message(b"Z", b"I"),
    )
)
PARSE = message(b"P", cstr("P0_1") + cstr(SELECT + "$1") + struct.pack("!h", 0)) + message(
    b"S", b""
)
PARSED = message(b"1", b"") + message(b"Z", b"I")
ANSWER = (
    message(
        b"T", struct.pack("!h", 1) + cstr("abalance") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
    )
    + message(b"D", struct.pack("!h", 1) + struct.pack("!i", 1) + b"0")
    + message(b"C", cstr("SELECT 1"))
    + message(b"Z", b"I")
)
PREPARED_ANSWER = message(b"2", b"") + ANSWER


def execute_prepared(aid: int) -> bytes:
    value = str(aid).encode()
    bind = (
        cstr("")
        + cstr("P0_1")
        + struct.pack("!hh", 0, 1)
        + struct.pack("!i", len(value))
        + value
        + struct.pack("!h", 0)
    )
    return (
        message(b"B", bind)
        + message(b"D", b"P\0")
        + message(b"E", b"\0" + struct.pack("!i", 0))
        + message(b"S", b"")
    )


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


def run(session: Session, mode: str, count: int) -> float:
    """CPU seconds per statement over `count` statements."""
    if mode == "simple":
        requests = [message(b"Q", cstr(f"{SELECT}{aid};")) for aid in range(1, 1001)]
        answer = ANSWER
    else:
        session.client_data(PARSE)
        session.server_data(PARSED)
        requests = [execute_prepared(aid) for aid in range(1, 1001)]
        answer = PREPARED_ANSWER
    client, server = session.client_data, session.server_data
    started = time.process_time()
    for i in range(count):
        client(requests[i % 1000])
        server(answer)
    return (time.process_time() - started) / count


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
        policy = load_policy(args.policy)
        guard = Guard(classifier=Classifier(), policy=lambda: policy, store=store, bus=EventBus())
        hooks: dict[str, StatementHook] = {"pass-through": PassThroughHook(), "guard": guard}
        results: dict[tuple[str, str], list[float]] = {}
        for mode in ("simple", "prepared"):
            sessions = {name: await ready_session(hook) for name, hook in hooks.items()}
            for session, _ in sessions.values():
                run(session, mode, 2000)  # warm-up: caches, lanes, the journal file
            for _ in range(args.rounds):
                for name, (session, _) in sessions.items():
                    cost = run(session, mode, args.statements // args.rounds)
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
