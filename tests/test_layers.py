"""The layers' import contracts (pyproject.toml, ``[tool.importlinter]``) hold,
and the README's test command checks them: import-linter runs here on the
package laid out as it installs (``.ci/package_tree.py``), since an editable
install's import hook hides the root folders from it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lay_out(tree: Path) -> Path:
    spec = importlib.util.spec_from_file_location("package_tree", ROOT / ".ci" / "package_tree.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    laid_out: Path = module.lay_out(tree)
    return laid_out


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, timeout=120)


def test_the_layers_keep_their_import_contracts(tmp_path: Path) -> None:
    done = _lint_imports(_lay_out(tmp_path / "tree"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_an_import_against_the_layers_is_found(tmp_path: Path) -> None:
    # A copy of the package in which the pool imports the service.
    copy = tmp_path / "copy"
    shutil.copytree(_lay_out(tmp_path / "tree") / "dbpool", copy / "dbpool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "dbpool" / "pool" / "__init__.py"
    init.write_text(init.read_text() + "\nimport dbpool.server  # against the layers\n")
    done = _lint_imports(copy)
    assert done.returncode != 0
    assert "Nothing imports the server but the CLI BROKEN" in done.stdout
