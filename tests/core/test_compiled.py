"""``dbpool.compiled``: which modules an installation runs compiled."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

from dbpool.compiled import compiled_modules


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_extensions_beside_their_sources_are_named_and_the_runtime_library_is_not(
        tmp_path: Path) -> None:
    tag = importlib.machinery.EXTENSION_SUFFIXES[0]  # ".cpython-311-x86_64-linux-gnu.so"
    for name in ("__init__.py", "wire.py", f"wire{tag}", "server/frontend.py",
                 f"server/frontend{tag}", "server/notify.py", f"compiled__mypyc{tag}",
                 "py.typed"):
        _touch(tmp_path / name)
    assert compiled_modules(tmp_path) == ["dbpool.server.frontend", "dbpool.wire"]


def test_a_source_only_package_is_interpreted(tmp_path: Path) -> None:
    for name in ("__init__.py", "wire.py", "server/frontend.py"):
        _touch(tmp_path / name)
    assert compiled_modules(tmp_path) == []
