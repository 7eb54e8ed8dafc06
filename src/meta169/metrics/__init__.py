"""Operating a running server: its Prometheus metrics and its health endpoints.

Owns the instruments and their names (``core``, ``instruments``), adding up the
numbers of ``serve --workers N`` (``workers``) and the operations listener that
serves ``/metrics``, ``/healthz`` and ``/readyz`` on meta169's own HTTP layer in the
server's event loop (``endpoint``). The roles count into these instruments at their
own instrumentation points; the compiled fast path keeps its counters in C, read at
scrape time.

Stands on ``meta169.http`` for the listener and ``meta169.health`` for readiness;
knows the names of what the roles count, nothing of how they work: not metadata,
the proxy's namespaces, the registry or the command line.
"""
