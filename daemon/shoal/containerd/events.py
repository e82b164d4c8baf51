"""containerd's Events service: subscriptions scoped to the namespace, publishing, decoding."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import UTC
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError

from shoal.containerd.api import content_events_pb2, events_pb2, images_pb2
from shoal.containerd.connection import Connection, quote_filter
from shoal.containerd.model import Event, rpc_error

# Topics that change what a node can serve. /content/create (a blob committed) exists from
# containerd 2.1; older versions simply never match it.
CONTENT_CREATE = "/content/create"
DEFAULT_EVENT_FILTERS = (
    'topic~="^/images/"',
    'topic=="/content/delete"',
    'topic=="/content/create"',
)

_EVENT_TYPES: dict[str, Any] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        images_pb2.ImageCreate,
        images_pb2.ImageUpdate,
        images_pb2.ImageDelete,
        content_events_pb2.ContentCreate,
        content_events_pb2.ContentDelete,
    )
}


def decode_event(envelope: events_pb2.Envelope) -> Event:
    """An Event from an Envelope. The Any's type_url is a bare proto name (no `/`), which
    Any.Unpack rejects, so the payload type is matched by name here."""
    type_url = envelope.event.type_url
    type_name = type_url.rsplit("/", 1)[-1]
    timestamp = (
        envelope.timestamp.ToDatetime(tzinfo=UTC) if envelope.HasField("timestamp") else None
    )
    fields: dict[str, Any] = {}
    cls = _EVENT_TYPES.get(type_name)
    try:
        msg = cls.FromString(envelope.event.value) if cls is not None else None
    except DecodeError:
        msg = None  # left undecoded rather than breaking the stream
    if msg is not None:
        if isinstance(msg, content_events_pb2.ContentCreate | content_events_pb2.ContentDelete):
            fields["digest"] = msg.digest
        else:
            fields["image"] = msg.name
            if not isinstance(msg, images_pb2.ImageDelete):
                fields["labels"] = dict(msg.labels)
    return Event(
        topic=envelope.topic,
        namespace=envelope.namespace,
        type_name=type_name,
        timestamp=timestamp,
        payload=envelope.event.value,
        **fields,
    )


class EventCalls(Connection):
    def subscription(self, filters: Sequence[str] | None) -> Any:
        """A Subscribe call (read it with `events_of`). Subscribe is not scoped by the namespace
        metadata: each filter is scoped explicitly."""
        scope = f"namespace=={quote_filter(self.namespace)}"
        wanted = DEFAULT_EVENT_FILTERS if filters is None else filters
        request = events_pb2.SubscribeRequest(
            filters=[f"{scope},{f}" if f else scope for f in wanted] or [scope]
        )
        return self._api.events.Subscribe(request, metadata=self._metadata)

    async def events_of(self, call: Any) -> AsyncGenerator[Event, None]:
        try:
            async for envelope in call:
                yield decode_event(envelope)
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, "subscribe") from err
        finally:
            call.cancel()

    async def subscribe(self, filters: Sequence[str] | None = None) -> AsyncIterator[Event]:
        """Events of this namespace, as they happen (none are replayed).

        Default filters: image create/update/delete, content create (2.1+) and delete. Pass
        containerd filter expressions (OR-ed) to choose others; `[""]` means every topic.
        Raises ContainerdError when the stream breaks.
        """
        call = self.subscription(filters)
        async for event in self.events_of(call):
            yield event

    async def publish(
        self, topic: str, type_url: str = "google.protobuf.Empty", value: bytes = b""
    ) -> None:
        """Publishes an event in this namespace (topic: `/a/b`, identifier components)."""
        await self._unary(
            f"publish {topic}",
            self._api.events.Publish,
            events_pb2.PublishRequest(topic=topic, event=AnyProto(type_url=type_url, value=value)),
        )
