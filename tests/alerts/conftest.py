"""Fixtures of the alert tests: the collector tests' databases and fleet."""

from tests.collector.conftest import dbs

__all__ = ["dbs"]
