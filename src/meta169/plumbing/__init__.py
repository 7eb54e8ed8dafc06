"""The network path to 169.254.169.254: namespaces, iptables rules, DHCP options, dnsmasq.

Modules, pure core first:

- ``dhcp_options``  option 121/249 routes: which, in what order, and their encodings
- ``iptables``      router-mode REDIRECT/MARK/ACCEPT/DROP rule sets in chains of
                    our own; render, apply, remove inside a namespace
- ``dnsmasq``       a network's dnsmasq config (pure), start/reload/stop by our PID
- ``dhclient``      our dhclient config, script (``dhclient-script``) and lease parser
- ``netns``         namespace, veth, address and route commands; sockets opened
                    inside a namespace from a short-lived helper thread
- ``command``       the argv runner; failures become ``CommandFailed``

Knows nothing of the registry, of HTTP or of how documents are rendered. Never
touches the host namespace's interfaces or the host's /etc.
"""
