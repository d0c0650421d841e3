"""The Sensormine Edge collector: MQTT consumer, pipeline, TimescaleDB writer, lifecycle and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sensormine")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
