"""README's cluster commands, run as written against the real control plane.

Every ``helm``/``kubectl``/``hetmoe status`` line of README's shell blocks runs here,
in README order, through bash, with the fixture's kubeconfig and the helm that
build.sh builds on PATH, while the session's ``hetmoe operator`` reconciles (as the
dev-cluster run behind README's sample output did). The two ``helm install`` lines are
alternatives (cluster-wide or one namespace), so each release is uninstalled before
the next. Afterwards ``kubectl get mj`` and ``hetmoe status`` must show the same
values for every printer column, and README's sample outputs must match what the
commands print on the same topology (small-mixed: pools A x3, B x2, D x2).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.integration.operator.conftest import OperatorProcess, eventually
from tests.test_readme import COMMAND_TIMEOUT, FENCE, README, REPO, cluster_commands

pytestmark = pytest.mark.integration

RUNNING_TIMEOUT = 120.0


def shell(command: str, env: dict[str, str], check: bool = True) -> str:
    """Run one command line as written (bash, repository root); its stdout."""
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=COMMAND_TIMEOUT,
    )
    if check:
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def option(command: str, *names: str) -> str:
    """The value of ``-n``-style options in a command line ('' when absent)."""
    words = shlex.split(command)
    for index, word in enumerate(words[:-1]):
        if word in names:
            return words[index + 1]
    return ""


def table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as dicts: values cut at the header's column offsets
    (empty cells, like STEP on kwok nodes, make splitting on spaces ambiguous)."""
    header, *rows = text.rstrip("\n").splitlines()
    words = list(re.finditer(r"\S+", header))
    names = [word.group() for word in words]
    starts = [word.start() for word in words]
    ends = [*starts[1:], None]
    return [
        {name: row[start:end].strip() for name, start, end in zip(names, starts, ends, strict=True)}
        for row in rows
    ]


def status_columns(text: str) -> dict[str, str]:
    """The printer-column lines of ``hetmoe status`` (``  Phase      Running``), by
    upper-cased name as kubectl prints them."""
    columns = {}
    for line in text.splitlines():
        match = re.fullmatch(r"  (Phase|Grades|Step|Restarts|Tokens/s)\s*(.*)", line)
        if match:
            columns[match.group(1).upper()] = match.group(2).strip()
    return columns


def readme_sample(first_word: str) -> str:
    """README's sample output block starting with ``first_word`` (unlabelled fence)."""
    (block,) = [
        body for language, body in FENCE.findall(README) if body.lstrip().startswith(first_word)
    ]
    return str(block)


def test_readme_cluster_commands_work_as_written_and_agree(
    operator: OperatorProcess, control_plane: ControlPlane, tmp_path: Path
) -> None:
    commands = cluster_commands()
    assert commands, "README has no cluster commands"
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig),
        "PATH": f"{control_plane.bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }
    printed: dict[str, str] = {}
    applied: list[str] = []
    try:
        for command in commands:
            if command.startswith("kubectl apply"):
                applied.append(command)
            printed[command] = shell(command, env)
            if command.startswith("helm install"):
                release, namespace = shlex.split(command)[2], option(command, "-n", "--namespace")
                state = json.loads(shell(f"helm status {release} -n {namespace} -o json", env))
                assert state["info"]["status"] == "deployed", state["info"]
                shell(f"helm uninstall {release} -n {namespace} --wait", env)
            if command.startswith("kubectl apply"):
                wait_running(option(command, "-f"), env)
        compare_outputs(printed, env)
    finally:
        for command in applied:
            delete = command.replace("kubectl apply", "kubectl delete", 1)
            shell(f"{delete} --ignore-not-found --wait --timeout=60s", env, check=False)
    assert operator.alive(), operator.log_tail()


def wait_running(manifest: str, env: dict[str, str]) -> None:
    """The applied MoEJob reaches Running (the session operator plans and starts it)."""
    name = json.loads(shell(f"kubectl create --dry-run=client -o json -f {manifest}", env))[
        "metadata"
    ]["name"]

    def phase() -> str | None:
        out = shell(f"kubectl get mj {name} -o jsonpath='{{.status.phase}}'", env, check=False)
        return out if out == "Running" else None

    eventually(phase, RUNNING_TIMEOUT, f"{name} Running", interval=1.0)


def compare_outputs(printed: dict[str, str], env: dict[str, str]) -> None:
    """`kubectl get mj` and `hetmoe status` agree, README's samples are true, and the
    node listing shows every label it asks for."""
    (get_mj,) = [c for c in printed if re.fullmatch(r"kubectl get (mj|moejobs?)", c)]
    (status_command,) = [c for c in printed if " status " in c]
    name = shlex.split(status_command)[-1]
    # Read both again back to back: the job keeps running between README's lines.
    rows = {row["NAME"]: row for row in table(shell(get_mj, env))}
    shown = status_columns(shell(status_command, env))
    assert name in rows, f"{get_mj} does not list {name}: {rows}"
    row = rows[name]
    assert set(shown) == set(row) - {"NAME", "AGE"}, (shown, row)
    assert {column: row[column] for column in shown} == shown
    assert row["PHASE"] == "Running" and row["GRADES"]

    sample = readme_sample("NAME")
    sample_rows = {r["NAME"]: r for r in table(sample)}
    assert sample.split()[: len(row)] == list(row), "README's `kubectl get mj` header is stale"
    assert {c: sample_rows[name][c] for c in ("PHASE", "GRADES", "STEP", "RESTARTS")} == {
        c: row[c] for c in ("PHASE", "GRADES", "STEP", "RESTARTS")
    }, "README's `kubectl get mj` sample does not match this topology's output"
    for command, output in printed.items():
        if command.startswith("kubectl get nodes -L "):
            labels = [key.rsplit("/", 1)[-1].upper() for key in option(command, "-L").split(",")]
            nodes = table(output)
            assert nodes and all(node[label] for node in nodes for label in labels), output
    pools = re.findall(r"^\s+(\S+ \(\w+\): \d+ nodes, \d+ devices)", readme_sample("plan "), re.M)
    status_text = printed[status_command]
    assert pools and all(pool in status_text for pool in pools), (pools, status_text)
