"""meta169: a cloud instance metadata service and the network path behind it.

Package layout (each sub-package's docstring says what it owns):

- ``model``      domain objects (networks, routers, ports, instances), pure
- ``errors``     the one exception tree
- ``config``     the process configuration, built once at the edge
- ``registry``   where instances live (in-memory, SQLite, PostgreSQL)
- ``render``     OpenStack and EC2 documents and trees, pure
- ``api``        the metadata HTTP plane (asyncio, httptools)
- ``proxy``      the per-namespace hop that stamps caller identity
- ``plumbing``   iptables rules, DHCP options, dnsmasq, namespaces
- ``doctor``     finds why a guest cannot reach its metadata
- ``lab``        a real topology of network namespaces for tests and demos
- ``client``     a small metadata client for guests and tests
- ``inventory``  the YAML/JSON inventory: parse, export, import into a registry
- ``admin``      the authenticated admin HTTP API
- ``cli``        the thin command line over all of the above
"""

__version__ = "0.1.0"
