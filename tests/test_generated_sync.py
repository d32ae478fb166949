"""The sync twins are generated from their asyncio sources by .ci/generate_sync.py
(client/_async -> client/_sync, pool/_async -> pool/_sync, pool/ownership/_async ->
pool/ownership/_sync): the generated files must be what it writes now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "generate_sync.py"
SOURCES = ["client/_async", "pool/_async", "pool/ownership/_async"]


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", *args],
                          capture_output=True, text=True, timeout=120)


def test_every_generated_sync_twin_is_current() -> None:
    done = check()
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("source", "name", "edit"), [
    ("client/_async", "requests.py", ("def commit(", "def commit_(")),
    ("pool/_async", "calls.py", ("def query(", "def query_(")),
    ("pool/ownership/_async", "lending.py", ("def lend_from(", "def lend_from_(")),
])
def test_a_hand_edit_of_a_generated_file_is_found_stale(
    tmp_path: Path, source: str, name: str, edit: tuple[str, str]
) -> None:
    copy = tmp_path / "_sync"
    shutil.copytree(ROOT / source.replace("_async", "_sync"), copy)
    generated = copy / name
    text = generated.read_text()
    assert edit[0] in text
    generated.write_text(text.replace(*edit, 1))
    done = check("--source", source, "--target", str(copy))
    assert done.returncode == 1
    assert "stale" in done.stderr
    removed = [line for line in done.stdout.splitlines() if line.startswith("-")]
    assert any(edit[1] in line for line in removed), done.stdout


@pytest.mark.parametrize("source", SOURCES)
def test_each_generated_file_says_what_it_is_generated_from(source: str) -> None:
    for source_file in sorted((ROOT / source).glob("*.py")):
        generated = ROOT / source.replace("_async", "_sync") / source_file.name
        head = generated.read_text().splitlines()[0]
        assert head == (f"# Generated from {source}/{source_file.name} by "
                        ".ci/generate_sync.py (the unasync")


def test_the_pool_has_no_hand_written_sync_twin_of_its_generated_calls() -> None:
    """The sync calls come from the generated module, not from a copy in pool.py."""
    from dbpool.pool import Pool
    from dbpool.pool._sync.calls import PoolCalls

    for name in ("query", "checkout", "transaction", "run", "stream", "status",
                 "prepare", "execute", "prepare_execute", "close_prepared", "copy_from"):
        assert "query" in vars(PoolCalls) and name in vars(PoolCalls), name
        assert name not in vars(Pool), f"Pool defines {name} itself"
