"""The build backend: setuptools', plus an opt-in compiled build.

``DBPOOL_COMPILE=1 pip install .`` compiles the service's request path with
mypyc (``setup.py`` lists the modules); without it the build is setuptools'
own, pure Python.  The compiled build needs mypy and the packages whose types
the compiled modules use at build time, so only that build asks for them.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, unchanged)


def compile_requires() -> list[str]:
    """mypy, pinned so that a build's C is the same from one build to the next
    (mypyc is part of it), and the libraries the compiled modules import, whose
    types mypyc compiles against: the runtime dependencies and the ``curve``
    extra, as pyproject.toml lists them."""
    with open("pyproject.toml", "rb") as file:  # hooks run in the source tree
        project = tomllib.load(file)["project"]
    return ["mypy==2.4.1", *project["dependencies"],
            *project["optional-dependencies"]["curve"]]


def compiling() -> bool:
    """Whether this build compiles (``DBPOOL_COMPILE=1``)."""
    return os.environ.get("DBPOOL_COMPILE", "") == "1"


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    requires: list[str] = build_meta.get_requires_for_build_wheel(config_settings)
    return requires + compile_requires() if compiling() else requires


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    if compiling():
        # The compiled modules would shadow the sources being edited.
        raise RuntimeError("DBPOOL_COMPILE=1 builds a wheel, not an editable install: "
                           "install without -e, or unset DBPOOL_COMPILE")
    requires: list[str] = build_meta.get_requires_for_build_editable(config_settings)
    return requires
