"""The per-namespace hop between guests and ``serve``.

Owns: listeners inside router/DHCP namespaces, removing guest identity headers,
stamping the caller (and its HMAC over TCP), relaying replies, upstream failures as
502/503/504. Knows nothing of rendering or the registry's storage.
"""
