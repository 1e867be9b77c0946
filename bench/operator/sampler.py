"""A tiny in-process sampling profiler for the operator subprocess (py-spy stand-in).

cProfile sees only the thread that enabled it, while the operator's time is spread
over the kopf event loop and two thread pools; sampling ``sys._current_frames()``
sees every thread. Run a module under it and get, at exit, the functions that were
on the stack most often (inclusive) and at the top of the stack (exclusive):

    python -m bench.operator.sampler OUT.txt -m hetmoe_operator.cli.operator_command ...

Idle threads (blocked in a socket read, a lock or a selector) are counted under
their waiting frame; the report lists them too, so "waiting on the API server" and
"burning CPU in Python" are told apart by the leaf function names.
"""

from __future__ import annotations

import atexit
import collections
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

INTERVAL_SECONDS = 0.005
TOP = 60


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


class Sampler:
    """Counts stack frames of every thread but its own, every INTERVAL_SECONDS."""

    def __init__(self) -> None:
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.exclusive: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                self.samples += 1
                self.exclusive[_where(frame)] += 1
                seen: set[str] = set()
                current: FrameType | None = frame
                while current is not None:
                    where = _where(current)
                    if where not in seen:
                        seen.add(where)
                        self.inclusive[where] += 1
                    current = current.f_back
            time.sleep(INTERVAL_SECONDS)

    def report(self, path: Path) -> None:
        self._stop.set()
        lines = [f"samples (thread-stacks): {self.samples}", "", "exclusive (top of stack):"]
        lines += [f"{n:8d} {w}" for w, n in self.exclusive.most_common(TOP)]
        lines += ["", "inclusive (anywhere on the stack):"]
        lines += [f"{n:8d} {w}" for w, n in self.inclusive.most_common(TOP)]
        path.write_text("\n".join(lines) + "\n")


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] != "-m":
        raise SystemExit("usage: python -m bench.operator.sampler OUT -m MODULE [ARGS...]")
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    sampler = Sampler()
    atexit.register(sampler.report, out)
    # SIGTERM must unwind (so atexit runs) even if the module installs no handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sampler.start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
