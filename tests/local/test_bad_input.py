"""Bad input to ``hetmoe run``: one clear message, exit code 2, no traceback, no process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.local.conftest import LOCAL_CLUSTER, REPO, TINY_JOB, hetmoe_argv

from hetmoe_operator.cli.main import main
from hetmoe_operator.local.capacity import RANKS_PER_CPU

CLI_TIMEOUT = 120


def _tiny(tmp_path: Path, name: str, **spec_changes: object) -> Path:
    manifest = yaml.safe_load(TINY_JOB.read_text())
    for dotted, value in spec_changes.items():
        node = manifest["spec"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _one_node_cluster(tmp_path: Path, name: str, *, devices: int, memory_gib: float) -> Path:
    cluster = yaml.safe_load(LOCAL_CLUSTER.read_text())
    cluster["catalog"]["grades"][0]["memoryGib"] = memory_gib
    cluster["pools"] = [{"name": "big", "grade": "sim-fast", "nodes": 1, "devicesPerNode": devices}]
    path = tmp_path / f"{name}-cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (argv, text the message must contain)."""
    run_dir = tmp_path / "run"
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("spec: [unclosed\n")
    too_many = RANKS_PER_CPU * (os.cpu_count() or 1) + 4
    crowded = _tiny(
        tmp_path, "crowded", training__globalBatchSize=too_many, placement__dataParallel=too_many
    )
    crowded_argv = hetmoe_argv(crowded, run_dir)
    crowded_argv[crowded_argv.index("--cluster") + 1] = str(
        _one_node_cluster(tmp_path, "crowded", devices=min(too_many, 64), memory_gib=16)
    )
    huge = hetmoe_argv(_tiny(tmp_path, "lite", model={"preset": "ling-lite"}), run_dir)
    huge[huge.index("--cluster") + 1] = str(
        _one_node_cluster(tmp_path, "huge", devices=1, memory_gib=100000)
    )
    return {
        "missing file": (hetmoe_argv(tmp_path / "absent.yaml", run_dir), "no such file"),
        "malformed yaml": (hetmoe_argv(malformed, run_dir), "not valid YAML"),
        "unknown preset": (
            hetmoe_argv(_tiny(tmp_path, "giant", model={"preset": "ling-giant"}), run_dir),
            "model.preset",
        ),
        "too big for the local devices": (
            hetmoe_argv(_tiny(tmp_path, "plus", model={"preset": "ling-plus"}), run_dir),
            "cannot plan job",
        ),
        "too big for this machine's memory": (huge, "GiB of host memory"),
        "more ranks than this machine runs": (crowded_argv, "worker processes"),
        "bad fault spec": (
            hetmoe_argv(TINY_JOB, run_dir, "--inject-fault", "rank=x"),
            "rank=R,step=S[,seconds=X] with whole numbers",
        ),
        "missing cluster file": (
            [*hetmoe_argv(TINY_JOB, run_dir)[:-2], "--cluster", str(tmp_path / "none.yaml")],
            "no such file",
        ),
    }


CASES = [
    "missing file",
    "malformed yaml",
    "unknown preset",
    "too big for the local devices",
    "too big for this machine's memory",
    "more ranks than this machine runs",
    "bad fault spec",
    "missing cluster file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_message_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = _cases(tmp_path)[case]
    # In-process for speed: ``main`` is exactly what the console script runs.
    code = main(argv[3:])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("hetmoe: error:"), err
    assert expected in err, err
    assert "Traceback" not in out + err
    # Nothing was started: no worker ever wrote a log.
    assert not (tmp_path / "run" / "logs").exists()


def test_bad_input_exit_code_of_the_real_command(tmp_path: Path) -> None:
    argv, expected = _cases(tmp_path)["unknown preset"]
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO, timeout=CLI_TIMEOUT, check=False
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_fresh_refuses_to_delete_a_directory_it_did_not_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "run" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    code = main(hetmoe_argv(TINY_JOB, tmp_path / "run", "--fresh")[3:])
    assert code == 2
    assert "did not create (notes.txt)" in capsys.readouterr().err
    assert precious.read_text() == "keep me"
