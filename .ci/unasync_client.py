"""Write the sync client's requests from their asyncio source, or check they are current.

    python .ci/unasync_client.py           # write client/_sync/*.py from client/_async/*.py
    python .ci/unasync_client.py --check   # exit 1 if a generated file is stale (CI runs it)

The generation is the ``unasync`` package's token rewrite (``async`` and
``await`` dropped, ``__aenter__`` -> ``__enter__``, ``AsyncIterator`` ->
``Iterator``...) with the renames below; each generated file starts with a
header that says it is generated, from what and how.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "_async"
TARGET = ROOT / "client" / "_sync"

#: Names of the async source and their sync twins (beyond unasync's own).
RENAMES = {
    "AsyncRequests": "Requests",
    "AsyncTransaction": "Transaction",
    "AsyncStream": "Stream",
    "AsyncCopyTo": "CopyTo",
    "_AsyncPaged": "_Paged",
    "ablocks": "blocks",
}

HEADER = (
    "# Generated from client/_async/{name} by .ci/unasync_client.py (the unasync\n"
    "# package's rewrite of async code as sync code): do not edit; edit the source and\n"
    "# run `python .ci/unasync_client.py`.  CI fails when this file is stale.\n"
)


def generate(into: Path) -> list[Path]:
    """Write the sync twin of every source file into ``into``; return the files written."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "_async"
        shutil.copytree(SOURCE, source)
        files = sorted(source.glob("*.py"))
        rule = unasync.Rule(fromdir="/_async/", todir="/_sync/",
                            additional_replacements=RENAMES)
        unasync.unasync_files([str(path) for path in files], [rule])
        written = []
        for path in files:
            generated = Path(scratch) / "_sync" / path.name
            text = _dedupe_imports(generated.read_text())
            if path.name == "__init__.py":
                text = ('"""The client\'s requests, sync: generated from ``client/_async``."""\n')
            target = into / path.name
            target.write_text(HEADER.format(name=path.name) + text)
            written.append(target)
        return written


def _dedupe_imports(text: str) -> str:
    """Drop the names an import line now lists twice (``AsyncIterable`` became
    ``Iterable``, which the line may name already)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("from ") and " import " in line and "(" not in line:
            head, _, names = line.rstrip("\n").partition(" import ")
            unique = list(dict.fromkeys(name.strip() for name in names.split(",")))
            line = f"{head} import {', '.join(unique)}\n"
        lines.append(line)
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated file differs from what it would be now")
    parser.add_argument("--target", type=Path, default=TARGET,
                        help="the folder of the generated files (default: client/_sync)")
    args = parser.parse_args(argv)
    target: Path = args.target
    if not args.check:
        target.mkdir(exist_ok=True)
        for path in generate(target):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        stale = []
        for path in generate(Path(fresh)):
            current = target / path.name
            now = current.read_text() if current.exists() else ""
            if now != path.read_text():
                stale.append(current)
                sys.stdout.writelines(difflib.unified_diff(
                    now.splitlines(keepends=True), path.read_text().splitlines(keepends=True),
                    str(current), "as generated now"))
        if stale:
            print(f"stale: {', '.join(str(p) for p in stale)}; "
                  "run `python .ci/unasync_client.py`", file=sys.stderr)
            return 1
    print(f"{target} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
