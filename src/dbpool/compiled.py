"""Which of dbpool's modules run compiled, in this installation.

``DBPOOL_COMPILE=1 pip install .`` compiles the service's request path with
mypyc (``setup.py`` names the modules); each compiled module installs as a C
extension beside its source, and Python imports the extension.  The benchmark
and ``dbpool serve`` say which build they run, so that figures are read
against the right one.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

# mypyc's shared library for the whole group, not a module of dbpool's own.
_RUNTIME_LIBRARY = "compiled__mypyc"
_PACKAGE = Path(__file__).parent  # not resolved: an editable install links its files
# The most specific first: ".cpython-311-x86_64-linux-gnu.so" before ".so".
_SUFFIXES = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)


def compiled_modules(package: Path = _PACKAGE) -> list[str]:
    """The dotted names of the modules of ``package`` (dbpool's folder) installed as
    C extensions, sorted."""
    names = set()
    for path in package.rglob("*.*"):
        suffix = next((s for s in _SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            continue
        stem = path.name[: -len(suffix)]
        if stem != _RUNTIME_LIBRARY:
            names.add(".".join(("dbpool", *path.relative_to(package).parent.parts, stem)))
    return sorted(names)


def build_name() -> str:
    """``"compiled (mypyc): <modules>"`` or ``"interpreted"``, for reports and logs."""
    modules = compiled_modules()
    return f"compiled (mypyc): {', '.join(modules)}" if modules else "interpreted"
