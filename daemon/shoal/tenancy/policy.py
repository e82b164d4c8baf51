"""Opt-in sharing: what an operator declares shareable whatever shoal learned (README, "Private
images stay private"). The defaults share only content its registry serves anonymously."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from shoal.tenancy.status import Status


class SharePolicy:
    def __init__(
        self,
        registries: Iterable[str] = (),
        repositories: Iterable[str] = (),
        unknown: bool = False,
    ) -> None:
        """`registries`: patterns of registry names as containerd names them (`docker.io`,
        `registry.internal:5000`, `*.corp.example`); `repositories`: patterns of
        `<registry>/<repository>` (`docker.io/library/*`); `unknown`: share content whose
        status could not be learned (registry unreachable or not allow-listed)."""
        self.registries = [p.strip().lower() for p in registries if p.strip()]
        self.repositories = [p.strip().lower() for p in repositories if p.strip()]
        self.unknown = unknown

    def opted_in(self, registry: str, repository: str) -> bool:
        if any(fnmatchcase(registry, p) for p in self.registries):
            return True
        name = f"{registry}/{repository}"
        return any(fnmatchcase(name, p) for p in self.repositories)

    def shares(self, status: Status, registry: str, repository: str) -> bool:
        if status is Status.PUBLIC or self.opted_in(registry, repository):
            return True
        return status is Status.UNKNOWN and self.unknown
