"""The recovery wizard: table → snapshot → restore (with progress) → validation checks one by
one → diff summary → copy-back SQL, saved to a file.

Restore never touches the original table: the core restores into a side table, validates it,
and only then offers the SQL that copies rows back, which the operator runs themselves.

What the wizard needs from the core: `runtime.recovery`, an object with the methods of
`backstop_core.recovery.Recovery` (looked up with getattr, None without a snapshot store):

    async tables() -> dict[str, list[ManifestSummary]]      (optional; else the state
    async snapshots(table) -> list[ManifestSummary]          store's snapshot record)
    async restore(table, snapshot_id, *, progress: Callable[[RestoreProgress], None])
        -> RestoreResult
    validate(restored) -> AsyncIterator[ValidationCheck]
    async diff(restored) -> DiffSummary
    async copy_back_sql(restored) -> str   (a plain function returning str will do too)

Only the attributes named in the protocols below are read.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    ContentSwitcher,
    DataTable,
    Footer,
    Input,
    Label,
    OptionList,
    ProgressBar,
    Static,
)
from textual.widgets.option_list import Option

from backstop_tui.widgets.formatting import BAD, DIM, GOOD, duration, rows, stamp
from backstop_tui.widgets.sql_view import SqlView
from backstop_tui.widgets.status_bar import HeaderState, StatusBar

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp


class RestoreProgress(Protocol):
    phase: str  # "downloading", "loading", "indexing", ...
    rows_done: int
    rows_total: int | None


class RestoreResult(Protocol):
    table: str  # schema.table restored from
    snapshot_id: str
    restored_table: str  # <schema>.<table>__restored_<id>
    rows: int
    seconds: float


class ValidationCheck(Protocol):
    name: str  # "row count", "checksum", "columns and types", "primary key unique"
    passed: bool
    detail: str


class DiffSummary(Protocol):
    only_in_restored: int  # rows the live table lost since the snapshot
    only_in_current: int  # rows added since the snapshot
    changed: int  # same primary key, different values
    unchanged: int
    sample: Sequence[str]  # a few human-readable example lines


class Recovery(Protocol):
    async def restore(
        self, table: str, snapshot_id: str, *, progress: Callable[[Any], None]
    ) -> Any: ...
    def validate(self, restored: Any) -> AsyncIterator[Any]: ...
    async def diff(self, restored: Any) -> Any: ...
    def copy_back_sql(self, restored: Any) -> str: ...


STEPS = ("Table", "Snapshot", "Restore", "Validate", "Diff", "Copy-back")
STEP_IDS = ("step-table", "step-snapshot", "step-restore", "step-validate", "step-diff", "step-sql")

NO_STORE = (
    "Recovery comes with snapshots.\n\n"
    "No snapshot store is configured (start Backstop with --store file:///path or "
    "--store s3://bucket/prefix), so there is nothing to restore from. With snapshots and "
    "the runtime's recovery service, this wizard walks through:\n\n"
)
NO_SERVICE = (
    "Recovery comes with snapshots.\n\n"
    "Snapshots are being taken (see 4), but this runtime offers no recovery service yet "
    "(runtime.recovery), so the wizard cannot restore from here. Once it does, the wizard "
    "walks through:\n\n"
)
STEPS_TEXT = (
    "  1. Table      pick a protected table\n"
    "  2. Snapshot   pick one of its snapshots (time, rows, size, WAL position)\n"
    "  3. Restore    load it into <table>__restored_<id>, never touching the original\n"
    "  4. Validate   row count, checksum, columns and types, primary key unique\n"
    "  5. Diff       rows lost, added and changed since the snapshot\n"
    "  6. Copy-back  the SQL that puts rows back, to review and save to a file"
)


def missing_text(runtime: object) -> str:
    """Why the wizard cannot run, for this runtime."""
    has_store = getattr(runtime, "scheduler", None) is not None
    return (NO_SERVICE if has_store else NO_STORE) + STEPS_TEXT


def steps_text(current: int, available: bool) -> Text:
    text = Text(" ")
    for index, name in enumerate(STEPS):
        if index:
            text.append("  ›  ", style=DIM)
        label = f"{index + 1} {name}"
        if not available:
            text.append(label, style=DIM)
        elif index < current:
            text.append(f"✓ {label}", style=GOOD)
        elif index == current:
            text.append(f" {label} ", style="bold reverse")
        else:
            text.append(label, style=DIM)
    return text


class SaveSqlScreen(ModalScreen[Path | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="save-dialog"):
            yield Label("Save the copy-back SQL to", id="save-title")
            yield Input(value=str(self.default), id="save-path")
            yield Label("Enter saves · Esc cancels", classes="dim")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        self.dismiss(Path(value).expanduser() if value else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class RecoveryScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "next", "Next"),
        Binding("backspace", "back", "Back"),
        Binding("w", "save", "Save SQL"),
        Binding("ctrl+n", "restart", "Start over"),
    ]

    class Progressed(Message):
        def __init__(self, progress: Any) -> None:
            super().__init__()
            self.progress = progress

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, RecoveryScreen.Progressed)

    class Checked(Message):
        def __init__(self, check: Any) -> None:
            super().__init__()
            self.check = check

    class Failed(Message):
        def __init__(self, stage: str, error: str) -> None:
            super().__init__()
            self.stage = stage
            self.error = error

    class Reached(Message):
        """A stage finished: "restored", "validated", "diffed" or "sql", with its value."""

        def __init__(self, stage: str, value: Any) -> None:
            super().__init__()
            self.stage = stage
            self.value = value

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.table: str | None = None
        self.snapshot: Any = None  # a SnapshotRecord or the object store's summary
        self.snapshots: tuple[Any, ...] = ()
        self.restored: Any = None
        self.checks: list[Any] = []
        self.validated = False
        self.sql: str | None = None
        self.busy = False

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    @property
    def recovery(self) -> Recovery | None:
        return getattr(self.backstop.runtime, "recovery", None)

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield Static(id="wizard-steps")
        with Vertical(id="wizard-panel", classes="panel") as panel:
            panel.border_title = "Recovery"
            yield Static(missing_text(self.backstop.runtime), id="recovery-missing")
            with ContentSwitcher(initial=STEP_IDS[0], id="wizard"):
                with Vertical(id="step-table"):
                    yield Static("Which table went wrong?", classes="step-help")
                    yield OptionList(id="tables")
                with Vertical(id="step-snapshot"):
                    yield Static(id="snapshot-help", classes="step-help")
                    table: DataTable[Text | str] = DataTable(cursor_type="row", id="snapshots")
                    table.add_columns("Snapshot", "Taken", "Age", "Rows", "WAL LSN")
                    yield table
                with Vertical(id="step-restore"):
                    yield Static(id="restore-help", classes="step-help")
                    yield ProgressBar(total=None, show_eta=False, id="restore-progress")
                    yield Static(id="restore-phase")
                with VerticalScroll(id="step-validate"):
                    yield Static(id="checks")
                with VerticalScroll(id="step-diff"):
                    yield Static(id="diff")
                with VerticalScroll(id="step-sql"):
                    yield Static(id="sql-help", classes="step-help")
                    yield SqlView(id="copy-back-sql")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.backstop, "header", self._show_header)
        available = self.recovery is not None
        self.query_one("#recovery-missing").display = not available
        self.query_one("#wizard").display = available
        self._show_steps()
        if available:
            self.load_tables()

    def _show_header(self, state: HeaderState) -> None:
        self.query_one(StatusBar).show(state)

    def _show_steps(self) -> None:
        self.query_one("#wizard-steps", Static).update(
            steps_text(self.step, self.recovery is not None)
        )

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("next", "back", "save", "restart"):
            if self.recovery is None:
                return False
            if action == "save" and self.sql is None:
                return None
            if action == "back" and self.step == 0:
                return None
            if action == "next" and (
                self.step in (2, 5) or (self.step == 3 and not self.validated)
            ):
                return None
        return True

    def _go(self, step: int) -> None:
        self.step = step
        self.refresh_bindings()
        self.query_one("#wizard", ContentSwitcher).current = STEP_IDS[step]
        self._show_steps()
        focus = {0: "#tables", 1: "#snapshots"}.get(step)
        if focus:
            self.query_one(focus).focus()

    # ------------------------------------------------------------------ step 1: table

    @work(exclusive=True, group="tables", exit_on_error=False)
    async def load_tables(self) -> None:
        try:
            by_table = await self._snapshots_by_table()
        except Exception as exc:
            self.post_message(self.Failed("listing snapshots", str(exc)))
            return
        options = self.query_one("#tables", OptionList)
        options.clear_options()
        now = self.backstop.clock()
        for name, found in by_table.items():
            newest = max(s.started_at for s in found)
            label = Text(f"{name:<32}", style="bold")
            label.append(
                f"  {len(found)} snapshot{'s' if len(found) != 1 else ''}, newest "
                f"{duration(now - newest.timestamp())} ago",
                style=DIM,
            )
            options.add_option(Option(label, id=name))
        if not by_table:
            options.add_option(Option(Text("no snapshots on record", style=DIM), disabled=True))
        else:
            options.highlighted = 0
        options.focus()

    async def _snapshots_by_table(self) -> dict[str, list[Any]]:
        """table -> its snapshots, from the recovery service (the object store itself) when
        it lists them, else from the state store's record."""
        recovery = self.recovery
        lister = getattr(recovery, "tables", None)
        if lister is not None:
            return dict(await lister())
        store = self.backstop.runtime.store
        if store is None:
            return {}
        found: dict[str, list[Any]] = {}
        for record in await store.snapshots_list(status="ok", limit=1000):
            for name in record.tables:
                found.setdefault(name, []).append(record)
        return dict(sorted(found.items()))

    @on(OptionList.OptionSelected, "#tables")
    def _table_chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is None or self.busy:
            return
        self.table = event.option.id
        self.load_snapshots(self.table)

    # ------------------------------------------------------------------ step 2: snapshot

    @work(exclusive=True, group="snapshots", exit_on_error=False)
    async def load_snapshots(self, table: str) -> None:
        try:
            lister = getattr(self.recovery, "snapshots", None)
            if lister is not None:
                found = list(await lister(table))
            else:
                found = (await self._snapshots_by_table()).get(table, [])
        except Exception as exc:
            self.post_message(self.Failed("listing snapshots", str(exc)))
            return
        found.sort(key=lambda s: s.started_at, reverse=True)
        self.snapshots = tuple(found)
        grid = self.query_one("#snapshots", DataTable)
        grid.clear()
        now = self.backstop.clock()
        for snapshot in found:
            complete = getattr(snapshot, "complete", True)
            grid.add_row(
                snapshot.id if complete else Text(f"{snapshot.id} (incomplete)", style=BAD),
                stamp(snapshot.started_at),
                duration(now - snapshot.started_at.timestamp()),
                rows(getattr(snapshot, "rows", None)),
                getattr(snapshot, "wal_lsn", None) or "—",
                key=snapshot.id,
            )
        self.query_one("#snapshot-help", Static).update(
            f"Restore {table} from which snapshot? (newest first)"
        )
        self._go(1)

    @on(DataTable.RowSelected, "#snapshots")
    def _snapshot_chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if self.busy or not self.snapshots:
            return
        chosen = self.snapshots[event.cursor_row]
        if not getattr(chosen, "complete", True):
            problems = "; ".join(getattr(chosen, "problems", ())) or "parts are missing"
            self.notify(f"Snapshot {chosen.id} is incomplete: {problems}", severity="error")
            return
        self.snapshot = chosen
        self._start_restore()

    # ------------------------------------------------------------------ step 3: restore

    def _start_restore(self) -> None:
        assert self.table is not None and self.snapshot is not None
        self.restored = None
        self.checks = []
        self.validated = False
        self.sql = None
        self.query_one("#restore-help", Static).update(
            Text.assemble(
                ("Restoring ", ""),
                (self.table, "bold"),
                (" from snapshot ", ""),
                (self.snapshot.id, "bold"),
                (" into a side table. The original table is not touched.", ""),
            )
        )
        self.query_one("#restore-phase", Static).update(Text("starting…", style=DIM))
        self.query_one(ProgressBar).update(total=None, progress=0)
        self._go(2)
        self.run_restore(self.table, self.snapshot.id)

    @work(exclusive=True, group="restore", exit_on_error=False)
    async def run_restore(self, table: str, snapshot_id: str) -> None:
        recovery = self.recovery
        assert recovery is not None
        self.busy = True
        try:

            def progress(update: Any) -> None:
                self.post_message(self.Progressed(update))  # thread-safe: restore may use one

            result = await recovery.restore(table, snapshot_id, progress=progress)
            self.post_message(self.Reached("restored", result))
            async for check in recovery.validate(result):
                self.post_message(self.Checked(check))
            self.post_message(self.Reached("validated", None))
        except Exception as exc:
            self.post_message(self.Failed("restore", str(exc) or type(exc).__name__))
        finally:
            self.busy = False

    @on(Progressed)
    def _progressed(self, message: Progressed) -> None:
        progress = message.progress
        total = getattr(progress, "rows_total", None)
        done = int(getattr(progress, "rows_done", 0))
        bar = self.query_one(ProgressBar)
        bar.update(total=total, progress=done)
        phase = getattr(progress, "phase", "")
        of = f" of {rows(total)}" if total else ""
        self.query_one("#restore-phase", Static).update(f"{phase}: {rows(done)}{of} rows")

    @on(Failed)
    def _failed(self, message: Failed) -> None:
        self.query_one("#restore-phase", Static).update(
            Text(f"{message.stage} failed: {message.error}", style=BAD)
        )
        self.notify(message.error, title=f"Recovery {message.stage} failed", severity="error")

    # ------------------------------------------------------------------ step 4: validate

    @on(Reached)
    def _reached(self, message: Reached) -> None:
        if message.stage == "restored":
            self.restored = message.value
            total = getattr(self.restored, "rows", None)
            bar = self.query_one(ProgressBar)
            bar.update(total=total or 1, progress=total or 1)
            self._show_checks()
            self._go(3)
        elif message.stage == "validated":
            self.validated = bool(self.checks) and all(c.passed for c in self.checks)
            self.refresh_bindings()
            self._show_checks(done=True)
        elif message.stage == "diffed":
            self._show_diff(message.value)
            self._go(4)
        elif message.stage == "sql":
            self.sql = str(message.value)
            self.refresh_bindings()
            self._show_sql()
            self._go(5)

    @on(Checked)
    def _checked(self, message: Checked) -> None:
        self.checks.append(message.check)
        self._show_checks()

    def _show_checks(self, done: bool = False) -> None:
        restored = self.restored
        text = Text()
        if restored is not None:
            text.append("Restored into ", style=DIM)
            text.append(str(getattr(restored, "restored_table", "?")), style="bold")
            seconds = getattr(restored, "seconds", None)
            took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
            text.append(f": {rows(getattr(restored, 'rows', None))} rows{took}\n\n", style=DIM)
        text.append("Validation\n", style="bold underline")
        for check in self.checks:
            mark, style = ("✓", GOOD) if check.passed else ("✗", BAD)
            text.append(f" {mark} ", style=style)
            text.append(f"{check.name:<22}", style="bold")
            text.append(f" {check.detail}\n")
        if not done:
            text.append(" … checking\n", style=DIM)
        elif self.validated:
            text.append("\nAll checks passed. Enter shows what differs from the live table.", GOOD)
        else:
            text.append(
                "\nValidation failed: the restored table is not trustworthy, so no copy-back "
                "SQL is offered. Pick another snapshot (Backspace).",
                style=BAD,
            )
        self.query_one("#checks", Static).update(text)

    # ------------------------------------------------------------------ step 5: diff

    @work(exclusive=True, group="diff", exit_on_error=False)
    async def load_diff(self) -> None:
        recovery = self.recovery
        assert recovery is not None
        try:
            summary = await recovery.diff(self.restored)
        except Exception as exc:
            self.post_message(self.Failed("diff", str(exc)))
            return
        self.post_message(self.Reached("diffed", summary))

    def _show_diff(self, summary: Any) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", width=30)
        grid.add_column(justify="right")
        current = self.table or "the live table"
        grid.add_row(f"Rows lost from {current}", rows(getattr(summary, "only_in_restored", None)))
        grid.add_row("Rows added since the snapshot", rows(getattr(summary, "only_in_current", 0)))
        grid.add_row("Rows changed", rows(getattr(summary, "changed", None)))
        grid.add_row("Rows unchanged", rows(getattr(summary, "unchanged", None)))
        text = Text("Difference between the snapshot and the live table\n", style="bold underline")
        body = Table.grid()
        body.add_row(text)
        body.add_row(grid)
        sample = list(getattr(summary, "sample", ()) or ())
        if sample:
            body.add_row(Text("\nFor example", style="bold"))
            for line in sample[:10]:
                body.add_row(Text(f"  {line}", style=DIM))
        body.add_row(Text("\nEnter shows the copy-back SQL.", style=DIM))
        self.query_one("#diff", Static).update(body)

    # ------------------------------------------------------------------ step 6: copy-back

    @work(exclusive=True, group="sql", exit_on_error=False)
    async def load_sql(self) -> None:
        recovery = self.recovery
        assert recovery is not None
        try:
            sql = recovery.copy_back_sql(self.restored)
            if inspect.isawaitable(sql):
                sql = await sql
        except Exception as exc:
            self.post_message(self.Failed("copy-back SQL", str(exc)))
            return
        self.post_message(self.Reached("sql", sql))

    def _show_sql(self) -> None:
        self.query_one("#sql-help", Static).update(
            Text.assemble(
                ("Review this SQL and run it yourself (psql, in one transaction). ", ""),
                ("w", "bold"),
                (" saves it to a file.", ""),
            )
        )
        self.query_one(SqlView).show(self.sql or "")

    def default_sql_path(self) -> Path:
        table = (self.table or "table").replace(".", "_")
        snap = self.snapshot.id if self.snapshot is not None else "snapshot"
        return Path.cwd() / f"restore_{table}_{snap}.sql"

    def action_save(self) -> None:
        if self.sql is None:
            self.notify("No copy-back SQL yet: finish the earlier steps.", severity="warning")
            return

        def save(path: Path | None) -> None:
            if path is None or self.sql is None:
                return
            try:
                path.write_text(self.sql + ("\n" if not self.sql.endswith("\n") else ""))
            except OSError as exc:
                self.notify(str(exc), title="Not saved", severity="error")
                return
            self.notify(f"Saved to {path}", title="Copy-back SQL saved")

        self.app.push_screen(SaveSqlScreen(self.default_sql_path()), save)

    # ------------------------------------------------------------------ navigation

    def action_next(self) -> None:
        if self.recovery is None or self.busy:
            return
        if self.step == 0:
            self.query_one("#tables", OptionList).action_select()
        elif self.step == 1:
            self.query_one("#snapshots", DataTable).action_select_cursor()
        elif self.step == 3 and self.validated:
            self.load_diff()
        elif self.step == 4:
            self.load_sql()

    def action_back(self) -> None:
        if self.recovery is None or self.busy or self.step == 0:
            return
        # Back from the restore steps goes to the snapshot choice: a restore is redone.
        self._go(1 if self.step >= 2 else 0)

    def action_restart(self) -> None:
        if self.recovery is None or self.busy:
            return
        self.table = None
        self.snapshot = None
        self._go(0)
        self.load_tables()
