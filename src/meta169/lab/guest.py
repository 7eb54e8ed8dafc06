"""Inside one VM of the lab: its routes to 169.254.169.254, and a GET of it as the guest.

The route changes are what the ``zeroconf`` and ``no-host-route`` faults do to a
guest and what healing them undoes; :func:`metadata` and :func:`await_metadata`
ask 169.254.169.254 from a socket opened inside the VM's namespace, so the request
takes the guest's own routes and neighbour table. Knows one VM's plan and nothing
of the lab's processes, registry or state file.
"""

from __future__ import annotations

import http.client
import time

from meta169.errors import LabError
from meta169.lab import plan as lp
from meta169.lab.network import expected_metadata_hop
from meta169.lab.plan import VMPlan
from meta169.plumbing import netns
from meta169.plumbing.command import Runner, run

# CentOS's /etc/sysconfig/network-scripts/ifup-eth adds this route ("Add Zeroconf
# route") unless NOZEROCONF=yes; the seed's guest had it and no /32 host route.
ZEROCONF_ROUTE = ("169.254.0.0/16",)
ZEROCONF_ATTRS = ("scope", "link", "metric", "1002")
SETTLE_TIMEOUT = 5.0  # seconds for a VM to see a break or heal (serve polls the registry every 0.5 s)


def _in_vm(vm: VMPlan, argv: list[str], *, check: bool, runner: Runner, inside: Runner | None) -> None:
    # ``inside`` already runs in the guest (a QEMU guest's agent); else enter the namespace.
    if inside is not None:
        inside(argv, check=check)
    else:
        netns.exec_in(vm.netns, argv, check=check, runner=runner)


def add_zeroconf_route(
    vm: VMPlan, *, drop_host_route: bool = True, runner: Runner = run, inside: Runner | None = None
) -> None:
    """The seed's guest: ``169.254.0.0/16 dev eth0 scope link metric 1002``, optionally
    without the DHCP /32 host route."""
    if drop_host_route:
        _in_vm(vm, ["ip", "-4", "route", "del", f"{lp.METADATA_V4}/32"], check=False, runner=runner, inside=inside)
    argv = ["ip", "-4", "route", "replace", *ZEROCONF_ROUTE, "dev", vm.iface, *ZEROCONF_ATTRS]
    _in_vm(vm, argv, check=True, runner=runner, inside=inside)


def remove_host_route(vm: VMPlan, *, runner: Runner = run, inside: Runner | None = None) -> None:
    """A guest whose DHCP client ignored option 121: its 169.254.169.254/32 is gone."""
    _in_vm(vm, ["ip", "-4", "route", "del", f"{lp.METADATA_V4}/32"], check=False, runner=runner, inside=inside)


def restore_routes(vm: VMPlan, *, runner: Runner = run, inside: Runner | None = None) -> None:
    """Undo both: the /32 via the DHCP next hop back, the /16 gone, the stale neighbour flushed."""
    host_route = [f"{lp.METADATA_V4}/32", "via", str(expected_metadata_hop(vm)), "dev", vm.iface]
    argvs = [
        (["ip", "-4", "route", "replace", *host_route], True),
        (["ip", "-4", "route", "del", *ZEROCONF_ROUTE, "dev", vm.iface, *ZEROCONF_ATTRS], False),
        (["ip", "-4", "neigh", "flush", "dev", vm.iface, "to", str(lp.METADATA_V4)], False),
    ]
    for argv, check in argvs:
        _in_vm(vm, argv, check=check, runner=runner, inside=inside)


def metadata(vm: VMPlan, path: str = "/latest/meta-data/instance-id", *, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET of http://169.254.169.254``path`` from inside ``vm``: (status, body).

    The socket is opened by a thread inside the VM's namespace, so the request
    takes the guest's routes; OSError (refused, timed out) propagates.
    """

    def get() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(str(lp.METADATA_V4), 80, timeout=timeout)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    return netns.call_in_netns(vm.netns, get)


def await_metadata(vm: VMPlan, *, status: int = 200, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until ``vm`` gets ``status`` for its instance-id (and, for 200, its own uuid)."""
    want = vm.uuid.encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, body = metadata(vm, timeout=min(2.0, timeout))
            seen = f"HTTP {got} {body[:80]!r}"
            if got == status and (status != 200 or body == want):
                return
        except OSError as exc:
            seen = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise LabError(f"{vm.name}: GET http://{lp.METADATA_V4}/latest/meta-data/instance-id gave {seen} "
                           f"after {timeout:g}s, not HTTP {status}")  # fmt: skip
        time.sleep(0.1)
