"""Compiles the gateway's per-statement path and the classifier with mypyc; the rest is plain.

The modules in `backstop_core.native.MODULES` are ordinary, type-checked Python. mypyc
turns them into C extensions that run the same code without the interpreter's per-bytecode
cost: on a small box the gateway's own CPU per statement is what limits throughput, and
compiling cuts it by a quarter (policy on) to two thirds (pass-through); see
docs/architecture.md, "Native build".

The build never depends on it: with BACKSTOP_PURE=1, without mypyc, or when the C compiler
or Python's headers are missing, the package installs as plain Python and behaves the same,
only slower. `backstop_core.native.status()` says which one is running.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))

# The list of modules, the record's name and the digest are the ones the running package
# checks a build against (native.py imports nothing but the standard library).
from backstop_core import native  # noqa: E402

NATIVE = [module.replace(".", "/") + ".py" for module in native.MODULES]


class OptionalBuildExt(build_ext):
    """All the extensions or none: a half-built set would import a shim whose shared
    library is missing, so any failure removes what was built and leaves plain Python."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # a missing compiler or header fails in many ways
            self._remove_outputs()
            print(
                f"backstop: native build skipped ({exc}); installing plain Python",
                file=sys.stderr,
            )
            return
        self._record_sources()

    def _record_sources(self) -> None:
        """What was compiled, for `backstop_core.native.stale` to compare with later."""
        package = Path(self.get_ext_fullpath("backstop_core._native__mypyc")).parent
        digests = {
            module: native.source_digest(ROOT / path)
            for module, path in zip(native.MODULES, NATIVE, strict=True)
        }
        (package / native.SOURCES_FILE).write_text(json.dumps(digests, indent=2) + "\n")

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)


def remove_in_tree_builds() -> None:
    """An editable install copies the compiled modules next to their sources, where they
    shadow them: a build that ends up plain must not leave an older one behind."""
    package = ROOT / "backstop_core"
    leftovers = [*package.glob("_native__mypyc.*"), package / native.SOURCES_FILE]
    for path in NATIVE:
        source = ROOT / path
        leftovers += [p for p in source.parent.glob(source.stem + ".*") if p.suffix != ".py"]
    for leftover in leftovers:
        if leftover.is_file():
            leftover.unlink()


def native_extensions() -> list[object]:
    remove_in_tree_builds()
    if os.environ.get("BACKSTOP_PURE") or shutil.which(os.environ.get("CC", "cc")) is None:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        # The build environment may have none of the runtime dependencies installed: their
        # types are Any then, which compiles to the same dynamic calls the interpreter
        # makes. The project's strict lint settings are not the compiler's business (they
        # reject Any), so no config file is read here; `make lint` applies them.
        return list(
            mypycify(
                ["--config-file=", "--ignore-missing-imports", "--python-version=3.11", *NATIVE],
                opt_level="3",
                group_name="backstop_core._native",
            )
        )
    except (Exception, SystemExit) as exc:  # mypyc refuses code it cannot compile
        print(f"backstop: native build skipped ({exc}); installing plain Python", file=sys.stderr)
        return []


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
