"""How a Sensormine program behaves as a service: what the agent and the collector share.

- :mod:`service.config`: the building blocks of both configuration files: durations
  (``"500ms"``, ``"90d"``) and sizes (``"512MiB"``), the MQTT topic prefix, a ``host:port`` to
  listen on, the ``[log]`` section, and the wording of a configuration error (an unknown key
  with the closest allowed one).
- :mod:`service.systemd`: the ``sd_notify`` protocol (``READY``, ``STATUS``, ``WATCHDOG``,
  ``STOPPING``), never blocking.
- :mod:`service.logs`: structlog set-up, JSON lines under systemd, readable on a terminal.
- :mod:`service.files`: the files a configuration names, checked as the service's account and
  sandbox will meet them (``check-config``).
- :mod:`service.cli`: the ``--config`` option of both command lines.

Nothing here knows about the agent or the collector; :mod:`protocol` stays the wire contract
only.
"""
