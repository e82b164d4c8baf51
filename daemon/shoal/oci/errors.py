"""OCI distribution error codes and the JSON body every 4xx carries."""

from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """An error answered to the client as `{"errors": [{"code", "message", "detail"}]}`."""

    status = 400
    code = "UNSUPPORTED"

    def __init__(self, message: str = "", detail: Any = None, *, status: int | None = None) -> None:
        super().__init__(message or self.code.lower().replace("_", " "))
        self.message = message or self.code.lower().replace("_", " ")
        self.detail = detail
        if status is not None:
            self.status = status

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()


class BlobUnknown(RegistryError):
    status, code = 404, "BLOB_UNKNOWN"


class ManifestUnknown(RegistryError):
    status, code = 404, "MANIFEST_UNKNOWN"


class NameUnknown(RegistryError):
    status, code = 404, "NAME_UNKNOWN"


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class SizeInvalid(RegistryError):
    status, code = 400, "SIZE_INVALID"


class RangeInvalid(RegistryError):
    status, code = 416, "RANGE_INVALID"


class Unsupported(RegistryError):
    status, code = 405, "UNSUPPORTED"


class Unauthorized(RegistryError):
    status, code = 401, "UNAUTHORIZED"


class Denied(RegistryError):
    status, code = 403, "DENIED"
