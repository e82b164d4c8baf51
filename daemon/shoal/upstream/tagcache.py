"""What tags pointed at, as upstream last answered: fresh for a short TTL, kept for staleness.

A rollout starts many pods of one image on a node at once; within the TTL they share one answer
instead of asking upstream per pod. Older answers stay (bounded, least recently used dropped) as
the "last known" value a caller may choose when upstream is unreachable.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from shoal.content.model import Descriptor

TagKey = tuple[str, str, str]  # registry, repository, tag


@dataclass(frozen=True)
class TagAnswer:
    descriptor: Descriptor | None  # None: upstream said the tag does not exist
    at: float  # clock time of the answer


class TagCache:
    def __init__(
        self, ttl: float, *, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._answers: OrderedDict[TagKey, TagAnswer] = OrderedDict()

    def fresh(self, key: TagKey) -> TagAnswer | None:
        answer = self._answers.get(key)
        if answer is None or self.clock() - answer.at >= self.ttl:
            return None
        return answer

    def last(self, key: TagKey) -> TagAnswer | None:
        return self._answers.get(key)

    def put(self, key: TagKey, descriptor: Descriptor | None) -> None:
        self._answers[key] = TagAnswer(descriptor, self.clock())
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)
