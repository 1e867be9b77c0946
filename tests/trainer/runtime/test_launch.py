"""The torchrun wrapper keeps the trainer's exit codes visible to the operator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from hetmoe_operator.plan import (
    CHECKPOINT_DIR_ENV,
    TERMINATION_LOG_ENV,
    WAITING_FOR_PEERS_MARK,
    WorkerExit,
)
from hetmoe_trainer.launch import RendezvousStore, rendezvous_store, telling_exit_code
from hetmoe_trainer.progress import IN_PLACE_RESTART_FILE, LAUNCH_ID_ENV


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([1, 86], 86),
        ([86, 78], 78),
        ([87, 1], 87),
        ([3, 1], 3),
        ([-9], 137),
        ([], 1),
    ],
)
def test_hetmoe_codes_win_over_ordinary_failures(codes: list[int], expected: int) -> None:
    assert telling_exit_code(codes) == expected


LAUNCH_ONE_NODE = (
    sys.executable,
    "-m",
    "hetmoe_trainer.launch",
    "--standalone",
    "--nproc-per-node=2",
)


def _launch_two_workers(
    tmp_path: Path,
    source: str,
    env: dict[str, str] | None = None,
    in_place_restarts: int = 0,
) -> subprocess.CompletedProcess:
    """The wrapper on one node, running ``source`` as two local workers."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(source))
    return subprocess.run(
        [*LAUNCH_ONE_NODE, f"--max-restarts={in_place_restarts}", str(worker)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_a_real_torchrun_agent_exits_with_the_workers_replace_node_code(tmp_path: Path) -> None:
    result = _launch_two_workers(
        tmp_path,
        f"""
        import os, sys
        sys.exit({WorkerExit.REPLACE_NODE} if os.environ["LOCAL_RANK"] == "1" else 1)
        """,
    )
    assert result.returncode == WorkerExit.REPLACE_NODE, result.stderr[-2000:]


def test_the_agent_says_which_worker_died_without_a_word(tmp_path: Path) -> None:
    """Local rank 1 vanishes (as after the OOM killer); rank 0, which the agent then
    stops with SIGTERM, is not named."""
    log = tmp_path / "termination-log"
    result = _launch_two_workers(
        tmp_path,
        """
        import os, time
        if os.environ["LOCAL_RANK"] == "1":
            os._exit(137)
        time.sleep(60)
        """,
        env={TERMINATION_LOG_ENV: str(log)},
    )
    assert result.returncode == 137, result.stderr[-2000:]
    assert log.read_text().splitlines() == ["local rank 1 exited with code 137"]


@pytest.mark.parametrize("code", [1, WorkerExit.HUNG])
def test_a_failed_gang_restarts_in_place_and_the_next_attempt_starts_with_a_clean_log(
    tmp_path: Path, code: int
) -> None:
    """Local rank 1 fails on the first attempt, rank 0 falls with it (stopped by the
    agent: exit 88); the agent restarts both in place (same launch id), empties the
    termination log and records rank 1's own line, not rank 0's, as the reason."""
    log = tmp_path / "termination-log"
    result = _launch_two_workers(
        tmp_path,
        f"""
        import os, signal, sys, time
        from hetmoe_trainer.termination import record_termination
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        with open(os.path.join({str(tmp_path)!r}, "ran"), "a") as ran:
            ran.write(os.environ["LOCAL_RANK"] + ":" + attempt + ":"
                      + os.environ["{LAUNCH_ID_ENV}"] + "\\n")
        ready = os.path.join({str(tmp_path)!r}, "rank0-wrote")
        if attempt == "0":
            if os.environ["LOCAL_RANK"] == "1":
                while not os.path.exists(ready):
                    time.sleep(0.05)
                record_termination("RuntimeError in forward: boom", plan_rank=1)
                sys.exit({code})
            record_termination("RuntimeError in gradient sync {WAITING_FOR_PEERS_MARK}", 0)
            # Stopped by the agent when rank 1 fails, it exits as the trainer may.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit({WorkerExit.STOPPED}))
            open(ready, "w").close()
            time.sleep(60)
        """,
        env={
            TERMINATION_LOG_ENV: str(log),
            CHECKPOINT_DIR_ENV: str(tmp_path),
            "HETMOE_POOL": "pool-a",
            "HETMOE_NODE_SLOT": "3",
        },
        in_place_restarts=2,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted((tmp_path / "ran").read_text().split())
    assert [r.rsplit(":", 1)[0] for r in runs] == ["0:0", "0:1", "1:0", "1:1"]
    assert len({r.rsplit(":", 1)[1] for r in runs}) == 1, "one launch id for every attempt"
    assert log.read_text() == ""
    reason = json.loads((tmp_path / IN_PLACE_RESTART_FILE).read_text())
    assert reason["seat"] == "pool pool-a node slot 3"
    assert reason["lines"] == ["plan rank 1: RuntimeError in forward: boom"]
    assert "in-place restart 1 of 2" in result.stderr


def test_a_node_restarted_for_a_peer_starts_its_next_attempt_with_a_clean_log(
    tmp_path: Path,
) -> None:
    """Two agents (nodes). Node 1's worker crashes; its agent restarts in place and
    rejoins, so node 0's healthy agent restarts its worker for the new member. That
    worker, stopped, writes why to node 0's termination log: gone by the next attempt."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            from hetmoe_trainer.termination import record_termination
            slot = os.environ["HETMOE_NODE_SLOT"]
            started = os.path.join({str(tmp_path)!r}, "started-" + slot)
            if os.path.exists(started):  # this node's second attempt
                sys.exit(0)
            open(started, "w").close()
            if slot == "1":
                time.sleep(1)
                sys.exit(1)

            def stopped(*_):
                record_termination("stopped after step 3", 0)
                sys.exit({WorkerExit.STOPPED})

            signal.signal(signal.SIGTERM, stopped)
            time.sleep(60)
            """
        )
    )
    port = _free_port()
    logs = [tmp_path / f"termination-{index}" for index in range(2)]
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hetmoe_trainer.launch",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=membership",
                f"--rdzv-conf=is_host={'true' if index == 0 else 'false'}",
                "--max-restarts=1",
                str(worker),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                TERMINATION_LOG_ENV: str(logs[index]),
                "HETMOE_NODE_SLOT": str(index),
            },
        )
        for index in range(2)
    ]
    results = [agent.communicate(timeout=180) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [r[1][-2000:] for r in results]
    assert logs[0].read_text() == "", "node 0's stopped worker's line outlived its attempt"


@pytest.mark.parametrize(
    "code", [WorkerExit.CONFIG_ERROR, WorkerExit.REPLACE_NODE, WorkerExit.ROLLBACK_EXHAUSTED]
)
def test_exits_that_ask_the_operator_are_not_restarted_in_place(tmp_path: Path, code: int) -> None:
    result = _launch_two_workers(
        tmp_path,
        f"""
        import os, sys
        with open(os.path.join({str(tmp_path)!r}, "ran"), "a") as ran:
            ran.write(os.environ["LOCAL_RANK"] + "\\n")
        sys.exit({code} if os.environ["LOCAL_RANK"] == "1" else 0)
        """,
        in_place_restarts=2,
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert sorted((tmp_path / "ran").read_text().split()) == ["0", "1"], "ran once"


# The wrapper with the agent's rendezvous shutdown delayed by argv[1] seconds, as a
# loaded node's would be: the window in which a host agent that exits at once takes
# the store with it.
_DELAYED_SHUTDOWN_WRAPPER = textwrap.dedent(
    """
    import sys, time
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    from hetmoe_trainer.launch import main

    delay = float(sys.argv[1])
    original = dr.DynamicRendezvousHandler.shutdown

    def delayed_shutdown(self):
        time.sleep(delay)
        return original(self)

    dr.DynamicRendezvousHandler.shutdown = delayed_shutdown
    sys.exit(main(sys.argv[2:]))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_rendezvous_host_outlives_the_other_agents_shutdown(tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_DELAYED_SHUTDOWN_WRAPPER)
    worker = tmp_path / "worker.py"
    worker.write_text("print('done')\n")
    port = _free_port()
    logs = [tmp_path / f"node{index}.log" for index in range(2)]
    codes, ended = [], []
    with logs[0].open("w") as log0, logs[1].open("w") as log1:
        agents = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(wrapper),
                    "0" if index == 0 else "2",  # only the non-host agent is slow
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=outlive",
                    f"--rdzv-conf=is_host={'true' if index == 0 else 'false'}",
                    "--max-restarts=0",
                    str(worker),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for index, log in enumerate((log0, log1))
        ]
        for agent in agents:
            codes.append(agent.wait(timeout=180))
            ended.append(time.monotonic())
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    # Before the fix the late agent retried the vanished store for ~9 s more.
    assert ended[1] - ended[0] < 5, texts
    for text in texts:
        assert "RendezvousConnectionError" not in text, text
        assert "Traceback" not in text, text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--standalone", "--nproc-per-node=2"], None),
        (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h:1"], None),  # no is_host
        (["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-conf=is_host=true"], None),
        (
            [
                "--nnodes=1:3",
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=h:7",
                "--rdzv-conf=is_host=true",
            ],
            RendezvousStore(host="h", port=7, is_host=True, nnodes=3),
        ),
        (
            ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h", "--rdzv-conf=is_host=false"],
            RendezvousStore(host="h", port=29400, is_host=False, nnodes=2),
        ),
    ],
)
def test_only_an_explicit_multi_node_c10d_host_keeps_the_store(
    argv: list[str], expected: RendezvousStore | None
) -> None:
    assert rendezvous_store(get_args_parser().parse_args([*argv, "train.py"])) == expected
