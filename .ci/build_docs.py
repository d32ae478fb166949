"""Build the documentation site (``mkdocs build --strict``), or serve it.

    python .ci/build_docs.py          # build into site/, failing on any warning
    python .ci/build_docs.py serve    # serve it at http://127.0.0.1:8000

The API reference is read from the source by mkdocstrings (griffe), which
finds packages by their folders: it reads the package as it installs, from
``.ci/package-tree`` (see ``package_tree.py``), which this lays out first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from package_tree import ROOT, lay_out


def main(argv: list[str]) -> int:
    lay_out()
    command = argv[0] if argv else "build"
    args = ["serve"] if command == "serve" else ["build", "--strict"]
    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run([str(mkdocs), *args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
