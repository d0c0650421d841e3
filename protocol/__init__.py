"""Wire protocol v1 of Sensormine Edge: topics, frames, models, limits, reason codes. No I/O."""

from protocol.errors import ProtocolError, Reason
from protocol.frame import (
    DEFAULT_LIMITS,
    Limits,
    decode_ack,
    decode_batch,
    decode_frame,
    decode_header,
    decode_status,
    encode_frame,
)
from protocol.models import (
    Ack,
    AckResult,
    Batch,
    DeviceStatus,
    Event,
    Frame,
    GatewayStatus,
    Series,
    Value,
)
from protocol.topics import (
    DEFAULT_PREFIX,
    TopicAddress,
    TopicKind,
    build_topic,
    parse_topic,
    subscription,
    validate_prefix,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PREFIX",
    "Ack",
    "AckResult",
    "Batch",
    "DeviceStatus",
    "Event",
    "Frame",
    "GatewayStatus",
    "Limits",
    "ProtocolError",
    "Reason",
    "Series",
    "TopicAddress",
    "TopicKind",
    "Value",
    "build_topic",
    "decode_ack",
    "decode_batch",
    "decode_frame",
    "decode_header",
    "decode_status",
    "encode_frame",
    "parse_topic",
    "subscription",
    "validate_prefix",
]
