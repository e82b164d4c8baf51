"""A real distribution registry (`docker-registry serve`, 2.8) for upstream and mirror roles.

distribution writes two kinds of lines: logrus lines on stderr (`msg="response completed" ...`)
and, on stdout, one Apache combined-format line per request once the response is done:

    127.0.0.1 - - [22/Nov/2026:12:08:49 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"

stdout goes to its own file (`access.log`), which `requests()` parses. The size field is the
number of body bytes the handler wrote, so a cut-off transfer shows the partial size; HEAD
lines report the size the handler meant to write, not bytes on the wire.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

from .netns import socket_in_netns
from .procs import HarnessError, Proc, free_port, start, wait_for

__all__ = ["AccessRecord", "Registry", "TokenServer", "http_request", "manifest_digest"]

_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"'
)


class AccessRecord(NamedTuple):
    method: str
    path: str  # without the query string
    status: int
    size: int
    query: str
    user_agent: str
    remote: str


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """Minimal HTTP client (status, lower-cased headers, body); errors are returned too."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    # Never let a proxy from the environment see test traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenHTTPServer

    def _answer(self) -> None:
        self.server.record(self.command, self.path)
        body = json.dumps(
            {"token": "shoal-test-token", "access_token": "shoal-test-token", "expires_in": 300}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], netns: str | None) -> None:
        super().__init__(addr, _TokenHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = socket_in_netns(netns)  # bind inside the registry's namespace
        self.server_bind()
        self.server_activate()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


class TokenServer:
    """Answers every GET/POST with an anonymous Bearer token (for `auth: silly`)."""

    def __init__(self, host: str, netns: str | None = None) -> None:
        self._server = _TokenHTTPServer((host, 0), netns)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def requests(self) -> list[tuple[str, str]]:
        with self._server._lock:
            return list(self._server.requests)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Registry:
    """`docker-registry serve` with filesystem storage.

    `storage_dir` may be shared by several registries (e.g. the same images served on
    127.0.0.1 and on a test network's bridge address) as long as only one of them is pushed to.
    """

    base_dir: Path
    host_ip: str = "127.0.0.1"
    port: int | None = None
    netns: str | None = None
    storage_dir: Path | None = None
    auth: str | None = None  # "silly": Bearer challenges, any token accepted
    realm: str | None = None  # token endpoint for auth; default: a built-in TokenServer
    proxy_remoteurl: str | None = None  # pull-through cache of this upstream
    name: str = "registry"

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.storage_dir is None:
            self.storage_dir = self.base_dir / "storage"
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self.access_log_path = self.base_dir / "access.log"
        self.proc: Proc | None = None
        self.token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        """host:port, as used in image references (no port for port 80, as references name
        real registries; containerd's distribution-source labels drop the port anyway)."""
        return self.host_ip if self.addr.endswith(":80") else self.addr

    @property
    def addr(self) -> str:
        """host:port it listens on."""
        if self.port is None:
            raise HarnessError("registry not started")
        return f"{self.host_ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> dict[str, Any]:
        assert self.storage_dir is not None
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.addr, "secret": "shoal-test-secret"},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth == "silly":
            if self.realm is None and self.token_server is None:
                self.token_server = TokenServer(self.host_ip, self.netns)
            realm = self.realm or self.token_server.realm  # type: ignore[union-attr]
            cfg["auth"] = {"silly": {"realm": realm, "service": "shoal-test-registry"}}
        elif self.auth is not None:
            raise ValueError(f"unsupported auth {self.auth!r}")
        if self.proxy_remoteurl:
            cfg["proxy"] = {"remoteurl": self.proxy_remoteurl}
        return cfg

    def start(self, timeout: float = 15) -> Registry:
        """Start (or restart on the same port after `stop()`); an auto-picked port that a
        concurrent run grabbed first is replaced, up to three times."""
        if self.proc is not None and self.proc.alive():
            return self
        auto_port = self.port is None
        assert self.storage_dir is not None
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            if auto_port:
                self.port = free_port(self.host_ip, self.netns)
            # JSON is YAML; no YAML dependency needed.
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = start(
                ["docker-registry", "serve", str(self.config_path)],
                name=f"{self.name}@{self.host}",
                log_path=self.log_path,
                stdout_path=self.access_log_path,
                netns=self.netns,
            )
            try:
                # The log line, not a TCP probe: someone else may hold the port.
                wait_for(
                    partial(self._logged, log_offset, f'msg="listening on {self.addr}"'),
                    timeout=timeout,
                    what=f"{self.name} on {self.host}",
                    proc=self.proc,
                )
                return self
            except HarnessError:
                self.proc.stop()
                in_use = "address already in use" in self.proc.log_tail(5)
                if not (auto_port and in_use and attempt < 2):
                    raise
        raise AssertionError("unreachable")

    def _logged(self, offset: int, needle: str) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return needle.encode() in f.read()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request log ---------------------------------------------------------------------

    def access_log(self, since: int = 0) -> list[AccessRecord]:
        """Parsed access-log records, from index `since` (see `mark()`)."""
        try:
            lines = self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            m = _ACCESS_RE.match(line)
            if not m:
                continue
            path, _, query = m["uri"].partition("?")
            size = 0 if m["size"] == "-" else int(m["size"])
            records.append(
                AccessRecord(
                    m["method"], path, int(m["status"]), size, query, m["agent"], m["remote"]
                )
            )
        return records[since:]

    def mark(self) -> int:
        """A position in the request log; pass it as `since` to see only later requests."""
        return len(self.access_log())

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path without query, status) of every request answered so far."""
        return [(r.method, r.path, r.status) for r in self.access_log(since)]

    def bytes_sent(self, since: int = 0, *, blobs_only: bool = False) -> int:
        """Body bytes written for GET requests (HEAD sizes are not on the wire)."""
        return sum(
            r.size
            for r in self.access_log(since)
            if r.method == "GET" and (not blobs_only or "/blobs/" in r.path)
        )

    def wait_requests(self, count: int, since: int = 0, timeout: float = 5) -> list[AccessRecord]:
        """Wait until at least `count` records exist after `since`: a line is written only after
        the response completed, so it can trail the client by a few milliseconds."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.access_log(since)
            if len(records) >= count or time.monotonic() >= deadline:
                return records
            time.sleep(0.02)

    def settle(self, quiet: float = 0.2, timeout: float = 5) -> list[AccessRecord]:
        """Wait until no new record appeared for `quiet` seconds; returns all records."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            n = len(self.access_log())
            if n == last:
                break
            last = n
            time.sleep(quiet)
        return self.access_log()

    # --- convenience ---------------------------------------------------------------------

    def manifest_digest(self, repo: str, reference: str) -> str | None:
        """Docker-Content-Digest of a HEAD on the manifest (any manifest type), or None."""
        return manifest_digest(self.url, repo, reference, token="x" if self.auth else None)


_ALL_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def manifest_digest(
    base_url: str, repo: str, reference: str, *, token: str | None = None
) -> str | None:
    """Docker-Content-Digest of `HEAD base_url/v2/repo/manifests/reference`, or None."""
    headers = {"Accept": _ALL_MANIFEST_TYPES}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, hdrs, _ = http_request(
        f"{base_url}/v2/{repo}/manifests/{reference}", method="HEAD", headers=headers
    )
    return hdrs.get("docker-content-digest") if status == 200 else None
