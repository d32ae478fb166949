"""The layers' import contracts (pyproject.toml, ``[tool.importlinter]``) hold,
and the README's test command checks them: ``lint-imports`` runs here as CI
runs it, on the README's strict editable install."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``lint-imports``, on the installed package, or on a copy of it at ``path``
    (first on the path)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_layers_keep_their_import_contracts() -> None:
    done = _lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_an_import_against_the_layers_is_found(tmp_path: Path) -> None:
    # A copy of the package, laid out as it installs, in which the pool imports the service.
    spec = importlib.util.spec_from_file_location("package_tree", ROOT / ".ci" / "package_tree.py")
    assert spec is not None and spec.loader is not None
    package_tree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_tree)
    tree: Path = package_tree.lay_out(tmp_path / "tree")
    copy = tmp_path / "copy"
    shutil.copytree(tree / "dbpool", copy / "dbpool", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "dbpool" / "pool" / "__init__.py"
    init.write_text(init.read_text() + "\nimport dbpool.server  # against the layers\n")
    done = _lint_imports(copy)
    assert done.returncode != 0
    assert "Nothing imports the server but the CLI BROKEN" in done.stdout
