"""`shoal load <OCI layout directory | OCI or docker-archive tar | ->` on a node."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from shoal.config import OPTIONS
from shoal.containerd.ingest import IngestClient
from shoal.containerd.model import ContainerdError
from shoal.load.archive import ArchiveError, Source
from shoal.load.loader import Loader, Options, Refused, describe, progress_line

_DEFAULTS = {o.name: o.default for o in OPTIONS}
PROGRESS_TTY = 0.5  # seconds between progress updates on a terminal
PROGRESS_LOG = 10.0  # ... and as lines on anything else (a CI log, a file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "archive", help="an OCI image layout directory, an OCI archive or a docker-archive tar "
        "(plain or compressed), or - for standard input",
    )  # fmt: skip
    parser.add_argument(
        "--name",
        help="<registry>/<repository>[:<tag>]: whose tags the archive's bare tags are, or the "
        "name of an image the archive does not name",
    )
    parser.add_argument(
        "--registry", default="docker.io",
        help="the registry of names in the archive that state none (default: docker.io)",
    )  # fmt: skip
    parser.add_argument(
        "--private", action="store_true",
        help="never share what is loaded with other nodes (by default loading shares it)",
    )  # fmt: skip
    parser.add_argument("--containerd-socket", default=_DEFAULTS["containerd_socket"])
    parser.add_argument("--containerd-namespace", default=_DEFAULTS["containerd_namespace"])


async def _progress(line: Callable[[], str], err: TextIO) -> None:
    tty = err.isatty()
    await asyncio.sleep(1.0)  # short loads print nothing but their result
    while True:
        if tty:
            err.write("\r\x1b[K" + line())
        else:
            err.write(line() + "\n")
        err.flush()
        await asyncio.sleep(PROGRESS_TTY if tty else PROGRESS_LOG)


async def _load(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    options = Options(name=args.name, registry=args.registry, private=args.private)
    source = Source(args.archive)
    async with IngestClient(args.containerd_socket, args.containerd_namespace) as client:
        loader = Loader(client, options)
        ticker = asyncio.ensure_future(_progress(progress_line(source, loader.outcome), err))
        try:
            outcome = await loader.load(source)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if err.isatty():
                err.write("\r\x1b[K")
    for line in describe(outcome):
        out.write(line + "\n")
    return 0


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        return asyncio.run(_load(args, out, err))
    except (Refused, ArchiveError, ContainerdError) as exc:
        err.write(f"shoal load: {exc}; nothing was named\n")
        return 1
    except KeyboardInterrupt:
        err.write("shoal load: interrupted; nothing was named\n")
        return 130
