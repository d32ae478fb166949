"""Lay the dbpool package out as it installs, as links in ``.ci/package-tree/dbpool``.

dbpool's layers are root folders that pyproject.toml maps to
``dbpool.<layer>``.  The documentation build (mkdocstrings) reads the package
from this tree, whichever way it was installed (a lenient editable install
maps the root folders with an import hook that static tools cannot follow);
``tests/test_layers.py`` copies it to break a contract on purpose.  Not
committed.  mypy and lint-imports read the README's strict editable install,
which lays the package out the same way::

    python .ci/package_tree.py        # prints the folder
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
