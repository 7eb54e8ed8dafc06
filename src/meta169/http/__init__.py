"""The wire layer every meta169 server stands on: serve, the proxy and the admin API.

Owns HTTP/1.1 framing (``protocol``: parsing with httptools within ``limits``,
keep-alive, pipelining order, timeouts), requests and replies (``message``), the
accept loop (``acceptor``), where and how to listen (``listen``), the event loop
(``loop``), the grammar checked by hand (``grammar``), the identity stamp the proxy
writes and serve reads (``stamp``), and the compiled layer (``wire``, ``_wire.c``).

Knows nothing of metadata, proxying decisions, the registry or administration: it
imports only ``meta169.errors`` and ``meta169.model``, never ``api``, ``proxy`` or
``admin``.
"""
