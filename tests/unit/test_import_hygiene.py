"""The core never imports the UI: each backstop_core module, imported alone in a fresh
interpreter, leaves textual and backstop_tui out of sys.modules."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import backstop_core


def core_modules() -> list[str]:
    names = ["backstop_core"]
    for info in pkgutil.walk_packages(backstop_core.__path__, "backstop_core."):
        names.append(info.name)
    return sorted(names)


def test_there_are_core_modules_to_check() -> None:
    modules = core_modules()
    assert "backstop_core.runtime" in modules
    assert "backstop_core.gateway.session" in modules


@pytest.mark.parametrize("module", core_modules())
def test_core_module_does_not_import_the_ui(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'backstop_tui'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"


def test_wire_codec_imports_neither_asyncio_nor_pglast() -> None:
    code = (
        "import sys\n"
        "import backstop_core.gateway.pgwire\n"
        "print(','.join(sorted(m for m in ('asyncio', 'pglast') if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
