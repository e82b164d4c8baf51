"""What the benches measure about processes, from /proc (no cgroups: the simulated nodes are
processes of this host, each in a network namespace only)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _stat_seconds(stat: Path, fields: slice) -> float:
    """Seconds from the clock-tick `fields` of a /proc stat file (after the command name)."""
    values = stat.read_text().rsplit(")", 1)[1].split()[fields]
    return sum(int(v) for v in values) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) and its reaped children, from /proc."""
    return _stat_seconds(Path(f"/proc/{pid}/stat"), slice(11, 15))


def thread_cpu_seconds(pid: int, name: str) -> float:
    """User + system CPU of the threads of process `pid` that the kernel calls `name` (the
    routing thread names itself: `shoal.routing.bridge`)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                total += _stat_seconds(task / "stat", slice(11, 13))  # utime, stime
        except OSError:  # the thread ended meanwhile
            continue
    return total


def reset_peak_rss(pid: int) -> None:
    """Start the process's peak RSS (VmHWM) afresh at its current RSS (`clear_refs` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    """Bytes: the highest resident set of the process since its start or the last reset, as
    the kernel tracks it (no sampling, so no spike is missed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def warm_memory(gib: float) -> None:
    """Writes `gib` GiB in a child process that then exits: the pages are backed by the host
    again and free, so the next run's page cache writes cost what they cost on a normal node
    (README, "The rollout bench"). 0 turns it off."""
    if gib > 0:
        code = f"b = bytearray(b'w') * {int(gib * (1 << 30))}"
        subprocess.run([sys.executable, "-c", code], check=True)


def node_arguments(parser: argparse.ArgumentParser, shoal_example: str) -> None:
    """The options every multi-node bench takes: memory warming, extra `shoal run` arguments
    (`shoal_example` shows one), the containerd version."""
    from tests.harness.runtime import ENV, PRIMARY, VERSIONS

    parser.add_argument(
        "--warm-gib", type=float, default=4.0,
        help="GiB of memory written and freed before each run or phase (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--shoal-arg", action="append", default=[],
        help=f"extra `shoal run` argument, e.g. --shoal-arg={shoal_example}",
    )  # fmt: skip
    parser.add_argument(
        "--containerd", choices=VERSIONS, default=None,
        help=f"containerd version (default ${ENV}, else {PRIMARY})",
    )  # fmt: skip
