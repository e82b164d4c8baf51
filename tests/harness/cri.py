"""A pull the way the kubelet asks for one: CRI `runtime.v1.ImageService/PullImage`.

containerd's CRI plugin then fetches in the daemon itself (no client process copying bytes over
gRPC, as `ctr` does), reads hosts.toml from its `config_path`, and unpacks into the snapshotter.
crictl is not packaged here; the request has two nested string fields, so it is encoded by hand:
PullImageRequest.image (1) is an ImageSpec whose image (1) is the reference.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.harness.procs import HarnessError

_METHOD = "/runtime.v1.ImageService/PullImage"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2]) + _varint(len(payload)) + payload


def pull_request(ref: str) -> bytes:
    return _string_field(1, _string_field(1, ref.encode()))


def image_ref(response: bytes) -> str:
    """PullImageResponse.image_ref (1): the image ID containerd stored (`sha256:…`)."""
    if not response or response[0] != (1 << 3 | 2):
        raise HarnessError(f"unexpected PullImage response {response[:40]!r}")
    length, pos, shift = 0, 1, 0
    while True:
        byte = response[pos]
        length |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            break
    return response[pos : pos + length].decode()


def cri_pull(socket: Path | str, ref: str, timeout: float = 900) -> str:
    """Pulls `ref` through containerd's CRI plugin; returns the image ID. Raises HarnessError."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            _METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            return image_ref(call(pull_request(ref), timeout=timeout))
        except grpc.RpcError as exc:
            raise HarnessError(f"CRI pull of {ref} failed: {exc.details()}") from exc
