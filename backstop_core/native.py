"""Which build of the gateway's per-statement path is running: compiled or plain Python.

`setup.py` compiles a few modules with mypyc (NATIVE there, MODULES here) and records the
SHA-256 of each source it compiled in `_native_sources.json`. In a source checkout the
compiled file sits next to its `.py` and is imported in its place, so an edit to the source
does nothing until the next build: `stale()` names such modules, the gateway warns about
them, and the test suite refuses to run on them.

`BACKSTOP_PURE=1` in the environment makes every process import the plain sources instead
(`prefer_source`, called from the package's `__init__`): the same code, to compare, or to
rule the compiler out.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MODULES = (
    "backstop_core.gateway.pgwire.framing",
    "backstop_core.gateway.pgwire.codec",
    "backstop_core.gateway.session",
    "backstop_core.gateway.guard",
    "backstop_core.journal",
    "backstop_core.sqlform",
    "backstop_core.classify",
)
SOURCES_FILE = "_native_sources.json"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class NativeStatus:
    compiled: tuple[str, ...]  # modules imported from a compiled extension (the rest: plain)
    stale: tuple[str, ...]  # compiled from a source that has changed since

    def describe(self) -> str:
        if not self.compiled:
            forced = " (BACKSTOP_PURE)" if os.environ.get("BACKSTOP_PURE") else ""
            return f"gateway hot path: plain Python{forced}"
        text = f"gateway hot path: compiled ({len(self.compiled)} of {len(MODULES)} modules)"
        if self.stale:
            text += f"; STALE, rebuild with `pip install -e .`: {', '.join(self.stale)}"
        return text


def prefer_source() -> None:
    """Import this package's modules from their `.py` files even where a compiled one sits
    beside them. Must run before any of MODULES is imported."""
    loaders = [
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    ]
    hook = importlib.machinery.FileFinder.path_hook(*loaders)

    def source_only(path: str) -> importlib.abc.PathEntryFinder:
        if Path(path).resolve().is_relative_to(PACKAGE_DIR):
            return hook(path)
        raise ImportError("not a backstop_core directory")  # the next hook takes it

    sys.path_hooks.insert(0, source_only)
    for path in list(sys.path_importer_cache):
        if Path(path).resolve().is_relative_to(PACKAGE_DIR):
            del sys.path_importer_cache[path]


def _source_path(module: str, package_dir: Path) -> Path:
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _is_compiled(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def status() -> NativeStatus:
    compiled = tuple(m for m in MODULES if _is_compiled(m))
    return NativeStatus(compiled, stale(compiled))


def source_digest(source: Path) -> str:
    """What the build records of a source it compiled, and `stale` compares."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def stale(compiled: tuple[str, ...], package_dir: Path = PACKAGE_DIR) -> tuple[str, ...]:
    """Compiled modules whose source has changed since the build (a source checkout that
    was edited or pulled without rebuilding). An installed package ships no sources to
    compare, and none of its modules is stale."""
    try:
        recorded = json.loads((package_dir / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        recorded = {}
    found = []
    for module in compiled:
        source = _source_path(module, package_dir)
        if not source.exists():
            continue
        if recorded.get(module) != source_digest(source):
            found.append(module)
    return tuple(found)
