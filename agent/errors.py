"""Exceptions of the agent.

``AgentError`` is the root. Below it:

- ``ConfigError``: the configuration file is missing, unreadable or invalid; its message names
  the file, the key and the problem. The CLI turns it into exit status 1.
- ``BufferFileError``: the buffer file cannot be used (not a configuration problem, not a full disk:
  a full disk is survived and counted, never raised to the caller).
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the agent's exceptions."""


class ConfigError(AgentError):
    """An invalid configuration; the message names the file, the key and the problem."""


class BufferFileError(AgentError):
    """The buffer file cannot be opened or used."""
