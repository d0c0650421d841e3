"""MQTT topic names of wire protocol v1: ``{prefix}/v1/{tenant}/{gateway}/{kind}``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import ProtocolError, Reason

PROTOCOL_LEVEL = "v1"
DEFAULT_PREFIX = "sensormine"
_FORBIDDEN = frozenset("+#\x00")


class TopicKind(StrEnum):
    """The last level of a topic: what the payload is."""

    TELEMETRY = "telemetry"
    STATUS = "status"
    ACK = "ack"


@dataclass(frozen=True, slots=True)
class TopicAddress:
    """A parsed topic: who sent it and what it carries."""

    prefix: str
    tenant_id: uuid.UUID
    gateway_id: uuid.UUID
    kind: TopicKind


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is usable as topic prefix, else raise ``ProtocolError``."""
    if not prefix:
        raise ProtocolError(Reason.BAD_TOPIC, "topic prefix must not be empty")
    if len(prefix.encode()) > 512:
        raise ProtocolError(Reason.BAD_TOPIC, "topic prefix is longer than 512 bytes")
    if prefix.startswith("$"):
        raise ProtocolError(Reason.BAD_TOPIC, f"topic prefix {prefix!r} must not start with '$'")
    for level in prefix.split("/"):
        if not level:
            raise ProtocolError(Reason.BAD_TOPIC, f"topic prefix {prefix!r} has an empty level")
        if _FORBIDDEN & set(level):
            raise ProtocolError(
                Reason.BAD_TOPIC, f"topic prefix {prefix!r} contains a wildcard or NUL"
            )
    return prefix


def build_topic(prefix: str, tenant_id: uuid.UUID, gateway_id: uuid.UUID, kind: TopicKind) -> str:
    """Build the topic on which ``gateway_id`` of ``tenant_id`` sends or receives ``kind``."""
    validate_prefix(prefix)
    return f"{prefix}/{PROTOCOL_LEVEL}/{tenant_id}/{gateway_id}/{TopicKind(kind).value}"


def subscription(prefix: str, kind: TopicKind, group: str | None = None) -> str:
    """The filter matching ``kind`` of every gateway, shared by ``group`` when given."""
    validate_prefix(prefix)
    topic = f"{prefix}/{PROTOCOL_LEVEL}/+/+/{TopicKind(kind).value}"
    if group is None:
        return topic
    if not group or _FORBIDDEN & set(group) or "/" in group:
        raise ProtocolError(Reason.BAD_TOPIC, f"shared subscription group {group!r} is invalid")
    return f"$share/{group}/{topic}"


def _parse_uuid(text: str, what: str, topic: str) -> uuid.UUID:
    # uuid.UUID accepts braces, urn: prefixes and missing hyphens; the wire form is canonical only.
    try:
        value = uuid.UUID(text)
    except ValueError:
        raise ProtocolError(
            Reason.BAD_TOPIC, f"{what} {text!r} in topic {topic!r} is not a UUID"
        ) from None
    if str(value) != text:
        raise ProtocolError(
            Reason.BAD_TOPIC,
            f"{what} {text!r} in topic {topic!r} is not a lower-case canonical UUID",
        )
    return value


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicAddress:
    """Parse a concrete topic; raise ``ProtocolError`` (reason ``bad_topic``) naming the bad level."""
    validate_prefix(prefix)
    head = prefix + "/"
    if not topic.startswith(head):
        raise ProtocolError(Reason.BAD_TOPIC, f"topic {topic!r} does not start with {head!r}")
    levels = topic[len(head) :].split("/")
    if len(levels) != 4:
        raise ProtocolError(
            Reason.BAD_TOPIC,
            f"topic {topic!r} must be {prefix}/v1/<tenant>/<gateway>/<kind> ({len(levels)} levels after the prefix)",
        )
    level, tenant, gateway, kind = levels
    if level != PROTOCOL_LEVEL:
        raise ProtocolError(
            Reason.BAD_TOPIC, f"topic {topic!r} is protocol {level!r}, expected 'v1'"
        )
    try:
        topic_kind = TopicKind(kind)
    except ValueError:
        raise ProtocolError(
            Reason.BAD_TOPIC, f"topic {topic!r} ends in unknown kind {kind!r}"
        ) from None
    return TopicAddress(
        prefix=prefix,
        tenant_id=_parse_uuid(tenant, "tenant", topic),
        gateway_id=_parse_uuid(gateway, "gateway", topic),
        kind=topic_kind,
    )
