"""Sources: where instances live, and making the registry match one of them.

A source describes what it holds as an :class:`~meta169.inventory.Inventory` whose
every entry carries the source's name (``libvirt:<uri>``, ``openstack:<cloud>``,
``file:<path>``); :mod:`.reconcile` plans and applies the writes that make the
registry match it for that source alone, never touching what another source owns.
:mod:`.libvirt` reads a libvirt connection (domains, their ``<metadata>`` element in
meta169's XML namespace, network DHCP leases) and follows its events;
:mod:`.openstack` reads Nova and Neutron through openstacksdk, and again on a timer;
:mod:`.run` runs either watch as a service (sd_notify, watchdog, signals, metrics).

Knows the model, the inventory schema (its codecs validate what a source says) and
the Registry protocol. Knows nothing of HTTP (beyond the metrics listener
:mod:`.run` starts), the metadata API or the command line (``sources/cli.py`` is
the thin click layer). The libvirt binding and openstacksdk are imported only by
the module that needs them.
"""

from meta169.sources.reconcile import RegistryState, SyncResult, plan_sync, stamp, sync_registry

__all__ = ["RegistryState", "SyncResult", "plan_sync", "stamp", "sync_registry"]
