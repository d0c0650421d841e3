"""``sensormine-collector doctor``: what the collector's databases, jobs and broker are doing.

- :mod:`collector.doctor.report`: the findings of one examination (data, problems, notes).
- :mod:`collector.doctor.probes`: the checks, each a small function registered with
  :func:`~collector.doctor.probes.probe`, run in registration order by
  :func:`~collector.doctor.probes.examine`.
- :mod:`collector.doctor.render`: the report as lines for a terminal.
- :mod:`collector.doctor.command`: the click command.

Every finding that needs an operator is a *problem*; the command exits 1 when there is any,
naming each. Facts that are fine but worth knowing are *notes* and do not change the exit status.
"""
