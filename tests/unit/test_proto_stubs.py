"""The checked-in containerd stubs are exactly what scripts/genproto makes from proto/, and the
protos keep the wire facts (packages, field numbers) containerd 1.6 relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "daemon" / "shoal" / "containerd" / "api"
GENPROTO = ROOT / "scripts" / "genproto"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in directory.iterdir()
        if p.is_file() and not p.name.endswith(".pyc")
    }


def stub_differences(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences between freshly generated stubs and checked-in ones."""
    want, have = _files(expected), _files(actual)
    problems = [f"missing: {name}" for name in sorted(want.keys() - have.keys())]
    problems += [f"extra: {name}" for name in sorted(have.keys() - want.keys())]
    problems += [
        f"differs: {name}" for name in sorted(want.keys() & have.keys()) if want[name] != have[name]
    ]
    return problems


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run([sys.executable, str(GENPROTO), "--out", str(out)], check=True, cwd="/")
    return out


def test_checked_in_stubs_match_generator(fresh: Path) -> None:
    problems = stub_differences(fresh, CHECKED_IN)
    assert not problems, "stale stubs, run scripts/genproto: " + ", ".join(problems)


def test_comparison_catches_each_kind_of_drift(fresh: Path, tmp_path: Path) -> None:
    copy = tmp_path / "api"
    shutil.copytree(fresh, copy)
    assert stub_differences(fresh, copy) == []
    target = copy / "content_pb2.py"
    target.write_bytes(target.read_bytes() + b"# edited\n")
    (copy / "images_pb2_grpc.py").unlink()
    (copy / "stray_pb2.py").write_text("")
    assert stub_differences(fresh, copy) == [
        "missing: images_pb2_grpc.py",
        "extra: stray_pb2.py",
        "differs: content_pb2.py",
    ]


def _field(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]


def test_wire_names_and_field_numbers() -> None:
    from shoal.containerd.api import (
        content_events_pb2,
        content_pb2,
        events_pb2,
        images_pb2,
        introspection_pb2,
        leases_pb2,
        types_pb2,
        version_pb2,
    )

    assert types_pb2.Descriptor.DESCRIPTOR.full_name == "containerd.types.Descriptor"
    assert _field(types_pb2.Descriptor, "annotations") == 5
    assert _field(images_pb2.Image, "target") == 3
    assert _field(images_pb2.Image, "created_at") == 7
    assert _field(images_pb2.Image, "updated_at") == 8
    assert (
        images_pb2.ImageCreate.DESCRIPTOR.full_name == "containerd.services.images.v1.ImageCreate"
    )
    assert (
        content_events_pb2.ContentDelete.DESCRIPTOR.full_name == "containerd.events.ContentDelete"
    )
    assert _field(content_pb2.Info, "labels") == 5
    assert _field(content_pb2.WriteContentRequest, "labels") == 7
    assert _field(content_pb2.Status, "expected") == 6
    assert _field(events_pb2.Envelope, "event") == 4
    assert _field(leases_pb2.CreateRequest, "labels") == 3
    assert _field(introspection_pb2.Plugin, "init_err") == 7
    assert _field(version_pb2.VersionResponse, "revision") == 2
    services = {
        content_pb2: ("containerd.services.content.v1.Content", "ListStatuses"),
        images_pb2: ("containerd.services.images.v1.Images", "List"),
        events_pb2: ("containerd.services.events.v1.Events", "Subscribe"),
        leases_pb2: ("containerd.services.leases.v1.Leases", "Create"),
        version_pb2: ("containerd.services.version.v1.Version", "Version"),
        introspection_pb2: ("containerd.services.introspection.v1.Introspection", "Plugins"),
    }
    for module, (service, method) in services.items():
        found = {s.full_name: s for s in module.DESCRIPTOR.services_by_name.values()}
        assert service in found
        assert method in found[service].methods_by_name
