"""README stays true: every command in its shell blocks is run here or is skipped for a
stated reason, and every make target, hetmoe sub-command and file it names exists.

Commands are the lines of README's ```bash blocks (unlabelled blocks are sample
output). Each one is run as written: those that need no cluster here, those that
need one by ``tests/integration/operator/test_readme_commands.py`` against the real
control plane; the rest are listed in ``SKIPPED`` with the reason and with what
covers them instead. Editing README to a broken command fails one of these tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL = ("bash", "sh", "shell")
COMMAND_TIMEOUT = 300

LOCAL = re.compile(r"(\.venv/bin/)?hetmoe (plan|crd) ")
"""Commands this file runs: they need the repository and the venv, no cluster."""
CLUSTER = re.compile(r"(helm|kubectl|(\.venv/bin/)?hetmoe status) ")
"""Commands test_readme_commands.py runs against the real control plane."""
SKIPPED = {
    "make run": "runs 40 steps of the tiny job (about a minute idle); "
    "test_make_run_is_the_command_readme_describes checks that its recipe is the "
    "`hetmoe run` line README describes, and tests/local/test_run.py runs that command "
    "end to end (shortened)",
    "make test": "is this test suite; running it from inside itself would recurse",
    "make cluster-up": "starts the developer's detached cluster in "
    "~/.cache/hetmoe/dev-cluster, and make cluster-down stops it: run from the suite they "
    "would stop a cluster someone is using. Both are `python -m tests.cluster up/down` "
    "around the same ControlPlane and topology code as the `control_plane` fixture",
    "make cluster-down": "see make cluster-up",
    "export KUBECONFIG=~/.cache/hetmoe/dev-cluster/admin.kubeconfig": "points kubectl at "
    "the dev cluster; test_export_line_is_where_cluster_up_writes_the_kubeconfig checks "
    "the path, and the kubectl commands run with the fixture's kubeconfig instead",
}
"""README commands not run by the suite, each with why and what covers it instead."""


def readme_commands() -> list[str]:
    """Every command line of README's shell blocks, in order, comments stripped."""
    commands = []
    for language, body in FENCE.findall(README):
        if language not in SHELL:
            continue
        for line in body.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def local_commands() -> list[str]:
    return [c for c in readme_commands() if c not in SKIPPED and LOCAL.match(c)]


def cluster_commands() -> list[str]:
    return [c for c in readme_commands() if c not in SKIPPED and CLUSTER.match(c)]


def test_every_readme_command_is_run_or_skipped_with_a_reason() -> None:
    commands = readme_commands()
    assert {"make run", "make test"} <= set(commands), "README lost its two commands"
    unhandled = [
        c for c in commands if c not in SKIPPED and not LOCAL.match(c) and not CLUSTER.match(c)
    ]
    assert not unhandled, (
        f"README commands no test runs: {unhandled}; run them in tests/test_readme.py or "
        "tests/integration/operator/test_readme_commands.py, or add them to SKIPPED with why"
    )
    stale = set(SKIPPED) - set(commands)
    assert not stale, f"SKIPPED lists commands README no longer has: {stale}"


@pytest.mark.parametrize("command", local_commands())
def test_readme_command_works_as_written(command: str) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{command} printed nothing"


def test_make_run_is_the_command_readme_describes() -> None:
    described = re.search(r"## What `make run` does\s+`([^`]+)`", README)
    assert described, "README no longer says which command `make run` runs"
    recipe = subprocess.run(
        ["make", "-n", "run"], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    ).stdout
    assert f".venv/bin/{described.group(1)}" in recipe.splitlines()
    from tests.local.conftest import LOCAL_CLUSTER, TINY_JOB

    files = re.findall(r"-(?:f|-cluster) (\S+)", described.group(1))
    assert [REPO / path for path in files] == [TINY_JOB, LOCAL_CLUSTER], "tests/local runs others"


def test_export_line_is_where_cluster_up_writes_the_kubeconfig(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.cluster.__main__ import default_dir
    from tests.cluster.controlplane import KUBECONFIG_FILE

    (line,) = [c for c in readme_commands() if c.startswith("export KUBECONFIG=")]
    monkeypatch.delenv("HETMOE_CACHE", raising=False)  # README's line is for the default
    written = Path(line.removeprefix("export KUBECONFIG=")).expanduser()
    assert written == default_dir() / KUBECONFIG_FILE


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
