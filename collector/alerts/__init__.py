"""Alert rules evaluated on ingest, on event time, exactly once.

- :mod:`collector.alerts.rules`: a rule as the collector evaluates it, and the index of rules
  by (tenant, metric) that keeps the writer's hot path free of work when no rule matches;
- :mod:`collector.alerts.evaluator`: the pure state machine per (rule, series);
- :mod:`collector.alerts.store`: state, alerts, events and the outbox in the time-series
  database, written in the writer's own transaction;
- :mod:`collector.alerts.engine`: rules loaded from the registry and kept current by its
  NOTIFY, no-data checks, closing the alerts of disabled rules, publishing transitions.
"""
