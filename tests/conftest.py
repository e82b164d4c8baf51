"""Session-wide options: which containerd the e2e tests run on."""

from __future__ import annotations

import os

import pytest

from tests.harness import runtime


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--containerd",
        choices=runtime.VERSIONS,
        default=None,
        help=f"containerd version for e2e tests (default ${runtime.ENV}, else {runtime.PRIMARY}; "
        "scripts/containerd-versions.sh prepares them)",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--containerd")
    if chosen:
        os.environ[runtime.ENV] = chosen  # the harness (and anything it starts) reads this
    try:
        rt = runtime.selected()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if rt.explicit and not rt.available():
        raise pytest.UsageError(rt.missing_reason())


def pytest_report_header(config: pytest.Config) -> str:
    rt = runtime.selected()
    state = "" if rt.available() else f" (not prepared: {rt.missing_reason()})"
    return f"containerd: {rt.version} from {rt.bin_dir}{state}"
