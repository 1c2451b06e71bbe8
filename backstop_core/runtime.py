"""Composes and supervises the gateway, policy, store, approvals and sidecar.

The runtime is the one object the UI and the CLI hold. It owns no UI and imports none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from backstop_core import pgconnect
from backstop_core.approvals import ApprovalQueue
from backstop_core.classify import Classifier
from backstop_core.config import Settings, SettingsError, effective_sslmode
from backstop_core.events import (
    EventBus,
    GatewayStarted,
    GatewayStopped,
    PolicyInvalid,
    PolicyReloaded,
)
from backstop_core.gateway.estimate import ControlConnections
from backstop_core.gateway.guard import CurrentPolicy, Guard
from backstop_core.gateway.server import GatewayServer, UpstreamTarget, client_tls_context
from backstop_core.gateway.session import PassThroughHook, StatementHook
from backstop_core.policy import Policy, PolicyError, PolicyWatcher, default_policy, load_policy
from backstop_core.recovery.drill import drill_loop
from backstop_core.recovery.wizard import Recovery
from backstop_core.sidecar.bypass import BypassMonitor, GatewayBackends, gateway_backends_of
from backstop_core.sidecar.objectstore import ObjectStoreError, open_object_store
from backstop_core.sidecar.scheduler import SnapshotScheduler
from backstop_core.store import ApprovalRecord, Store

log = logging.getLogger("backstop.runtime")


@dataclass(frozen=True)
class RuntimeStatus:
    """Health of a running instance, as `backstop status` and the dashboard header show it."""

    listen: str
    upstream: str
    upstream_reachable: bool | None
    sessions: int
    policy_version: str
    policy_path: str | None
    policy_error: str | None
    pending_approvals: int
    open_alerts: int
    pid: int
    started_at: float
    updated_at: float
    snapshot_health: tuple[dict[str, object], ...] = ()

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = 5000


def tune_gc() -> None:
    """Keep the garbage collector from stalling the event loop the gateway runs on; for the
    process that runs Backstop, once it has started.

    Everything built by start-up (modules, the runtime, a dashboard's widget tree) lives as
    long as the process: `gc.freeze()` takes it out of every later pass. Statements and
    rendering make many short-lived container objects; with the default first threshold
    (700) they are promoted into the old generations, whose full passes then stall the
    loop, and every session on it, for 100-300 ms at a time under load. A larger first
    threshold lets them die young.
    """
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)


def upstream_target(settings: Settings) -> UpstreamTarget:
    dsn = settings.upstream_dsn()
    root = settings.upstream_sslrootcert or (Path(dsn.sslrootcert) if dsn.sslrootcert else None)
    return UpstreamTarget(
        host=dsn.host, port=dsn.port, sslmode=effective_sslmode(settings), sslrootcert=root
    )


def load_configured_policy(settings: Settings) -> Policy:
    if settings.policy is None:
        return default_policy()
    try:
        return load_policy(settings.policy)
    except PolicyError as exc:
        raise SettingsError(f"policy: {exc}") from exc


class Runtime:
    """Everything Backstop runs, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus | None = None,
        pass_through: bool | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus or EventBus()
        self.target = upstream_target(settings)
        self._policy = CurrentPolicy(load_configured_policy(settings))
        if pass_through is None:
            pass_through = os.environ.get("BACKSTOP_PASS_THROUGH") == "1"
        self.pass_through = pass_through
        self.classifier = Classifier()
        self.control = ControlConnections(
            settings.upstream_dsn(), sslmode=effective_sslmode(settings)
        )
        self.store: Store | None = None
        self.guard: Guard | None = None
        self.approvals: ApprovalQueue | None = None
        self.watcher: PolicyWatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            try:
                tls = client_tls_context(settings.tls_cert, settings.tls_key)
            except (OSError, ValueError) as exc:
                raise SettingsError(f"tls_cert/tls_key: cannot load them: {exc}") from exc
        self._tls = tls
        self.gateway: GatewayServer | None = None
        self._stopped = asyncio.Event()
        self.started_at = time.time()
        self.policy_error: str | None = None
        self.upstream_reachable: bool | None = None
        self.metrics: Any = None
        self.bypass: BypassMonitor | None = None
        self.scheduler: SnapshotScheduler | None = None
        self.recovery: Recovery | None = None
        self._ingester: asyncio.subprocess.Process | None = None
        self._lock: IO[str] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._metrics_server: Any = None

    @property
    def policy(self) -> Policy:
        """The policy in force: the file's last valid version."""
        return self._policy.policy

    def current_policy(self) -> Policy:
        return self.policy

    def _policy_changed(self, policy: Policy) -> None:
        self._policy.policy = policy
        if self.policy_error is not None and self.store is not None:
            self._spawn(self.store.alert_close("policy", str(self.settings.policy)))
        self.policy_error = None
        log.info("policy reloaded: version %s", policy.version)
        self.bus.publish(PolicyReloaded(path=str(self.settings.policy), version=policy.version))

    def _policy_invalid(self, error: str) -> None:
        self.policy_error = error
        if self.store is not None:
            self._spawn(
                self.store.alert_open(
                    "policy",
                    str(self.settings.policy),
                    severity="warning",
                    title=f"policy file is invalid; version {self.policy.version} stays in force",
                    details_json=json.dumps({"error": error}),
                )
            )
        log.error("policy file is invalid, keeping version %s: %s", self.policy.version, error)
        self.bus.publish(PolicyInvalid(path=str(self.settings.policy), error=error))

    def _lock_state_dir(self) -> None:
        """One running gateway per state directory: a second one would expire the first's
        pending approvals and fight over its journal."""
        directory = self.settings.state_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle = open(directory / "gateway.lock", "a+")  # noqa: SIM115 - held while running
        except OSError as exc:
            raise SettingsError(
                f"state_dir: cannot use {directory}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise SettingsError(
                f"state_dir: {directory} is in use by a running gateway ({owner}); give this "
                "one its own --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    async def start(self) -> None:
        self._lock_state_dir()
        # The audit ingest runs in a child process at idle priority that waits while the
        # gateway is busy; the journal holds the records meanwhile. The gateway, the
        # journal's writer, only rotates the journal once the child has ingested it.
        inline = os.environ.get("BACKSTOP_INGEST_INLINE") == "1"
        try:
            self.store = await Store.open(self.settings.state_dir, ingest_interval=0.1)
        except OSError as exc:
            raise SettingsError(
                f"state_dir: cannot use {self.settings.state_dir}: {exc.strerror or exc}"
            ) from exc
        if not self.pass_through:
            self.store.use_spool()
        if not inline:
            self._ingester = await self._spawn_ingester()
            self._tasks.append(asyncio.ensure_future(self._watch_ingester()))
        self.store.start_ingest(elsewhere=not inline)
        hook: StatementHook
        if self.pass_through:
            hook = PassThroughHook()
        else:
            if self.settings.store:
                self.scheduler = self._start_scheduler(self.settings.store)
            self.approvals = ApprovalQueue(
                store=self.store,
                bus=self.bus,
                policy=self.current_policy,
                readiness=self.scheduler,
            )
            expired = await self.approvals.start()
            if expired:
                log.warning("%d approvals left pending by an earlier run were expired", expired)
            self.guard = Guard(
                classifier=self.classifier,
                policy=self._policy,
                store=self.store,
                bus=self.bus,
                control=self.control,
                holds=self.approvals,
            )
            hook = self.guard
        if self.settings.policy is not None:
            self.watcher = PolicyWatcher(
                self.settings.policy,
                self._policy_changed,
                self._policy_invalid,
                initial=self.policy,
            )
            self._tasks.append(asyncio.ensure_future(self.watcher.run()))
        self.gateway = GatewayServer(
            target=self.target,
            hook=hook,
            host=self.settings.listen_host,
            port=self.settings.listen_port,
            tls_context=self._tls,
            max_message_size=self.settings.max_message_size,
        )
        try:
            await self.gateway.start()
        except OSError as exc:
            await self._close_parts()
            raise SettingsError(f"listen: cannot listen on {self.settings.listen}: {exc}") from exc
        self._tasks.append(asyncio.ensure_future(self._report_status()))
        if not self.pass_through and self.policy.bypass.enabled:
            dsn = self.settings.upstream
            assert dsn is not None
            self.bypass = BypassMonitor(
                dsn,
                policy=self.current_policy,
                store=self.store,
                bus=self.bus,
                gateway_backends=self.own_backends,
                ssl=self.control.ssl,
            )
            self._tasks.append(asyncio.ensure_future(self.bypass.run()))
        if self.settings.metrics:
            from backstop_core.metrics import Metrics

            self.metrics = Metrics(self.bus)
            try:
                self._metrics_server = self.metrics.serve(self.settings.metrics)
            except OSError as exc:
                await self.stop()
                raise SettingsError(
                    f"metrics: cannot listen on {self.settings.metrics}: {exc}"
                ) from exc
            self._tasks.append(asyncio.ensure_future(self.metrics.refresh(self.status)))
        self.bus.publish(
            GatewayStarted(listen=self.gateway.address, upstream=self.target.describe())
        )

    def _start_scheduler(self, url: str) -> SnapshotScheduler:
        try:
            objects = open_object_store(url)
        except ObjectStoreError as exc:
            raise SettingsError(f"store: {exc}") from exc
        dsn = self.settings.upstream
        assert dsn is not None
        scheduler = SnapshotScheduler(dsn, objects, self.store, self.bus, self.current_policy)
        self._tasks.append(asyncio.ensure_future(scheduler.run()))
        assert self.store is not None
        self.recovery = Recovery(
            dsn,
            objects,
            self.store,
            policy=self.current_policy,
            state_dir=self.settings.state_dir,
        )
        # Restore drills every drills.interval_seconds of the current (hot-reloaded) policy;
        # the loop always runs, so a policy that turns drills on later starts them.
        # BACKSTOP_DRILL_INTERVAL, when set, overrides the policy (tests use it).
        override = os.environ.get("BACKSTOP_DRILL_INTERVAL")
        try:
            interval = float(override) if override else None
        except ValueError:
            raise SettingsError(
                f"BACKSTOP_DRILL_INTERVAL: {override!r} is not a number of seconds"
            ) from None
        self._tasks.append(
            asyncio.ensure_future(
                drill_loop(
                    dsn,
                    objects,
                    self.store,
                    self.current_policy,
                    interval_seconds=interval,
                    bus=self.bus,
                )
            )
        )
        return scheduler

    def snapshot_health(self) -> list[dict[str, object]]:
        """Health of every protected table's snapshots (empty without a snapshot store)."""
        if self.scheduler is None:
            return []
        return [table.as_dict() for table in self.scheduler.health()]

    async def snapshot_now(
        self, tables: Sequence[str] | None = None, group: str | None = None
    ) -> Any:
        """Take a snapshot now (the dashboard's `s`); raises when no store is configured."""
        if self.scheduler is None:
            raise RuntimeError("no snapshot store is configured (--store)")
        return await self.scheduler.snapshot_now(tables=tables, group=group)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def own_backends(self) -> GatewayBackends:
        """Backstop's own upstream connections: the bypass monitor never alerts on them."""
        if self.gateway is None:
            return GatewayBackends(pids=self.control.pids())
        return gateway_backends_of(
            self.gateway.sessions.values(),
            extra_pids=self.control.pids()
            | self.gateway.recently_closed_pids()
            | pgconnect.own_pids(),
        )

    async def status(self) -> RuntimeStatus:
        """What is running and how healthy it is, now."""
        pending = open_alerts = 0
        if self.store is not None:
            pending = len(await self.store.approvals_list(status="pending", limit=10000))
            open_alerts = len(await self.store.alerts_list(status="open", limit=10000))
        return RuntimeStatus(
            listen=self.gateway.address if self.gateway else self.settings.listen,
            upstream=self.target.describe(),
            upstream_reachable=self.upstream_reachable,
            sessions=len(self.gateway.sessions) if self.gateway else 0,
            policy_version=self.policy.version,
            policy_path=str(self.settings.policy) if self.settings.policy else None,
            policy_error=self.policy_error,
            pending_approvals=pending,
            open_alerts=open_alerts,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            snapshot_health=tuple(self.snapshot_health()),
        )

    async def _report_status(self, interval: float = 2.0) -> None:
        """Keeps `<state_dir>/status.json` fresh for `backstop status` in other processes."""
        path = self.settings.state_dir / "status.json"
        while True:
            try:
                self.upstream_reachable = await self._probe_upstream()
                status = await self.status()
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(status.as_dict(), default=str))
                temporary.replace(path)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not write the status file")
            await asyncio.sleep(interval)

    async def _probe_upstream(self) -> bool:
        target = self.target
        try:
            async with asyncio.timeout(2):
                if target.is_unix:
                    _, writer = await asyncio.open_unix_connection(
                        os.path.join(target.host, f".s.PGSQL.{target.port}")
                    )
                else:
                    _, writer = await asyncio.open_connection(target.host, target.port)
            writer.close()
            return True
        except (OSError, TimeoutError):
            return False

    async def decide(
        self, approval_id: int, *, approve: bool, decided_by: str, reason: str | None = None
    ) -> ApprovalRecord:
        """An operator's decision, from the UI of this process."""
        if self.approvals is None:
            raise RuntimeError("approvals are not running")
        return await self.approvals.decide(
            approval_id, approve=approve, decided_by=decided_by, reason=reason
        )

    async def _spawn_ingester(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backstop_core.ingest",
            str(self.settings.state_dir),
            stdin=asyncio.subprocess.DEVNULL,
        )

    async def _watch_ingester(self) -> None:
        """While the child ingests, the gateway never does (see `backstop_core.ingest` for
        how the child paces itself). A child that dies is started again; if it cannot be,
        the gateway ingests by itself."""
        while self._ingester is not None:
            code = await self._ingester.wait()
            # A stop signal sent to the whole process group ends the child first: wait a
            # moment, so a shutdown cancels this before it reports a restart.
            await asyncio.sleep(1.0)
            log.warning("the audit ingest process exited (code %s); starting it again", code)
            try:
                self._ingester = await self._spawn_ingester()
            except OSError as exc:
                log.warning("cannot start the audit ingest process (%s); ingesting here", exc)
                self._ingester = None
                if self.store is not None:
                    await self.store.stop_ingest()
                    self.store.start_ingest()

    async def _close_parts(self) -> None:
        if self.approvals is not None:
            await self.approvals.stop()
            self.approvals = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.control.close()
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                await self.scheduler.close()
            self.scheduler = None
        if self._ingester is not None:
            with contextlib.suppress(ProcessLookupError):
                self._ingester.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ingester.wait(), 5)
            self._ingester = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
            self.bus.publish(GatewayStopped(listen=self.gateway.address))
        await self._close_parts()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        with contextlib.suppress(OSError):
            (self.settings.state_dir / "status.json").unlink()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
