"""The commands that talk to a cluster say so in one line when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetmoe_operator.cli.main import main

DEAD_CLUSTER = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: c, context: {cluster: c, user: u, namespace: team}}]
current-context: c
users: [{name: u, user: {token: x}}]
"""


@pytest.mark.parametrize("argv", [["status", "tiny"], ["operator"]])
def test_without_a_kubeconfig_the_error_is_one_line_with_the_way_out(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hetmoe: error: no usable kubeconfig at {missing}"), err
    assert "hetmoe run" in err and "Traceback" not in err


def test_status_of_an_unreachable_cluster_names_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(DEAD_CLUSTER)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert main(["status", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmoe: error: cannot reach the Kubernetes API server at "), err
    assert "127.0.0.1:1" in err and err.count("\n") == 1, err
