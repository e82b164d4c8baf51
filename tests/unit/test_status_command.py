"""`shoal status --cluster`: every member the node names, asked on the same metrics port at its
own address; unreachable members listed as such; the exit status says whether all are ready."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shoal.observe import statuscmd


def _facts(host: str, ready: bool, peers: list[str]) -> dict:
    return {
        "node": {"hostname": f"node-{host}"},
        "ready": ready,
        "peers": [{"id": f"id-{p}", "address": f"{p}:30020"} for p in peers],
        "advertised": {"count": 3, "sample": []},
        "served": {"local": 2048, "peer": 0, "upstream": 5 * 1024 * 1024},
        "last_problem": None if ready else {"message": "no peer yet"},
    }


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(self.server.facts).encode()  # type: ignore[attr-defined]
        self.send_response(200 if self.path == "/status.json" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cluster() -> Iterator[int]:
    """Nodes at 127.0.0.1 and 127.0.0.2 on one port; 127.0.0.3 is named but answers nothing."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    servers = []
    for host, ready, peers in (
        ("127.0.0.1", True, ["127.0.0.2", "127.0.0.3"]),
        ("127.0.0.2", False, ["127.0.0.1"]),
    ):
        server = ThreadingHTTPServer((host, port), _Handler)
        server.facts = _facts(host, ready, peers)  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield port
    for server in servers:
        server.shutdown()
        server.server_close()


def _run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    statuscmd.add_arguments(parser)
    out = io.StringIO()
    return statuscmd.main(parser.parse_args(list(argv)), out), out.getvalue()


def test_cluster_lists_every_member_with_its_readiness(cluster: int) -> None:
    rc, text = _run("--address", f"127.0.0.1:{cluster}", "--cluster", "--timeout", "2")
    header, *rows = text.splitlines()
    assert header.split()[:3] == ["node", "address", "ready"]
    cells = {r.split()[1]: r.split() for r in rows}
    assert set(cells) == {f"127.0.0.{i}:{cluster}" for i in (1, 2, 3)}
    assert cells[f"127.0.0.1:{cluster}"][:4] == [
        "node-127.0.0.1",
        f"127.0.0.1:{cluster}",
        "yes",
        "2",
    ]
    assert cells[f"127.0.0.2:{cluster}"][2] == "no"
    assert "no peer yet" in rows[1]
    assert cells[f"127.0.0.3:{cluster}"][2] == "unreachable"
    assert "upstream 5.0 MiB" in rows[0] and "local 2.0 KiB" in rows[0]
    assert rc == 1  # one member not ready, one unreachable


def test_one_node_alone_and_as_json(cluster: int) -> None:
    rc, text = _run("--address", f"127.0.0.1:{cluster}")
    assert len(text.splitlines()) == 2 and rc == 0
    rc, text = _run("--address", f"127.0.0.1:{cluster}", "--cluster", "--json")
    answers = json.loads(text)
    assert [a["error"] is None for a in answers] == [True, True, False]
    assert answers[0]["status"]["node"]["hostname"] == "node-127.0.0.1"
