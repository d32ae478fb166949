"""setuptools' configuration beyond pyproject.toml: the opt-in compiled build.

With ``DBPOOL_COMPILE=1`` (see ``tools/build_backend.py``) mypyc compiles the
modules every remote request passes through to C extensions, which install
beside their sources and are imported in their place.  mypy resolves modules
by their location, and the repository keeps its layers in root folders mapped
to ``dbpool.<folder>``; so the package is first laid out as installed, under
``build/mypyc-src``, and compiled from there.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

# What every remote request passes through: the service's request loop, its
# pipes to PostgreSQL and its ZMTP router; the client's ZMTP connection; and,
# at both ends, the message codec, ZMTP's framing and CURVE's boxes, and the
# round-trip average the client's polling keeps.  Measured in docs/performance.md.
COMPILED = [
    "dbpool/server/frontend.py",
    "dbpool/server/pipeline.py",
    "dbpool/server/direct_router.py",
    "dbpool/client/direct.py",
    "dbpool/wire.py",
    "dbpool/zmtp.py",
    "dbpool/curve.py",
    "dbpool/spin.py",
]


def staged_package(root: Path) -> Path:
    """Copy the package's sources to ``root`` laid out as installed; return ``root``."""
    config = tomllib.loads((HERE / "pyproject.toml").read_text())
    setuptools_config = config["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools_config["package-dir"]
    shutil.rmtree(root, ignore_errors=True)
    for package in setuptools_config["packages"]:
        source = _source_of(package, package_dir)
        target = root.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.suffix == ".py" or path.name == "py.typed":
                shutil.copy2(path, target / path.name)
    return root


def _source_of(package: str, package_dir: dict[str, str]) -> Path:
    """The folder ``package`` is built from, by the longest mapped prefix."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = package_dir.get(".".join(parts[:cut]))
        if mapped is not None:
            return HERE.joinpath(mapped, *parts[cut:])
    return HERE.joinpath(*parts)


def compiled_extensions() -> list[object]:
    from mypyc.build import mypycify  # a build requirement only when compiling

    root = staged_package(HERE / "build" / "mypyc-src")
    extensions: list[object] = mypycify(
        # The project's mypy settings; an optional dependency absent from the
        # build (pgserver, say) leaves its `type: ignore` unused, not wrong.
        ["--config-file", str(HERE / "pyproject.toml"), "--no-warn-unused-ignores",
         *(str(root / path) for path in COMPILED)],
        opt_level="3",
        group_name="dbpool.compiled",
        target_dir=str(HERE / "build" / "mypyc-c"),
    )
    return extensions


# Only the commands that build extensions compile (setuptools also runs this
# file for the build's requirements and its metadata).
COMPILING = (os.environ.get("DBPOOL_COMPILE", "") == "1"
             and not {"bdist_wheel", "build_ext", "build"}.isdisjoint(sys.argv))

setup(ext_modules=compiled_extensions() if COMPILING else [])
