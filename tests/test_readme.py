"""README stays true: every make target, hetmoe sub-command and file it names exists.

The two set-up commands themselves (``make run``, ``make test``) are exercised by CI
and by ``tests/local``; this guards the rest of what a newcomer copies from README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))


def test_every_make_target_in_readme_exists() -> None:
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    assert {"run", "test"} <= named
    assert named <= _make_targets(), named - _make_targets()


@pytest.mark.parametrize(
    "command", sorted(set(re.findall(r"hetmoe (plan|run|crd|operator|status)\b", README)))
)
def test_every_hetmoe_command_in_readme_exists(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hetmoe_operator.cli.main", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_repository_path_in_readme_exists() -> None:
    paths = set(
        re.findall(r"\b((?:examples|charts|crds|tests|bench|operator|trainer)/[\w./-]*\w)", README)
    )
    assert paths, "README names no repository paths"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert missing == []
