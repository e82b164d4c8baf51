"""JSON log lines on stderr, one object per line, for node log collectors."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key.startswith("shoal_"):
                entry[key[6:]] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party debug output (gRPC loop bookkeeping, multiaddr decoding, libp2p's calls on the
    # root logger) drowns shoal's own.
    for noisy in ("grpc", "multiaddr", "libp2p"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
    handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.INFO)
    # aiohttp's access log repeats what the metrics say; keep it for debugging only.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
