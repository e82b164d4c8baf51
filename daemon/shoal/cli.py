"""The `shoal` command: `run` the daemon, `configure` / `cleanup` containerd's hosts directory;
for operators, `status` of a node or the cluster, `load` an image archive into the node's
containerd, and `preheat` an image on some nodes before a rollout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shoal import __version__
from shoal.config import add_run_options

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the OCI pull API for this node")
    add_run_options(run)

    for name, what in (
        (
            "configure",
            "point containerd at the local shoal (hosts.toml), backing up the old",
        ),
        ("cleanup", "restore the hosts directory exactly as it was before `configure`"),
    ):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument(
            "--hosts-dir",
            default=DEFAULT_HOSTS_DIR,
            help="containerd's config_path; of a `:`-separated list, the first directory is used",
        )
        if name == "configure":
            cmd.add_argument(
                "--mirror",
                required=True,
                help="URL of the local shoal, e.g. http://127.0.0.1:30020",
            )
            cmd.add_argument(
                "--registry",
                action="append",
                default=[],
                help="registry to mirror, `host[:port][=server URL]` (repeatable); `_default` "
                "catches every other registry",
            )
            cmd.add_argument(
                "--resolve-tags",
                type=lambda v: v.lower() in ("1", "true", "yes"),
                default=True,
                help="let containerd ask shoal what a tag means (capability `resolve`)",
            )
    from shoal.load import command as load
    from shoal.observe import statuscmd
    from shoal.preheat import command as preheat

    for name, what, module in (
        ("status", "this node's (or every member's) status as a table", statuscmd),
        ("load", "load an image archive into the node's containerd", load),
        ("preheat", "have nodes fetch and keep an image before a rollout", preheat),
    ):
        module.add_arguments(sub.add_parser(name, help=what))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from shoal.config import Settings
        from shoal.daemon import run_daemon

        return run_daemon(Settings.from_namespace(args))
    if args.command in ("status", "load", "preheat"):
        from shoal.load import command as load
        from shoal.observe import statuscmd
        from shoal.preheat import command as preheat

        commands = {"status": statuscmd.main, "load": load.main, "preheat": preheat.main}
        return commands[args.command](args)
    from shoal import hostsconfig

    if args.command == "configure":
        registries = args.registry or ["_default"]
        hostsconfig.configure(args.hosts_dir, args.mirror, registries, resolve=args.resolve_tags)
        return 0
    hostsconfig.cleanup(args.hosts_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
