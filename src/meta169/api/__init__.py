"""The metadata application: what ``serve`` answers and to whom.

Owns identifying the caller on a listener (``identity``), the cached rendered site
per caller and its invalidation (``cache``), the request handler with its OpenStack
and EC2 trees, IMDSv2 sessions and password POSTs (``metadata``), IMDSv2 tokens
(``tokens``), per-instance rate limits (``ratelimit``), dynamic vendor data
(``vendordata``), serve's configuration (``config``) and running it (``server``).

Stands on ``meta169.http`` for the wire, ``meta169.render`` for the documents and
``meta169.registry`` for the data; knows nothing of the proxy's namespaces, the
admin API or the command line.
"""
