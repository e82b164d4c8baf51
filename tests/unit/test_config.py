"""`shoal run` options: every setting as a flag and as a SHOAL_* variable, flags winning."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from shoal.config import OPTIONS, Settings, add_run_options


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_run_options(parser, env)
    return Settings.from_namespace(parser.parse_args(argv))


def test_every_setting_has_exactly_one_option() -> None:
    assert [opt.name for opt in OPTIONS] == [f.name for f in fields(Settings)]
    assert parse([], {}) == Settings.defaults()


def test_environment_then_flags() -> None:
    env = {
        "SHOAL_LISTEN": "127.0.0.1:5000",
        "SHOAL_MIRROR_REGISTRIES": "docker.io, quay.io",
        "SHOAL_READY_ALONE": "true",
        "SHOAL_RESYNC_INTERVAL": "7.5",
        "SHOAL_TAG_POLICY": "peers",
    }
    s = parse([], env)
    assert s.listen == "127.0.0.1:5000"
    assert s.mirror_registries == ["docker.io", "quay.io"]
    assert s.ready_alone is True and s.resync_interval == 7.5 and s.tag_policy == "peers"
    s = parse(["--listen", "[::]:6000", "--tag-policy", "digest-only", "--ready-alone", "no"], env)
    assert s.listen == "[::]:6000" and s.tag_policy == "digest-only" and s.ready_alone is False


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--tag-policy", "sometimes"], {}),
        ([], {"SHOAL_TAG_POLICY": "sometimes"}),
        ([], {"SHOAL_READY_ALONE": "maybe"}),
        (["--resync-interval", "soon"], {}),
        (["--no-such-flag"], {}),
    ],
)
def test_bad_values_are_refused(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv, env)
