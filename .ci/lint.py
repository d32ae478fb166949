"""Run the code linters as CI does: ruff, mypy (strict) and the layers' import
contracts (``[tool.importlinter]`` in pyproject.toml).

mypy and lint-imports read the package from its files, so they run on the
tree ``.ci/package_tree.py`` lays out, in which the root folders are
``dbpool.<layer>`` as they install (run plainly on the README's editable
install, they would see ``src/dbpool`` without its layers)::

    .venv-test/bin/python .ci/lint.py

Exits non-zero, after running all three, if any of them failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from package_tree import ROOT, lay_out


def _tool(name: str) -> str:
    """The tool installed beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def main() -> int:
    tree = str(lay_out())
    env = dict(os.environ)
    checks = [
        ([_tool("ruff"), "check", "."], env),
        ([_tool("mypy")], {**env, "MYPYPATH": tree}),
        ([_tool("lint-imports")], {**env, "PYTHONPATH": tree}),
    ]
    failed = []
    for argv, check_env in checks:
        print("$", " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv)),
              flush=True)
        if subprocess.run(argv, cwd=ROOT, env=check_env).returncode != 0:
            failed.append(Path(argv[0]).name)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
