"""Configuration of the ``mqtt`` input: devices publishing on a local broker."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.inputs.base import InputConfig
from agent.inputs.common import DeviceConfig, Duration, MetricName, TimeZoneName

# Dotted keys with optional list indexes, e.g. "AM2301.Temperature" or "sensors[0].value";
# a leading "$." is accepted for readers used to JSONPath.
JSON_PATH = re.compile(r"^(\$\.)?[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*$")
JsonPath = Annotated[str, Field(min_length=1, max_length=256, pattern=JSON_PATH.pattern)]


def _check_filter(topic: str) -> str:
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{topic!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{topic!r}: '+' must be a whole level")
    return topic


class MqttDevice(DeviceConfig):
    """A device on the local broker; ``key`` is how topics or payloads name it (default: name)."""

    key: str | None = Field(default=None, min_length=1, max_length=256)

    @property
    def match_key(self) -> str:
        """The text that identifies this device in a topic level or a payload field."""
        return self.key or self.name


class Subscription(BaseModel):
    """One topic filter and how its messages become readings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(min_length=1, max_length=1024)
    # 1: the site broker keeps what devices publish with QoS 1 until the agent has committed
    # it to its buffer (acknowledged then), across agent restarts. QoS 2 is not offered: paho
    # confirms a QoS 2 message before the agent could commit it, so it would promise more
    # than it keeps.
    qos: Literal[0, 1] = 1
    # Which device a message belongs to; exactly one of the three:
    device: str | None = Field(default=None, min_length=1, max_length=256)  # a fixed device key
    device_level: int | None = Field(default=None, ge=0, le=64)  # topic level holding the key
    device_path: JsonPath | None = None  # payload field holding the key
    # "json": the payload is a JSON object; "plain": the payload is one value ("21.5", "ON").
    payload: Literal["json", "plain"] = "json"
    # json: metric -> path of the value in the payload.
    fields: dict[MetricName, JsonPath] = Field(default_factory=dict, max_length=256)
    # json: every top-level number or boolean becomes a metric named by its key (Zigbee2MQTT).
    all_fields: bool = False
    # plain: the metric is fixed, or taken from a topic level (ESPHome ".../sensor/<name>/state").
    metric: MetricName | None = None
    metric_level: int | None = Field(default=None, ge=0, le=64)
    # json: path of the reading's time (epoch s/ms/µs or ISO 8601); absent means arrival time.
    time_path: JsonPath | None = None

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _check_filter(value)

    @model_validator(mode="after")
    def _check(self) -> Subscription:
        chosen = [
            self.device is not None,
            self.device_level is not None,
            self.device_path is not None,
        ]
        if sum(chosen) != 1:
            raise ValueError("device: give exactly one of device, device_level, device_path")
        levels = self.topic.split("/")
        for key, level in (
            ("device_level", self.device_level),
            ("metric_level", self.metric_level),
        ):
            if level is not None and (level >= len(levels) or levels[level] == "#"):
                raise ValueError(f"{key}: topic {self.topic!r} has no level {level}")
        if self.payload == "json":
            if not self.fields and not self.all_fields:
                raise ValueError("fields: a json subscription needs fields or all_fields = true")
            if self.metric is not None or self.metric_level is not None:
                raise ValueError("metric: only plain payloads take metric/metric_level")
        else:
            if (self.metric is None) == (self.metric_level is None):
                raise ValueError("metric: a plain subscription needs metric or metric_level")
            if self.fields or self.all_fields or self.device_path or self.time_path:
                raise ValueError("fields: a plain payload has no fields, device_path or time_path")
        return self


class MqttInputConfig(InputConfig):
    """Devices publishing on a local MQTT broker (Tasmota, ESPHome, Shelly, Zigbee2MQTT)."""

    type: Literal["mqtt"]
    host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    # "5" (MQTT 5: session expiry, receive maximum) or "3.1.1" for brokers without MQTT 5.
    mqtt_version: Literal["5", "3.1.1"] = "5"
    # How long the site broker keeps the agent's session (its subscriptions and the QoS 1
    # messages published meanwhile) while the agent is away; 0 = a clean session every start.
    # With "3.1.1" any value above 0 asks for a persistent session and the broker's own
    # expiry (mosquitto: persistent_client_expiration) applies.
    session_expiry: Duration = Field(default=86400.0, ge=0.0, le=30 * 86400.0)
    # QoS 1 messages the broker may send before the agent has acknowledged them (MQTT 5
    # Receive Maximum); acknowledgements wait for the buffer commit, so this bounds throughput
    # at about max_in_flight per commit interval.
    max_in_flight: int = Field(default=10000, ge=1, le=65535)
    # How often the socket is read (on the buffer commit's beat, so rounded up to a multiple of
    # buffer.commit_interval; 0 = every commit). A reading without a time of its own is stamped
    # when read, so at most this late; reading less often saves the CPU of a commit per read.
    read_interval: Duration = Field(default=0.5, ge=0.0, le=10.0)
    # Messages received but not yet turned into readings. Beyond it, QoS 0 messages are
    # dropped and counted (overload); QoS 1 messages are bounded by max_in_flight instead.
    max_pending: int = Field(default=40000, ge=100, le=1_000_000)
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password: str | None = Field(default=None, max_length=256)
    keepalive: Duration = Field(default=30.0, ge=5.0, le=3600.0)
    reconnect_min: Duration = Field(default=1.0, ge=0.1, le=300.0)
    reconnect_max: Duration = Field(default=30.0, ge=1.0, le=3600.0)
    # A device with no message for this long goes to `error` (0 = never).
    stale_after: Duration = Field(default=0.0, ge=0.0, le=86400.0)
    # How long `inputs test` listens for each device to publish.
    probe_wait: Duration = Field(default=10.0, ge=0.1, le=600.0)
    max_payload_bytes: int = Field(default=65536, ge=16, le=16 * 1024 * 1024)
    # The zone of ISO times without an offset in time_path fields (Tasmota's "Time"); without
    # it such a time is refused rather than guessed.
    timezone: TimeZoneName | None = None
    subscriptions: list[Subscription] = Field(min_length=1, max_length=256)
    devices: list[MqttDevice] = Field(min_length=1, max_length=10000)

    @model_validator(mode="after")
    def _check(self) -> MqttInputConfig:
        keys = [device.match_key for device in self.devices]
        if len(keys) != len(set(keys)):
            raise ValueError("devices: two devices have the same key")
        ids = [device.id for device in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError("devices: two devices have the same id")
        for i, sub in enumerate(self.subscriptions):
            if sub.device is not None and sub.device not in keys:
                raise ValueError(f"subscriptions[{i}].device: no device has key {sub.device!r}")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max: must not be below reconnect_min")
        if self.max_pending < self.max_in_flight:
            raise ValueError("max_pending: must not be below max_in_flight")
        return self
