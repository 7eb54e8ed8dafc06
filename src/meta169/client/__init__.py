"""A small metadata client for guests, tests and the doctor's probes.

Standard library only (``socket`` and ``http.client``), so it runs in any guest
that has Python. Modules, pure first:

- ``url``        base URLs, IPv6 link-local zones (``http://[fe80::a9fe:a9fe%eth0]/``)
- ``tree``       which listing entries are directories; crawling; JSON conversion
- ``transport``  one HTTP exchange over a socket we connect ourselves, so failures
                 are classified (refused, timeout, unreachable) as ``ClientError``
- ``client``     :class:`MetadataClient`: IMDSv2 tokens with botocore's fallback,
                 explicit timeouts and retries
- ``cli``        ``meta169 query``

Knows nothing of the server's internals, the registry or the doctor.
"""

from meta169.client.client import ClientConfig, IMDSv2Mode, MetadataClient
from meta169.client.transport import HTTPTransport, Reply, Transport, open_connection
from meta169.client.tree import Crawl, Tree, crawl
from meta169.client.url import DEFAULT_URL, Endpoint, parse_url

__all__ = [
    "DEFAULT_URL",
    "ClientConfig",
    "Crawl",
    "Endpoint",
    "HTTPTransport",
    "IMDSv2Mode",
    "MetadataClient",
    "Reply",
    "Transport",
    "Tree",
    "crawl",
    "open_connection",
    "parse_url",
]
