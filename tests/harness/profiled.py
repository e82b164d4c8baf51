"""Runs `shoal` under cProfile with each thread's own CPU time as the clock (the work done, not
time spent waiting): `python -m tests.harness.profiled OUT shoal-args...` writes OUT for the
event loop and OUT.<thread name> for each other long-lived thread (the routing thread's trio)."""

from __future__ import annotations

import cProfile
import runpy
import sys
import threading
import time


def _profile_threads(out: str) -> None:
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        if self.name.startswith("asyncio_"):  # to_thread workers: short calls, seen as waits
            run(self)
            return
        profile = cProfile.Profile(time.thread_time)
        try:
            profile.runcall(run, self)
        finally:
            profile.dump_stats(f"{out}.{self.name}")

    threading.Thread.run = profiled_run  # type: ignore[method-assign]


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["shoal", *sys.argv[2:]]
    _profile_threads(out)
    profile = cProfile.Profile(time.thread_time)
    try:
        profile.runcall(runpy.run_module, "shoal.cli", run_name="__main__")
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
