"""The compiled build (``DBPOOL_COMPILE=1``, setup.py): what tests must know of it.

mypyc's classes are native: a test cannot replace their methods, on an instance
or on the class (compiled callers do not look methods up by name).  Tests that
inject a fault that way are skipped against a compiled build; the test suite's
interpreted run, which CI always makes, covers them.
"""

from __future__ import annotations

import pytest

from dbpool.compiled import compiled_modules

replaces_methods = pytest.mark.skipif(
    bool(compiled_modules()),
    reason="replaces a method of a class compiled with mypyc; the interpreted run covers it")
