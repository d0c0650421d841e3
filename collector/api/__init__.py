"""The query API and status page: ``sensormine-collector api``.

An HTTP JSON API (FastAPI on uvicorn) over both databases, never joined: names come from the
metadata database, series and states from the time-series database. Every request carries a
per-tenant token (``sensormine-collector tokens``) and sees that tenant only. Errors are RFC 9457
problem details with a stable ``code``. The status page (``/``) is static HTML and JavaScript
served by the same process, with the chart library (plotly.js, shipped inside the ``plotly``
distribution from PyPI) served from the installed package: no network at run time.
"""
