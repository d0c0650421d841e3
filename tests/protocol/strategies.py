"""Hypothesis strategies for valid protocol v1 frames."""

from __future__ import annotations

import uuid

from hypothesis import strategies as st

from protocol import Ack, AckResult, Batch, DeviceStatus, Event, GatewayStatus, Series
from protocol.models import MAX_SEQ, MAX_TIME_US

uuids = st.builds(uuid.UUID, bytes=st.binary(min_size=16, max_size=16))
times = st.integers(min_value=0, max_value=MAX_TIME_US)
finite_floats = st.floats(allow_nan=False) | st.sampled_from(
    [0.0, -0.0, 5e-324, -5e-324, 1.7976931348623157e308, float("inf"), float("-inf"), 21.37, 0.1]
)
values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    finite_floats,
    st.text(max_size=40),
)


@st.composite
def series(draw: st.DrawFn) -> Series:
    """A series of 1 to 30 readings; values of one type, or mixed."""
    n = draw(st.integers(min_value=1, max_value=30))
    ts = draw(st.lists(times, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["mixed", "int", "float", "decimal", "bool", "str"]))
    element = {
        "mixed": values,
        "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "float": finite_floats,
        "decimal": st.integers(min_value=-(10**9), max_value=10**9).map(lambda i: i / 100),
        "bool": st.booleans(),
        "str": st.text(max_size=40),
    }[kind]
    vals = draw(st.lists(element, min_size=n, max_size=n))
    metric = draw(st.text(min_size=1, max_size=128))
    return Series(device_id=draw(uuids), metric=metric, timestamps=ts, values=vals)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)

events = st.builds(
    Event,
    time=times,
    device_id=st.none() | uuids,
    severity=st.sampled_from(["debug", "info", "warning", "error", "critical"]),
    kind=st.text(min_size=1, max_size=64),
    message=st.text(max_size=200),
    attributes=st.dictionaries(st.text(max_size=10), json_values, max_size=4),
)
statuses = st.builds(
    DeviceStatus,
    time=times,
    device_id=uuids,
    status=st.sampled_from(["online", "error", "offline"]),
    reason=st.text(max_size=256),
)
batches = st.builds(
    Batch,
    gateway_id=uuids,
    stream=uuids,
    seq=st.integers(min_value=0, max_value=MAX_SEQ),
    created=times,
    series=st.lists(series(), max_size=6),
    events=st.lists(events, max_size=3),
    status=st.lists(statuses, max_size=3),
)
gateway_statuses = st.builds(
    GatewayStatus,
    gateway_id=uuids,
    state=st.sampled_from(["online", "offline"]),
    time=times,
    version=st.text(max_size=64),
)
acks = st.builds(
    Ack,
    stream=uuids,
    seq=st.integers(min_value=0, max_value=MAX_SEQ),
    result=st.sampled_from(list(AckResult)),
    accepted=st.integers(min_value=0, max_value=2**40),
    rejected=st.integers(min_value=0, max_value=2**40),
    reason=st.text(max_size=64),
)
frames = batches | gateway_statuses | acks
