"""Lay the dbpool package out as it installs, as links in ``.ci/package-tree/dbpool``.

dbpool's layers are root folders that pyproject.toml maps to
``dbpool.<layer>``.  An editable install maps them with an import hook that
static tools cannot follow: run plainly on the README's install, mypy and
lint-imports see ``src/dbpool`` alone, without its layers.  So the tools that
read the package from its files (mypy, import-linter, mkdocstrings) read this
tree instead, whichever way the package was installed (not committed).
``python .ci/lint.py`` runs them on it; by hand::

    python .ci/package_tree.py        # prints the folder to put on the path
    MYPYPATH=$(python .ci/package_tree.py) mypy
    PYTHONPATH=$(python .ci/package_tree.py) lint-imports
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".ci" / "package-tree"


def lay_out(tree: Path = TREE) -> Path:
    """Make ``<tree>/dbpool`` afresh from pyproject.toml's package folders, as
    links to them; return ``tree``."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-dir"]
    package = tree / "dbpool"
    if tree.exists():
        shutil.rmtree(tree)
    package.mkdir(parents=True)
    core = ROOT / folders["dbpool"]
    for path in core.iterdir():  # the core's modules, and packages such as django/
        if path.suffix in (".py", ".typed") or (path / "__init__.py").is_file():
            (package / path.name).symlink_to(path)
    for name, folder in folders.items():
        parts = name.split(".")
        if len(parts) == 2:  # a layer: dbpool.<layer> (its subpackages come with it)
            (package / parts[1]).symlink_to(ROOT / folder, target_is_directory=True)
    return tree


if __name__ == "__main__":
    print(lay_out())
