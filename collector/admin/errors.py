"""The administration's refusals.

``AdminError`` (a :class:`~collector.errors.CollectorError`) is the root: its message says what
was refused and why. ``NotFound``: a reference names nothing. ``ChangeRefused``: a change that would
break the registry's rules (not to be confused with a batch the collector refuses, which is an
ack result, :mod:`collector.pipeline`).
"""

from __future__ import annotations

from collector.errors import CollectorError


class AdminError(CollectorError):
    """An administration request that was refused; the message says why."""


class NotFound(AdminError):
    """A reference names nothing (``<kind> <ref> not found``)."""


class ChangeRefused(AdminError):
    """A change that would break the registry's rules; the message says which and what to do."""
