"""Exceptions of the collector.

``CollectorError`` is the root. Below it:

- ``ConfigError``: the configuration file or an override is missing or invalid; its message names
  the file (or variable), the key and the problem. The CLI turns it into exit status 1.
- ``MigrationError``: a migration file is malformed, or an applied migration changed on disk.
- ``DatabaseUnavailable``: a database could not be reached or failed mid-flush; the writer keeps
  its staged rows and retries, nothing is acknowledged meanwhile.
"""

from __future__ import annotations


class CollectorError(Exception):
    """Root of the collector's exceptions."""


class ConfigError(CollectorError):
    """An invalid configuration; the message names the file, the key and the problem."""


class MigrationError(CollectorError):
    """A migration cannot be applied, or the applied history disagrees with the files."""


class DatabaseUnavailable(CollectorError):
    """A database could not be reached or broke off an operation; the operation may be retried."""
