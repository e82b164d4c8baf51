"""`WWW-Authenticate` challenges (RFC 9110 §11.6.1), as registries send them.

    Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."
    Basic realm="Registry Realm"

Several challenges may share one header or come in several headers; parameters we cannot parse
end that challenge rather than failing the whole header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})(?:\s+|$)")
# Values should be tokens or quoted strings; unquoted URLs are seen in the wild, so accepted.
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|[^\s,\"]+)\s*(?:,|$)")
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    out: list[Challenge] = []
    for text in values:
        pos = 0
        while pos < len(text):
            scheme = _SCHEME.match(text, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            while (param := _PARAM.match(text, pos)) is not None:
                value = param.group(2)
                if value.startswith('"'):
                    value = _ESCAPE.sub(r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                pos = param.end()
            out.append(Challenge(scheme.group(1).lower(), params))
    return out


def pick(challenges: list[Challenge], have_credentials: bool) -> Challenge | None:
    """Bearer if offered (it works anonymously too); Basic only when there is something to send."""
    for challenge in challenges:
        if challenge.scheme == "bearer" and challenge.realm:
            return challenge
    if have_credentials:
        for challenge in challenges:
            if challenge.scheme == "basic":
                return challenge
    return None
