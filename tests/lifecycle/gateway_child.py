"""A stand-in gateway process: registers its will, says online, then waits to be killed.

Run as ``python -m tests.lifecycle.gateway_child HOST PORT TOPIC GATEWAY_ID``; prints ``ready`` once
the online frame is acknowledged by the broker. Killing it with SIGKILL drops the TCP connection
without a DISCONNECT, so the broker publishes the will, as for a gateway that lost power.
"""

from __future__ import annotations

import sys
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol import GatewayStatus, encode_frame


def main() -> None:
    """Connect with a will, publish online, sleep."""
    host, port, topic, gateway = sys.argv[1], int(sys.argv[2]), sys.argv[3], uuid.UUID(sys.argv[4])
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"gwchild-{uuid.uuid4().hex[:10]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    now = time.time_ns() // 1000
    will = GatewayStatus(gateway_id=gateway, state="offline", time=now, version="test")
    client.will_set(topic, encode_frame(will), qos=1, retain=True)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    online = GatewayStatus(gateway_id=gateway, state="online", time=now + 1, version="test")
    client.publish(topic, encode_frame(online), qos=1, retain=True).wait_for_publish(10)
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
