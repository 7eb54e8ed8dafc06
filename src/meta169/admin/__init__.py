"""Administration: the authenticated admin HTTP API over the registry (:mod:`.api`).

Owns the routes, the bearer-token check and the mapping of errors to statuses. The
bodies are inventory documents: parsing and dumping them belong to
:mod:`meta169.inventory`. Knows the Registry protocol, never a backend.
"""
