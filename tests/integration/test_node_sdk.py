"""The Node.js SDK (sdk/node) against a real gateway: its own `node --test` suite, run with
the gateway's DSN, its state directory and the `backstop` command in the environment.

npm ci runs only when node_modules is missing or package-lock.json changed since the last
install; the build (tsc) runs every time.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import PgServer
from tests.gateway_harness import GatewayThread

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdk" / "node"
# DELETE on sdk_approve_* waits for an operator (5 s), sdk_frozen_* is read-only, HIGH and
# CRITICAL risk are blocked: what the tests in sdk/node/test expect.
POLICY = SDK / "test" / "policy.json"
LOCK_STAMP = ".backstop-package-lock.sha256"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; the Node.js SDK tests need Node.js >= 18 and npm")
    return path


def _node() -> str:
    node = _tool("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 18:
        pytest.skip(f"node {version.stdout.strip()} is too old; the SDK tests need Node.js >= 18")
    return node


def _run(command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(
            command, cwd=SDK, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        partial = (
            exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        )
        pytest.fail(f"{shlex.join(command)} did not finish within {timeout} s:\n{partial or ''}")
    if result.returncode != 0:
        pytest.fail(
            f"{shlex.join(command)} failed with status {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def _build(npm: str) -> None:
    """npm ci when the installed modules are not those of package-lock.json; then tsc."""
    digest = hashlib.sha256((SDK / "package-lock.json").read_bytes()).hexdigest()
    stamp = SDK / "node_modules" / LOCK_STAMP
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        _run([npm, "ci", "--no-audit", "--no-fund"], timeout=300)
        stamp.write_text(digest + "\n")
    _run([npm, "run", "--silent", "build"], timeout=120)


def _backstop_command(directory: Path) -> Path:
    """A `backstop` executable node can spawn: this interpreter running the CLI module."""
    script = directory / "backstop"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m backstop_core.cli "$@"\n')
    script.chmod(0o755)
    return script


def test_node_sdk_against_the_gateway(
    pg: PgServer, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    node = _node()
    npm = _tool("npm")
    _build(npm)
    state_dir = tmp_path / "state"
    gateway = gateway_factory(policy=POLICY, state_dir=state_dir)
    dsn = gateway.dsn(
        user=pg.user,
        password=pg.password,
        database=pg.database,
        application_name="backstop-node-sdk-tests",
    )
    env = {
        **os.environ,
        "BACKSTOP_TEST_GATEWAY_DSN": dsn,
        "BACKSTOP_TEST_STATE_DIR": str(state_dir),
        "BACKSTOP_CLI": str(_backstop_command(tmp_path)),
        "NO_COLOR": "1",
    }
    output = _run([node, "--test", "--test-reporter=tap", "test/"], timeout=180, env=env)
    print(output)  # shown with -s or -rP
    assert "# fail 0" in output, output
    # Every test must have run: a skip here means the environment did not reach node.
    assert "# SKIP" not in output, output
    assert "# skipped 0" in output, output
