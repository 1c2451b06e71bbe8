"""The approval queue: statements a person must allow, and the snapshot they are bound to.

A held statement becomes a pending approval in the state store. Operators decide through
the store (the CLI in another process, or the TUI in this one); a poller notices decisions
within a poll interval (50 ms) and wakes the waiting session. Nothing that arrives through
the gateway's SQL path can decide anything: decisions are only written by operator tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from backstop_core.events import ApprovalDecided, ApprovalPending, EventBus
from backstop_core.gateway.guard import Bound, Guard, GuardSession, Judgement, statement_hash
from backstop_core.gateway.session import Session, Verdict, refuse
from backstop_core.policy import Action, Policy
from backstop_core.sidecar.scheduler import NotReady, ReadySnapshot
from backstop_core.store import ApprovalRecord, Store, StoreError

log = logging.getLogger("backstop.approvals")


class SnapshotReadiness(Protocol):
    """Finds (or takes) a fresh snapshot of tables before a destructive statement
    (sidecar.scheduler.SnapshotScheduler)."""

    async def ensure_fresh(
        self,
        tables: Sequence[str],
        *,
        max_age_seconds: float,
        on_demand: bool,
        notify: Callable[[str], None],
        database: str | None = None,
        before: str = "the statement",
    ) -> ReadySnapshot: ...

    async def still_present(self, ready: ReadySnapshot, *, database: str | None = None) -> bool: ...


def _rows(judgement: Judgement) -> int | None:
    known = [c.row_estimate for c in judgement.statements if c.row_estimate is not None]
    return max(known) if known else None


def _table_rows(judgement: Judgement) -> int | None:
    known = [c.table_rows for c in judgement.statements if c.table_rows is not None]
    return max(known) if known else None


def describe(judgement: Judgement) -> str:
    tables = ", ".join(judgement.tables) or "no table"
    rows = _rows(judgement)
    estimate = f"~{rows:,} rows" if rows is not None else "rows unknown"
    return f"{judgement.operation} on {tables}, {estimate}"


class ApprovalQueue:
    """Implements the guard's HoldHandler: approvals and snapshot readiness."""

    def __init__(
        self,
        *,
        store: Store,
        bus: EventBus,
        policy: Callable[[], Policy],
        readiness: SnapshotReadiness | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        self.store = store
        self.bus = bus
        self.policy = policy
        self.readiness = readiness
        self.poll_interval = poll_interval
        self._waiters: dict[int, asyncio.Future[ApprovalRecord]] = {}
        self._someone_waits = asyncio.Event()  # set while _waiters is not empty
        self._version = 0
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Expire what a previous run left pending (it can never be executed), then poll."""
        expired = await self.store.approvals_expire_all_pending(
            "the gateway restarted before a decision; the client was disconnected"
        )
        self._version, _ = await self.store.approval_changes_since(0)
        self._poller = asyncio.ensure_future(self._poll())
        return expired

    async def stop(self) -> None:
        # Sessions closing now cancel their waits; let those record "cancelled" first.
        for _ in range(100):
            if not self._waiters:
                break
            await asyncio.sleep(0.01)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.store.approvals_expire_all_pending("the gateway stopped before a decision")

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def _poll(self) -> None:
        """Look for decisions made elsewhere (`backstop approve`) while a session waits for
        one; with none waiting, no query runs (each is a trip through the database thread,
        which costs the statements of every session under load)."""
        while True:
            if not self._waiters:
                self._someone_waits.clear()
                await self._someone_waits.wait()
            try:
                self._version, changed = await self.store.approval_changes_since(self._version)
                for record in changed:
                    self._wake(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling approvals failed")
            await asyncio.sleep(self.poll_interval)

    def _wake(self, record: ApprovalRecord) -> None:
        if record.status == "pending":
            return
        waiter = self._waiters.get(record.id)
        if waiter is not None and not waiter.done():
            waiter.set_result(record)

    async def decide(
        self, approval_id: int, *, approve: bool, decided_by: str, reason: str | None
    ) -> ApprovalRecord:
        """An operator's decision from this process (the TUI); wakes the session at once."""
        record = await self.store.approval_decide(
            approval_id, approve=approve, decided_by=decided_by, reason=reason
        )
        self._wake(record)
        return record

    # ------------------------------------------------------------------ holding

    async def hold(
        self,
        guard: Guard,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        bound: Bound,
        wal_lsn: str | None,
    ) -> Verdict:
        policy = self.policy()
        decision = judgement.decision
        ready: ReadySnapshot | None = None
        if decision.action.needs_snapshot:
            if self.readiness is None:
                refusal = (
                    f"{decision.reason} No snapshot store is configured (--store), so no "
                    "restore path can be verified; the statement is refused."
                )
                return self._refuse_now(guard, session, state, sql, judgement, refusal)
            tables = decision.needs_snapshot_tables or judgement.tables
            try:
                ready = await self.readiness.ensure_fresh(
                    tables,
                    database=state.database,
                    max_age_seconds=policy.snapshot.max_age_seconds,
                    on_demand=policy.snapshot.on_demand,
                    notify=session.send_notice,
                    before=describe(judgement),
                )
            except NotReady as exc:
                refusal = f"backstop: {describe(judgement)} refused: {exc.reason}"
                return self._refuse_now(guard, session, state, sql, judgement, refusal)
        snapshot = {
            "snapshot_id": ready.snapshot_id if ready else None,
            "snapshot_manifest_sha256": ready.manifest_sha256 if ready else None,
            "wal_lsn": wal_lsn,
        }
        if not decision.action.needs_approval:
            if ready is not None and not await self._present(ready, state):
                return self._refuse_now(
                    guard, session, state, sql, judgement, self._vanished(ready)
                )
            return guard.forward(session, state, sql, judgement, decision, **snapshot)
        fingerprint = bound.fingerprint(sql)
        window = policy.approval.auto_approve_window_seconds
        if window > 0:
            since = datetime.now(UTC) - timedelta(seconds=window)
            recent = await self.store.approval_find_recent(
                fingerprint=fingerprint, agent=state.agent, since=since
            )
            if recent is not None:
                auto = decision.__class__(
                    Action.ALLOW,
                    f"auto-approved:{recent.id}",
                    f"backstop: approved again automatically: approval {recent.id} by "
                    f"{recent.decided_by} covers the identical statement within {window} s",
                )
                return guard.forward(session, state, sql, judgement, auto, **snapshot)
        return await self._wait_for_operator(
            guard, session, state, sql, judgement, bound, fingerprint, ready, snapshot
        )

    async def _wait_for_operator(
        self,
        guard: Guard,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        bound: Bound,
        fingerprint: str,
        ready: ReadySnapshot | None,
        snapshot: dict[str, str | None],
    ) -> Verdict:
        policy = self.policy()
        decision = judgement.decision
        timeout = policy.approval.timeout_seconds
        key = guard.audit_start(session, state, sql, judgement, decision, **snapshot)
        record = await self.store.approval_create(
            agent=state.agent,
            client=state.client,
            session_id=session.session_id,
            sql=sql + _parameter_note(bound),
            sql_hash=statement_hash(sql),
            params_hash=statement_hash("", bound.values) if bound.values else None,
            operation=judgement.operation,
            tables=judgement.tables,
            risk=judgement.risk,
            classification_json=judgement.classification_json,
            rule=decision.rule,
            reason=decision.reason,
            expires_at=datetime.now(UTC) + timedelta(seconds=timeout),
            row_estimate=_rows(judgement),
            table_rows=_table_rows(judgement),
            snapshot_id=ready.snapshot_id if ready else None,
            snapshot_manifest_sha256=ready.manifest_sha256 if ready else None,
            snapshot_age_seconds=ready.age_seconds if ready else None,
            audit_key=key,
            fingerprint=fingerprint,
        )
        guard.store.audit_attach(key, approval_id=record.id)
        waiter: asyncio.Future[ApprovalRecord] = asyncio.get_running_loop().create_future()
        self._waiters[record.id] = waiter
        self._someone_waits.set()
        session.send_notice(
            f"backstop: waiting for approval {record.id} — {describe(judgement)}; "
            f"an operator must approve within {timeout:g} s",
            detail=f"Operators: backstop approve {record.id}  or  backstop deny {record.id} "
            "--reason TEXT",
        )
        self.bus.publish(
            ApprovalPending(
                approval_id=record.id,
                agent=state.agent,
                sql=sql,
                operation=judgement.operation,
                tables=judgement.tables,
                row_estimate=_rows(judgement),
                expires_in_seconds=float(timeout),
            )
        )
        self._notify_webhook(record, judgement)
        try:
            try:
                decided = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                decided = await self._expire(record.id)
        except asyncio.CancelledError:
            # The client went away while waiting: the statement must never run later.
            with contextlib.suppress(StoreError):
                await self.store.approval_set_status(
                    record.id, "cancelled", "the client disconnected while waiting"
                )
            guard.store.audit_finish(key, "cancelled", 0.0, "client disconnected")
            self.bus.publish(ApprovalDecided(record.id, "cancelled", None, "client disconnected"))
            raise
        finally:
            self._waiters.pop(record.id, None)
        self.bus.publish(
            ApprovalDecided(decided.id, decided.status, decided.decided_by, decided.decision_reason)
        )
        if decided.status == "approved":
            if not await self.store.approval_mark_used(decided.id):
                message = f"backstop: approval {decided.id} was already used; ask again"
                guard.store.audit_finish(key, "denied", 0.0, message)
                return refuse(message)
            if ready is not None and not await self._present(ready, state):
                message = self._vanished(ready)
                guard.store.audit_finish(key, "blocked", 0.0, message)
                return refuse(message)
            effects = judgement.statements if judgement.effects else ()
            return Verdict(True, on_complete=guard.completion(session, key, effects))
        if decided.status == "denied":
            why = decided.decision_reason or "no reason given"
            message = (
                f"backstop: approval {decided.id} for {describe(judgement)} was denied by "
                f"{decided.decided_by}: {why}"
            )
            guard.store.audit_finish(key, "denied", 0.0, why)
            return refuse(message)
        message = (
            f"backstop: approval {decided.id} for {describe(judgement)} timed out: no operator "
            f"decided within {timeout:g} s. The statement did not run; ask an operator and retry."
        )
        guard.store.audit_finish(key, "timed_out", 0.0, "approval timed out")
        return refuse(message, "57014")

    async def _expire(self, approval_id: int) -> ApprovalRecord:
        try:
            return await self.store.approval_set_status(
                approval_id, "expired", "no decision within the approval timeout"
            )
        except StoreError:
            # Decided in the very last moment: that decision stands.
            record = await self.store.approval_get(approval_id)
            assert record is not None
            return record

    async def _present(self, ready: ReadySnapshot, state: GuardSession) -> bool:
        assert self.readiness is not None
        try:
            return await self.readiness.still_present(ready, database=state.database)
        except Exception as exc:
            log.warning("could not re-check snapshot %s: %s", ready.snapshot_id, exc)
            return False

    @staticmethod
    def _vanished(ready: ReadySnapshot) -> str:
        return (
            f"backstop: snapshot {ready.snapshot_id} that this statement is bound to is no "
            "longer complete in the snapshot store, so there would be no restore path; the "
            "statement is refused. Retry to bind a fresh snapshot."
        )

    def _refuse_now(
        self,
        guard: Guard,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        message: str,
    ) -> Verdict:
        decision = judgement.decision.__class__(
            judgement.decision.action, judgement.decision.rule, message
        )
        return guard.refuse_statement(session, state, sql, judgement, decision, "blocked")

    def _notify_webhook(self, record: ApprovalRecord, judgement: Judgement) -> None:
        url = self.policy().approval.webhook_url
        if not url:
            return
        payload = {
            "text": (
                f"Backstop: approval {record.id} pending — {record.agent} wants "
                f"{describe(judgement)}. Approve with `backstop approve {record.id}`."
            ),
            "approval_id": record.id,
            "agent": record.agent,
            "operation": record.operation,
            "tables": list(record.tables),
            "row_estimate": record.row_estimate,
            "sql": record.sql,
            "expires_at": record.expires_at.isoformat(),
        }
        task = asyncio.ensure_future(asyncio.to_thread(_post_json, url, payload))
        self._background.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._background.discard)  # type: ignore[arg-type]


def _parameter_note(bound: Bound) -> str:
    """The bound values, shown to the operator with the SQL: they approve exactly this."""
    if not bound.values:
        return ""
    shown = []
    for number, value in enumerate(bound.values, 1):
        fmt = (
            bound.formats[0]
            if len(bound.formats) == 1
            else (bound.formats[number - 1] if number <= len(bound.formats) else 0)
        )
        if value is None:
            text = "NULL"
        elif fmt == 0:
            text = "'" + value.decode("utf-8", "replace").replace("'", "''") + "'"
        else:
            text = "binary 0x" + value.hex()
        if len(text) > 200:
            text = text[:197] + "..."
        shown.append(f"${number} = {text}")
    return "\n-- parameters: " + ", ".join(shown)


def _post_json(url: str, payload: dict[str, object]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
    except Exception as exc:  # a webhook failure never blocks or fails the statement
        log.warning("approval webhook %s failed: %s", url, exc)
