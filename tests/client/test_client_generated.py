"""The sync client's requests are generated from their asyncio source (client/_async),
by .ci/unasync_client.py: the files in client/_sync must be what it writes now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "unasync_client.py"


def check(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--target", str(target)],
                          capture_output=True, text=True, timeout=120)


def test_the_generated_sync_requests_are_current() -> None:
    done = check(ROOT / "client" / "_sync")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_hand_edit_of_a_generated_file_is_found_stale(tmp_path: Path) -> None:
    copy = tmp_path / "_sync"
    shutil.copytree(ROOT / "client" / "_sync", copy)
    requests = copy / "requests.py"
    requests.write_text(requests.read_text().replace("def commit(", "def commit_(", 1))
    done = check(copy)
    assert done.returncode == 1
    assert "stale" in done.stderr and "-    def commit_(" in done.stdout


def test_the_generated_file_says_what_it_is_generated_from() -> None:
    head = (ROOT / "client" / "_sync" / "requests.py").read_text().splitlines()[0]
    assert head.startswith("# Generated from client/_async/requests.py by .ci/unasync_client.py")
