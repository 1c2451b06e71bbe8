"""The compiled hot path (setup.py) and its plain-Python twin behave as one product: the
build compiles what `backstop_core.native` reports, an old build is caught, and
BACKSTOP_PURE=1 runs the gateway's tests on the plain sources."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from backstop_core import native

ROOT = Path(__file__).resolve().parents[2]


def test_every_compiled_module_has_its_source() -> None:
    """setup.py compiles native.MODULES: a module renamed or moved must be renamed there."""
    for module in native.MODULES:
        assert (ROOT / module.replace(".", "/")).with_suffix(".py").exists(), module


def test_the_install_is_compiled_where_it_can_be() -> None:
    """setup.py falls back to plain Python quietly (an install must not fail for want of a
    compiler); where a compiler and Python's headers exist, a fallback is a build bug."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if os.environ.get("BACKSTOP_PURE") or not shutil.which("cc") or not headers.exists():
        pytest.skip("no C compiler or Python headers here: plain Python is expected")
    current = native.status()
    assert current.compiled == native.MODULES, (
        "the install is plain Python although it could be compiled; "
        "`pip install -v -e .` shows why the native build was skipped"
    )


def test_status_matches_what_is_imported() -> None:
    import backstop_core.gateway.session as session

    current = native.status()
    compiled_session = not session.__file__.endswith(".py")
    assert ("backstop_core.gateway.session" in current.compiled) == compiled_session
    assert set(current.compiled) <= set(native.MODULES)
    assert ("compiled" in current.describe()) == bool(current.compiled)


def test_a_source_edited_after_the_build_is_named_stale(tmp_path: Path) -> None:
    package = tmp_path / "backstop_core"
    (package / "gateway").mkdir(parents=True)
    session = package / "gateway" / "session.py"
    guard = package / "gateway" / "guard.py"
    session.write_text("x = 1\n")
    guard.write_text("y = 1\n")
    digests = {
        "backstop_core.gateway.session": hashlib.sha256(b"x = 1\n").hexdigest(),
        "backstop_core.gateway.guard": hashlib.sha256(b"y = 1\n").hexdigest(),
    }
    (package / native.SOURCES_FILE).write_text(json.dumps(digests))
    compiled = ("backstop_core.gateway.session", "backstop_core.gateway.guard")
    assert native.stale(compiled, package) == ()

    session.write_text("x = 2\n")
    assert native.stale(compiled, package) == ("backstop_core.gateway.session",)

    (package / native.SOURCES_FILE).unlink()  # a build that recorded nothing proves nothing
    assert native.stale(compiled, package) == compiled


def test_a_stale_build_is_reported_as_such() -> None:
    status = native.NativeStatus(compiled=native.MODULES, stale=("backstop_core.gateway.session",))
    assert "STALE" in status.describe()
    assert "backstop_core.gateway.session" in status.describe()


def test_backstop_pure_imports_the_plain_sources() -> None:
    code = (
        "import backstop_core.gateway.session as s, backstop_core.gateway.guard as g\n"
        "from backstop_core.native import status\n"
        "print(s.__file__, g.__file__, len(status().compiled))\n"
    )
    env = {**os.environ, "BACKSTOP_PURE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    session_file, guard_file, compiled = result.stdout.split()
    assert session_file.endswith("session.py")
    assert guard_file.endswith("guard.py")
    assert compiled == "0"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_plain_python_gateway_passes_the_gateway_tests() -> None:
    """Where the compiler is missing the install is plain Python: the session's own tests,
    the wire fuzzing, the classification table and the real clients (psql, psycopg,
    asyncpg, pgbench) run on it."""
    if not native.status().compiled:
        pytest.skip("this install is plain Python already: the whole suite ran on it")
    env = {**os.environ, "BACKSTOP_PURE": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "tests/unit/test_session.py",
            "tests/unit/test_pgwire_fuzz.py",
            "tests/unit/test_classify.py",
            "tests/integration/test_gateway_clients.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "gateway hot path: plain Python (BACKSTOP_PURE)" in result.stdout
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
