"""Raw HTTP requests for fuzzing a registry: valid pulls with odd parts, and malformed HTTP.

`cases(rng, known)` yields Cases forever: each is complete (it ends its headers, and its body
if it has one), so a server owes it an answer (pipelined ones, one per request).
`known` are names, tags and digests the server holds, so that some requests reach content.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
ODD = ["\x00", "\x01", "\x7f", "\r", "\n", "\t", " ", "%", "%00", "%0d%0a", "é", "²", "/..", "?"]


@dataclass(frozen=True)
class Known:
    ns: str
    repository: str
    tags: tuple[str, ...]
    digests: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    family: str
    data: bytes
    heads: tuple[bool, ...] = (False,)  # per answer owed: whether it answers a HEAD


def _text(rng: random.Random, size: int = 12) -> str:
    pool = "abcdefghijklmnopqrstuvwxyz0123456789-._/:@"
    text = [rng.choice(pool) for _ in range(rng.randint(0, size))]
    if rng.random() < 0.5:  # half of them with something odd somewhere
        text.insert(rng.randint(0, len(text)), rng.choice(ODD))
    return "".join(text)


def _maybe_quote(rng: random.Random, text: str) -> str:
    return urllib.parse.quote(text, safe="/:@") if rng.random() < 0.7 else text


def _digest(rng: random.Random, known: Known) -> str:
    pick = rng.random()
    if pick < 0.4 and known.digests:
        return rng.choice(known.digests)
    if pick < 0.7:
        return "sha256:" + "".join(rng.choice("0123456789abcdef") for _ in range(64))
    algo = rng.choice(["sha256", "sha512", "md5", "SHA256", ""])
    return f"{algo}:" + "".join(
        rng.choice("0123456789abcdefXYZ=_-") for _ in range(rng.randint(0, 130))
    )


def _ns(rng: random.Random, known: Known) -> str | None:
    pick = rng.random()
    if pick < 0.6:
        return known.ns
    if pick < 0.68:
        return None
    if pick < 0.8:
        return rng.choice(["docker.io", "quay.io", "127.0.0.1:1", "[::1]:5000", "localhost"])
    return _text(rng, 30)


def _target(rng: random.Random, known: Known) -> str:
    repo = known.repository if rng.random() < 0.75 else _maybe_quote(rng, _text(rng, 40))
    kind = rng.choice(["manifests", "blobs", "manifests", "blobs", "tags/list", "uploads"])
    ref = (
        _digest(rng, known)
        if rng.random() < 0.65
        else rng.choice([*known.tags, "latest", _text(rng)])
    )
    path = f"/v2/{repo}/{kind}/{_maybe_quote(rng, ref)}"
    if rng.random() < 0.1:
        path = rng.choice(["/v2/", "/v2", "/", "/_shoal/p2p", "//v2//", "/v2/../../etc/passwd"])
    query: dict[str, str] = {}
    ns = _ns(rng, known)
    if ns is not None:
        query["ns"] = ns
    if rng.random() < 0.1:
        query[rng.choice(["shoal-peer", "shoal-fetch", "x", "ns"])] = _text(rng)
    if query:
        path += "?" + urllib.parse.urlencode(query)
    if rng.random() < 0.05:
        path = "http://shoal.example" + path
    return path


def _range(rng: random.Random) -> str:
    a, b = rng.randint(0, 10**7), rng.randint(0, 10**7)
    return rng.choice(
        [f"bytes={a}-", f"bytes={a}-{b}", f"bytes=-{b}", f"bytes={a}-{b},{b}-", "bytes=",
         f"items={a}-", f"bytes={a}", "bytes=-0", f"bytes= {a} - {b}", _text(rng)]
    )  # fmt: skip


def _headers(rng: random.Random) -> list[str]:
    out = ["Host: shoal"] if rng.random() < 0.95 else []
    if rng.random() < 0.3:
        out.append(f"Range: {_range(rng)}")
    if rng.random() < 0.3:
        out.append(
            "Accept: " + rng.choice(["*/*", "application/vnd.oci.image.index.v1+json", _text(rng)])
        )
    if rng.random() < 0.1:
        out.append("X-Shoal-Peer: 1")
    if rng.random() < 0.1:
        out.append("Connection: " + rng.choice(["close", "keep-alive", "upgrade", _text(rng)]))
    for _ in range(rng.randint(0, 3)):
        name = "X-" + "".join(rng.choice("abcXYZ-09") for _ in range(rng.randint(1, 12)))
        out.append(f"{name}: {_text(rng, 40)}")
    return out


def _request(rng: random.Random, known: Known) -> Case:
    method = rng.choice(METHODS[:2] * 6 + METHODS)
    head = f"{method} {_target(rng, known)} HTTP/1.1\r\n"
    lines = _headers(rng)
    body = b""
    if method in ("POST", "PUT", "PATCH") and rng.random() < 0.7:
        body = rng.randbytes(rng.randint(0, 2000))
        lines.append(f"Content-Length: {len(body)}")
    raw = (head + "".join(f"{h}\r\n" for h in lines) + "\r\n").encode("utf-8", "replace")
    return Case("request", raw + body, heads=(method == "HEAD",))


def _malformed(rng: random.Random, known: Known) -> Case:
    target = _target(rng, known)
    choices: list[bytes] = [
        b"GARBAGE\r\n\r\n",
        f"GET {target}\r\n\r\n".encode(errors="replace"),  # no version
        f"GET {target} HTTP/9.9\r\nHost: x\r\n\r\n".encode(errors="replace"),
        f"GET {target} HTTP/1.1 extra\r\nHost: x\r\n\r\n".encode(errors="replace"),
        f"G\x00T {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(errors="replace"),
        b"GET /v2/\xff\xfe\xfd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * rng.randint(8200, 20000) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX : y\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"v" * rng.randint(8200, 20000) + b"\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(200))
        + b"\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n folded: line\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: \xc3\xa9\xff\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n",
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /v2/ HTTP/1.0\r\n\r\n",
        b"GET http://[::1/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(40) + b"\r\n\r\n",
        rng.randbytes(rng.randint(1, 300)).replace(b"\r\n\r\n", b"") + b"\r\n\r\n",
    ]
    return Case("malformed", rng.choice(choices))


def _pipelined(rng: random.Random, known: Known) -> Case:
    first = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
    target = urllib.parse.quote(_target(rng, known), safe="/:@?=&%")  # valid HTTP: both owed
    second = f"HEAD {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return Case("pipelined", first + second, heads=(False, True))


def cases(rng: random.Random, known: Known) -> Iterator[Case]:
    while True:
        pick = rng.random()
        if pick < 0.6:
            yield _request(rng, known)
        elif pick < 0.95:
            yield _malformed(rng, known)
        else:
            yield _pipelined(rng, known)
