"""The protocol's one exception and its reason codes.

``ProtocolError`` is the only exception that decoding raises. Its ``reason`` is a stable code
from :class:`Reason` that travels back to the agent in ack frames; its message says, for a
person, what exactly was wrong.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable reason codes, shared by frame decoding, collector validation and ack frames."""

    # Frame decoding (protocol)
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_FLAGS = "unknown_flags"
    TOO_LARGE = "too_large"
    DECOMPRESSION_LIMIT = "decompression_limit"
    MALFORMED = "malformed"
    INVALID_FIELD = "invalid_field"
    TOO_MANY_POINTS = "too_many_points"
    UNEXPECTED_KIND = "unexpected_kind"
    BAD_TOPIC = "bad_topic"
    # Authorization (collector)
    UNKNOWN_GATEWAY = "unknown_gateway"
    GATEWAY_DISABLED = "gateway_disabled"
    TENANT_MISMATCH = "tenant_mismatch"
    GATEWAY_MISMATCH = "gateway_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    DEVICE_TENANT_MISMATCH = "device_tenant_mismatch"
    DEVICE_GATEWAY_MISMATCH = "device_gateway_mismatch"
    EMPTY_BATCH = "empty_batch"
    # Validation of points (collector)
    NO_SCHEMA = "no_schema"
    UNKNOWN_METRIC = "unknown_metric"
    TYPE_MISMATCH = "type_mismatch"
    OUT_OF_RANGE = "out_of_range"
    NOT_IN_ENUM = "not_in_enum"
    NON_FINITE = "non_finite"
    TIMESTAMP_OUT_OF_WINDOW = "timestamp_out_of_window"
    # Delivery (collector)
    CONFLICT = "conflict"
    INTERNAL_ERROR = "internal_error"
    QUOTA_EXCEEDED = "quota_exceeded"


class ProtocolError(Exception):
    """A frame or topic that does not follow wire protocol v1.

    ``reason`` is a :class:`Reason` code; ``str(error)`` says what was wrong.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __repr__(self) -> str:
        return f"ProtocolError({self.reason.value!r}, {str(self)!r})"
