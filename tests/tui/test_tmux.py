"""`backstop-tui --demo --demo-agent` in a real terminal (tmux, 120x40), driven with keys.

What a person would see: the dashboard comes up, the simulated agent's statements flow through
the feed, one of its large UPDATEs waits for approval, Enter and `a` let it run, `q` quits and
the demo's PostgreSQL is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.tui, pytest.mark.integration, pytest.mark.timeout(240)]

BACKSTOP_TUI = Path(sys.executable).with_name("backstop-tui")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class TmuxError(Exception):
    pass


class Tmux:
    """One detached session on a private tmux server."""

    def __init__(self, width: int = 120, height: int = 40) -> None:
        self.socket = f"backstop-test-{uuid.uuid4().hex[:8]}"
        self.session = "backstop"
        self.size = (width, height)
        self.socket_path: Path | None = None

    def run(self, *args: str) -> str:
        # Test runners may export COLUMNS/LINES; inherited, they would override the pane size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env=env,
        )
        if result.returncode != 0:
            raise TmuxError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: str, cwd: Path) -> None:
        width, height = self.size
        self.run(
            "new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height),
            "-c", str(cwd), command,
        )  # fmt: skip
        self.socket_path = Path(self.run("display-message", "-p", "#{socket_path}").strip())

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def wait_for(self, predicate: Callable[[str], object], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            try:
                screen = self.screen()
            except (TmuxError, subprocess.TimeoutExpired):
                time.sleep(0.5)  # a busy machine can make one capture fail; the next decides
                continue
            if predicate(screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen}")

    def kill(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError, TmuxError):
            self.run("kill-server")
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux); CI installs it")
    if not BACKSTOP_TUI.exists():
        pytest.skip(f"{BACKSTOP_TUI} is not installed (pip install -e .)")
    terminal = Tmux()
    yield terminal
    terminal.kill()


def test_demo_with_agent_in_a_terminal(tmux: Tmux, tmp_path: Path) -> None:
    port = free_port()
    command = (
        f"{BACKSTOP_TUI} --demo --demo-agent --listen 127.0.0.1:{port}; "
        "echo BACKSTOP-EXITED $?; sleep 120"
    )
    tmux.start(command, cwd=tmp_path)

    screen = tmux.wait_for(
        lambda s: "BACKSTOP" in s and "Live queries" in s and "reachable" in s,
        timeout=60,
        what="the dashboard",
    )
    assert f"127.0.0.1:{port}" in screen
    upstream = re.search(r"upstream 127\.0\.0\.1:(\d+)", screen)
    assert upstream, screen
    upstream_port = int(upstream.group(1))
    assert port_open(upstream_port)

    tmux.wait_for(
        lambda s: s.count("demo-agent") >= 3 and "allowed → forwarded" in s,
        timeout=30,
        what="the simulated agent's statements in the feed",
    )
    screen = tmux.wait_for(
        lambda s: re.search(r"held #\d+", s) and "1 waiting" in s,
        timeout=60,
        what="a pending approval",
    )
    held = re.search(r"held #(\d+)", screen)
    assert held
    approval = held.group(1)

    tmux.keys("Enter")
    screen = tmux.wait_for(
        lambda s: f"Approval #{approval}" in s and "Why it is held" in s,
        timeout=10,
        what="the approval detail",
    )
    assert "approve-large-writes" in screen and "order_items" in screen
    tmux.keys("a")
    tmux.wait_for(
        lambda s: "Live queries" in s and "approved → forwarded" in s,
        timeout=20,
        what="the approved statement forwarded in the feed",
    )

    tmux.keys("q")
    tmux.wait_for(lambda s: "BACKSTOP-EXITED 0" in s, timeout=60, what="a clean exit")
    assert not port_open(port), "the gateway still listens"
    assert not port_open(upstream_port), "the demo's PostgreSQL still runs"
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"-p {upstream_port}" not in processes
