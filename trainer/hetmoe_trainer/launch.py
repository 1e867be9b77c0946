"""torchrun, but the agent exits with the code that says what went wrong.

torchrun (torch.distributed.run) turns any worker failure into its own exit code 1,
so the pod would hide the trainer's :class:`~hetmoe_operator.plan.WorkerExit` codes
(78 config error, 86 replace this node, 87 rollbacks exhausted) from the operator.
This wrapper runs torchrun unchanged and, when workers fail, exits with the most
telling of their codes: a hetmoe code if any worker used one, else the first failure's.

Usage is torchrun's: ``python -m hetmoe_trainer.launch [torchrun args] -m hetmoe_trainer ...``
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from hetmoe_operator.plan import WorkerExit

# Most specific first: a config error explains the others, a node to replace beats
# an exhausted rollback budget.
_PRIORITY = (WorkerExit.CONFIG_ERROR, WorkerExit.REPLACE_NODE, WorkerExit.ROLLBACK_EXHAUSTED)


def telling_exit_code(codes: Iterable[int]) -> int:
    """The exit code the agent should report for these worker exit codes."""
    codes = [c for c in codes if c != 0]
    for code in _PRIORITY:
        if code in codes:
            return code
    if not codes:
        return 1
    first = codes[0]
    # A worker killed by a signal has a negative code; shells report 128 + signal.
    return 128 - first if first < 0 else first


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv``; map worker failures to one telling exit code."""
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as error:
        failures = sorted(error.failures.values(), key=lambda f: f.timestamp)
        return telling_exit_code(f.exitcode for f in failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
