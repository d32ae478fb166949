"""Write the sync twins of the asyncio sources, or check that they are current.

    python .ci/generate_sync.py           # write every _sync folder from its _async source
    python .ci/generate_sync.py --check   # exit 1 if a generated file is stale (CI runs it)

dbpool writes each piece of code that has a sync and an asyncio form once,
for asyncio, in an ``_async`` folder; its sync twin in the ``_sync`` folder
beside it is generated:

- ``client/_async`` -> ``client/_sync``: the remote client's requests and
  its subscriptions to a channel's notifications;
- ``pool/_async`` -> ``pool/_sync``: the pool's calls, checkouts and lending;
- ``pool/ownership/_async`` -> ``pool/ownership/_sync``: the ownership
  pool's lending.

The generation is the ``unasync`` package's token rewrite (``async`` and
``await`` dropped, ``__aenter__`` -> ``__enter__``, ``AsyncIterator`` ->
``Iterator``...) with the renames below, and one rewrite of our own:
``Awaitable[T]`` becomes ``T`` (``Awaitable[Any]``, ``Any``).  Then ruff
sorts the imports and drops the names left unused, as it would in any
module.  Each generated file starts with a header that says it is
generated, from what and how.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
#: The asyncio source folders; each one's twin is the ``_sync`` folder beside it.
SOURCES = ("client/_async", "pool/_async", "pool/ownership/_async")

#: Names of the async sources and their sync twins (beyond unasync's own).
RENAMES = {
    # the remote client (client/_async)
    "AsyncRequests": "Requests",
    "AsyncTransaction": "Transaction",
    "AsyncStream": "Stream",
    "AsyncCopyTo": "CopyTo",
    "_AsyncPaged": "_Paged",
    "ablocks": "blocks",
    "AsyncNotifications": "Notifications",
    "AsyncSubscription": "Subscription",
    # the pool (pool/_async, pool/ownership/_async)
    "AsyncConnection": "Connection",
    "AsyncCheckout": "Checkout",
    "AsyncPoolTransaction": "PoolTransaction",
    "AsyncPoolCalls": "PoolCalls",
    "alend": "lend",
    "alend_slot": "lend_slot",
    "alend_from": "lend_from",
    "ainstall": "install",
    "aaccept": "accept",
    "aget": "get",
    "_atake": "_take",
    "aheld": "held",
    "aheld_conn": "held_conn",
    "ahold": "hold",
    "aunhold": "unhold",
    "atake_back": "take_back",
    "acheckout": "checkout",
    "aquery": "query",
    "aprepare": "prepare",
    "aexecute": "execute",
    "aprepare_execute": "prepare_execute",
    "aclose_prepared": "close_prepared",
    "astatus": "status",
    "arun": "run",
    "atransaction": "transaction",
    "astream": "stream",
    "acopy_from": "copy_from",
    "_aone_shot": "_one_shot",
    "_astream_in": "_stream_in",
    "_astatus_or_error": "_status_or_error",
    "_acheck_status_unchanged": "_check_status_unchanged",
    "AsyncHoldToken": "HoldToken",
}

#: Rewrites of the generated text that a token rename cannot make.
TEXT_REWRITES = {"Awaitable[T]": "T", "Awaitable[Any]": "Any"}

HEADER = (
    "# Generated from {source} by .ci/generate_sync.py (the unasync\n"
    "# package's rewrite of async code as sync code): do not edit; edit the\n"
    "# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.\n"
)


def target_of(source: str) -> Path:
    return ROOT / source.replace("/_async", "/_sync")


def generate(source: str, into: Path) -> list[Path]:
    """Write the sync twin of every file of ``source`` into ``into``; return the files."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "_async"
        shutil.copytree(ROOT / source, copy)
        files = sorted(copy.glob("*.py"))
        rule = unasync.Rule(fromdir="/_async/", todir="/_sync/",
                            additional_replacements=RENAMES)
        unasync.unasync_files([str(path) for path in files], [rule])
        outputs = []
        for path in files:
            output = Path(scratch) / "_sync" / path.name
            text = output.read_text()
            for old, new in TEXT_REWRITES.items():
                text = text.replace(old, new)
            if path.name == "__init__.py":
                text = f'"""The sync twins of ``{source}``, generated from it."""\n'
            output.write_text(HEADER.format(source=f"{source}/{path.name}") + text)
            outputs.append(output)
        _tidy_imports(outputs)
        written = []
        for output in outputs:
            target = into / output.name
            target.write_text(output.read_text())
            written.append(target)
        return written


def _tidy_imports(paths: list[Path]) -> None:
    """Sort the import lines and drop the names the rewrite left unused
    (``AsyncIterator`` became ``Iterator``, which the line may name already;
    ``Awaitable`` is gone), with ruff and the project's own settings."""
    subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "--fix-only",
                    "--config", str(ROOT / "pyproject.toml"), "--select", "I,F401",
                    *map(str, paths)], check=True)


def check(source: str, target: Path) -> list[Path]:
    """The generated files under ``target`` that differ from what ``source`` gives now."""
    stale = []
    with tempfile.TemporaryDirectory() as fresh:
        for path in generate(source, Path(fresh)):
            current = target / path.name
            now = current.read_text() if current.exists() else ""
            if now != path.read_text():
                stale.append(current)
                sys.stdout.writelines(difflib.unified_diff(
                    now.splitlines(keepends=True), path.read_text().splitlines(keepends=True),
                    str(current), "as generated now"))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated file differs from what it would be now")
    parser.add_argument("--source", choices=SOURCES, action="append",
                        help="only this source folder (default: all of them)")
    parser.add_argument("--target", type=Path,
                        help="with one --source: the folder of its generated files")
    args = parser.parse_args(argv)
    sources: list[str] = args.source or list(SOURCES)
    if args.target is not None and len(sources) != 1:
        parser.error("--target goes with exactly one --source")
    stale: list[Path] = []
    for source in sources:
        target: Path = args.target or target_of(source)
        if not args.check:
            target.mkdir(exist_ok=True)
            for path in generate(source, target):
                print(f"wrote {path}")
            continue
        stale += check(source, target)
    if stale:
        print(f"stale: {', '.join(str(p) for p in stale)}; run `python .ci/generate_sync.py`",
              file=sys.stderr)
        return 1
    if args.check:
        print(f"current: {', '.join(str(target_of(s)) for s in sources)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
