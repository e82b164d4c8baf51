"""Go programs shoal is tested and benchmarked against, built from their Go modules.

The module versions live here and nowhere else; `scripts/go-install` builds each binary once
per version through the Go module proxy (never committed). `python -m tests.harness.gotools
NAME...` builds ahead of time (scripts/setup.sh does it for what the tests need).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import HarnessError

__all__ = ["CONFORMANCE", "PROGRAMS", "SPEGEL", "GoProgram", "binary"]

_GO_INSTALL = Path(__file__).resolve().parents[2] / "scripts" / "go-install"


@dataclass(frozen=True)
class GoProgram:
    module: str
    version: str
    package: str  # relative to the module; "." for its root
    name: str  # the binary `go install` makes of it


# The OCI distribution-spec conformance suite, built as a command (its `go test` form is
# deprecated by the suite itself).
CONFORMANCE = GoProgram(
    "github.com/opencontainers/distribution-spec/conformance",
    "v0.0.0-20260831232431-97274622c111",
    ".",
    "conformance",
)
# Spegel v0.7.4 is the current release, but the Go module proxy reachable here refuses it
# (403 "This module version is not available"); v0.7.3 is the newest it serves.
SPEGEL = GoProgram("github.com/spegel-org/spegel", "v0.7.3", ".", "spegel")

PROGRAMS = {"conformance": CONFORMANCE, "spegel": SPEGEL}


def binary(program: GoProgram, timeout: float = 1800) -> Path:
    """Path of the program's binary, built first if this machine has none of that version.
    Raises HarnessError when it cannot be had (no Go toolchain, proxy refuses the version)."""
    try:
        proc = subprocess.run(
            [str(_GO_INSTALL), program.module, program.version, program.package],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"building {program.module}@{program.version} timed out") from exc
    if proc.returncode != 0:
        raise HarnessError(
            f"cannot build {program.module}@{program.version}:\n{proc.stderr.strip()[-2000:]}"
        )
    path = Path(proc.stdout.strip()) / program.name
    if not path.is_file():
        raise HarnessError(f"go-install made no {path}")
    return path


def main(argv: list[str]) -> int:
    for name in argv or list(PROGRAMS):
        print(binary(PROGRAMS[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
