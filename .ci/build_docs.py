"""Build the documentation site (``mkdocs build --strict``), or serve it.

    python .ci/build_docs.py          # build into site/, failing on any warning
    python .ci/build_docs.py serve    # serve it at http://127.0.0.1:8000

The API reference is read from the source by mkdocstrings (griffe), which
finds packages by their folders.  dbpool's layers are root folders mapped to
``dbpool.<layer>`` by pyproject.toml, so this first lays the package out as
it installs, as links in ``.ci/docs-src/dbpool`` (not committed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".ci" / "docs-src" / "dbpool"
LAYERS = ("actors", "pool", "server", "client", "dbapi", "bench")


def lay_out() -> None:
    """``.ci/docs-src/dbpool``: the core's files and the layers' folders, as links."""
    if TREE.parent.exists():
        shutil.rmtree(TREE.parent)
    TREE.mkdir(parents=True)
    for path in (ROOT / "src" / "dbpool").iterdir():
        if path.suffix in (".py", ".typed") or (path / "__init__.py").is_file():
            (TREE / path.name).symlink_to(path)
    for layer in LAYERS:
        (TREE / layer).symlink_to(ROOT / layer, target_is_directory=True)


def main(argv: list[str]) -> int:
    lay_out()
    command = argv[0] if argv else "build"
    args = ["serve"] if command == "serve" else ["build", "--strict"]
    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run([str(mkdocs), *args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
