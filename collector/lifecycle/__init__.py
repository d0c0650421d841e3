"""Data lifecycle in TimescaleDB: rollups, retention, compression, ledger housekeeping, status history.

``run_lifecycle`` (in ``collector.lifecycle.runner``) is the collector's task that runs the jobs;
``doctor`` (the ``collector.doctor`` package) reports on them. This package's ``__init__`` imports
nothing, so that ``collector.settings`` can import ``collector.lifecycle.settings`` cheaply.
"""
