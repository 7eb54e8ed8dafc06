"""The ``meta169`` command line: a thin layer of click over programmatic functions.

Exit codes and the mapping of the error tree onto them live in :mod:`meta169.exits`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click

from meta169.errors import ConfigError
from meta169.exits import cli_errors


class Ctx:
    def __init__(self, registry_url: str | None) -> None:
        self._registry_url = registry_url

    @property
    def registry_url(self) -> str:
        from meta169.registry import default_registry_url

        if self._registry_url:
            return self._registry_url
        return default_registry_url(euid=os.geteuid(), home=Path.home(), xdg_data_home=os.environ.get("XDG_DATA_HOME"))

    def open_registry(self) -> Any:
        from meta169.registry import open_registry

        return open_registry(self.registry_url)


pass_ctx = click.make_pass_decorator(Ctx)


class LazyGroup(click.Group):
    """Subcommands named here are imported only when used: ``meta169 proxy`` in 1000
    namespaces should not carry the doctor's, the lab's or cryptography's modules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib

        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--registry",
    "registry_url",
    envvar="META169_REGISTRY",
    metavar="URL",
    help="Registry URL: sqlite:///path.db, postgresql://..., memory:// "
    "[env META169_REGISTRY; default: a SQLite file in the data directory].",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="meta169")
@click.pass_context
def main(ctx: click.Context, registry_url: str | None, verbose: int) -> None:
    """meta169: the instance metadata service at 169.254.169.254, and its network path."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Ctx(registry_url)


# -- serve -----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--listen",
    "listens",
    multiple=True,
    metavar="ADDR[=BINDING]",
    help="HOST:PORT or unix:PATH, optionally =network:ID, =router:ID or =proxy. "
    "Repeatable. Without =BINDING the --network/--router/--proxy flag applies.",
)
@click.option("--network", "network_id", metavar="ID", help="Identify callers by source IP on this network.")
@click.option("--router", "router_id", metavar="ID", help="Identify callers by source IP on this router's networks.")
@click.option("--proxy", "proxy_mode", is_flag=True, help="Trust identity stamped by meta169 proxy (Unix socket).")
@click.option("--workers", default=1, show_default=True, help="Processes sharing the listeners.")
@click.option(
    "--vendor-data",
    "vendor_data_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file of deployment-wide static vendor data.",
)
@click.option("--poll-interval", default=0.5, show_default=True, help="Seconds between registry change checks.")
@click.option(
    "--proxy-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Shared secret (file, mode 0600) for proxy listeners on TCP.",
)
@click.option(
    "--neutron-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Neutron's metadata_proxy_shared_secret (file, mode 0600), for =neutron listeners.",
)
@click.option(
    "--token-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="IMDSv2 token keys, ID:HEX per line, sealing key first (mode 0600). "
    "Share it between nodes; default: a random key per start.",
)
@click.option(
    "--http-tokens",
    type=click.Choice(["optional", "required"]),
    default="optional",
    show_default=True,
    help="Default IMDSv2 policy for instances that set none.",
)
@click.option(
    "--hop-limit",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Default IP TTL / hop limit of token replies.",
)
@click.option(
    "--rate-limit",
    default="50/300",
    show_default=True,
    metavar="RATE/BURST",
    help="Per-instance requests per second and burst; 0 disables.",
)
@click.option(
    "--vendordata-dynamic",
    "vendordata_dynamic",
    multiple=True,
    metavar="NAME=URL",
    help="POST each instance's facts to URL and serve the JSON reply as vendor_data2.json[NAME]. Repeatable.",
)
@click.option(
    "--vendordata-timeout", default=2.0, show_default=True, help="Seconds to wait for each --vendordata-dynamic target."
)
@click.option(
    "--identity-key-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Sign EC2 identity documents with this directory's key (meta169 identity init).",
)
@pass_ctx
def serve(
    obj: Ctx,
    listens: tuple[str, ...],
    network_id: str | None,
    router_id: str | None,
    proxy_mode: bool,
    workers: int,
    vendor_data_file: Path | None,
    poll_interval: float,
    proxy_secret_file: Path | None,
    neutron_secret_file: Path | None,
    token_key_file: Path | None,
    http_tokens: str,
    hop_limit: int,
    rate_limit: str,
    vendordata_dynamic: tuple[str, ...],
    vendordata_timeout: float,
    identity_key_dir: Path | None,
) -> None:
    """Serve the OpenStack and EC2 metadata trees."""
    from meta169.api.config import ServeConfig
    from meta169.api.server import run
    from meta169.api.tokens import load_key_ring
    from meta169.api.vendordata import DynamicTarget
    from meta169.http.listen import Binding, ListenerSpec, parse_listen
    from meta169.model import MetadataOptions
    from meta169.secretfile import read_secret_file

    with cli_errors():
        default: Binding | None = None
        chosen = [b for b in (network_id, router_id, proxy_mode or None) if b]
        if len(chosen) > 1:
            raise ConfigError("give at most one of --network, --router, --proxy (or per-listener =BINDING)")
        if network_id:
            default = Binding("network", network_id)
        elif router_id:
            default = Binding("router", router_id)
        elif proxy_mode:
            default = Binding("proxy")
        if not listens:
            raise ConfigError("give at least one --listen ADDR (for example --listen 127.0.0.1:8775 --network NET)")
        specs = []
        for item in listens:
            addr_text, _, bind_text = item.partition("=")
            binding = _parse_binding(bind_text) if bind_text else default
            if binding is None:
                raise ConfigError(f"--listen {item}: no binding; add =network:ID or pass --network ID")
            specs.append(ListenerSpec(parse_listen(addr_text), binding))
        vendor: dict[str, Any] = {}
        if vendor_data_file is not None:
            try:
                loaded = json.loads(vendor_data_file.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--vendor-data {vendor_data_file}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"--vendor-data {vendor_data_file}: must hold a JSON object")
            vendor = loaded
        if workers < 1:
            raise ConfigError("--workers must be >= 1")
        config = ServeConfig(
            registry_url=obj.registry_url,
            listeners=tuple(specs),
            static_vendor_data=vendor,
            poll_interval=poll_interval,
            proxy_secret=read_secret_file(proxy_secret_file, what="--proxy-secret-file") if proxy_secret_file else None,
            neutron_secret=(
                read_secret_file(neutron_secret_file, what="--neutron-secret-file") if neutron_secret_file else None
            ),
            token_keys=load_key_ring(token_key_file) if token_key_file else None,
            default_metadata_options=MetadataOptions(
                http_tokens="required" if http_tokens == "required" else "optional",
                http_put_response_hop_limit=hop_limit,
            ),
            rate_limit=_parse_rate(rate_limit),
            identity_key_dir=identity_key_dir,
            vendordata_targets=tuple(DynamicTarget.parse(t) for t in vendordata_dynamic),
            vendordata_timeout=vendordata_timeout,
        )
        if identity_key_dir is not None:  # fail before binding and forking, not in every worker
            from meta169.identity import load_identity_key

            load_identity_key(identity_key_dir)
        if any(s.binding.kind == "neutron" for s in specs) and config.neutron_secret is None:
            raise ConfigError("a =neutron listener needs --neutron-secret-file (Nova refuses an empty secret too)")

        def ready(addresses: list[Any]) -> None:
            for spec, address in zip(specs, addresses, strict=True):
                click.echo(f"meta169 serve: listening on {address} ({spec.binding.scope})", err=True)

        run(config, workers=workers, on_ready=ready)


def _parse_rate(text: str) -> Any:
    from meta169.api.ratelimit import RateLimit

    if text.strip() in ("0", "off", "none"):
        return None
    rate, _, burst = text.partition("/")
    try:
        return RateLimit(rate=float(rate), burst=int(burst) if burst else max(1, int(float(rate) * 6)))
    except ValueError:
        raise ConfigError(f"--rate-limit {text!r}: expected RATE/BURST, e.g. 50/300, or 0") from None


def _parse_binding(text: str) -> Any:
    from meta169.http.listen import Binding

    kind, _, ident = text.partition(":")
    if kind == "proxy" and not ident:
        return Binding("proxy")
    if kind == "neutron" and not ident:
        return Binding("neutron")
    if kind == "network" and ident:
        return Binding("network", ident)
    if kind == "router" and ident:
        return Binding("router", ident)
    raise ConfigError(f"binding {text!r}: expected network:ID, router:ID, proxy or neutron")


# -- proxy -------------------------------------------------------------------------------------


@main.command()
@click.option("--upstream", required=True, metavar="unix:PATH|HOST:PORT", help="Where meta169 serve listens.")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Shared secret for a TCP upstream (file, mode 0600); required for TCP.",
)
@click.option(
    "--listeners",
    "listener_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML/JSON file of listeners, re-read every second.",
)
@click.option(
    "--from-registry",
    is_flag=True,
    help="Derive listeners from the registry: qrouter-ID:9697 per router, "
    "qdhcp-ID 169.254.169.254:80 per network without a router (namespaces that exist).",
)
@click.option(
    "--listen",
    "listens",
    multiple=True,
    metavar="[NETNS/]ADDR:PORT=network:ID|router:ID",
    help="A static listener. Repeatable.",
)
@click.option(
    "--upstream-timeout",
    default=10.0,
    show_default=True,
    help="Seconds to wait for serve's reply before answering the guest 504.",
)
@pass_ctx
def proxy(
    obj: Ctx,
    upstream: str,
    secret_file: Path | None,
    listener_file: Path | None,
    from_registry: bool,
    listens: tuple[str, ...],
    upstream_timeout: float,
) -> None:
    """Per-namespace metadata proxy: stamp caller identity, forward to serve."""
    from meta169.proxy.run import ProxyConfig, parse_static_listener, parse_upstream, run_proxy

    with cli_errors():
        if not (listener_file or from_registry or listens):
            raise ConfigError("give --listeners FILE, --from-registry or at least one --listen")
        spec = dataclasses.replace(parse_upstream(upstream), reply_timeout=upstream_timeout)
        secret = None
        if secret_file is not None:
            from meta169.secretfile import read_secret_file

            secret = read_secret_file(secret_file, what="--secret-file")
        elif spec.is_tcp:
            raise ConfigError("a TCP --upstream needs --secret-file (per-request HMAC); use unix:PATH otherwise")
        config = ProxyConfig(
            upstream=spec,
            secret=secret,
            static=tuple(parse_static_listener(x) for x in listens),
            listener_file=listener_file,
            registry_url=obj.registry_url if from_registry else None,
        )
        run_proxy(config, on_ready=lambda n: click.echo(f"meta169 proxy: {n} listeners up", err=True))


# -- admin API ------------------------------------------------------------------------------


@main.command("admin")
@click.option(
    "--listen",
    "listen",
    default="127.0.0.1:8776",
    show_default=True,
    metavar="HOST:PORT",
    help="Where the admin API listens: loopback or a management network, never a tenant network.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Bearer token (file, mode 0600, at least 16 bytes).",
)
@pass_ctx
def admin(obj: Ctx, listen: str, token_file: Path) -> None:
    """Serve the authenticated admin API (list, show, create, update, delete, import)."""
    import asyncio
    import signal

    from meta169.admin.api import start_admin
    from meta169.http.listen import parse_listen
    from meta169.http.loop import loop_factory
    from meta169.secretfile import read_secret_file

    with cli_errors():
        token = read_secret_file(token_file, what="--token-file")
        address = parse_listen(listen)
        if address.unix_path is not None:
            raise ConfigError("--listen: the admin API listens on TCP HOST:PORT")
        registry = obj.open_registry()

        async def serve_admin() -> None:
            try:
                server, app = await start_admin(registry, token, (address.host, address.port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
            host, port = server.sockets[0].getsockname()[:2]
            click.echo(f"meta169 admin: listening on {host}:{port}", err=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            server.close()
            app.close()

        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(serve_admin())
        finally:
            registry.close()


# -- registry administration --------------------------------------------------------------------


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def import_(obj: Ctx, files: tuple[Path, ...]) -> None:
    """Load YAML or JSON inventory files (idempotent: re-import updates)."""
    from meta169.inventory import apply_inventory, format_import_report, load_inventory

    with cli_errors():
        inventories = [load_inventory(f) for f in files]  # validate all before writing any
        registry = obj.open_registry()
        try:
            for path, inventory in zip(files, inventories, strict=True):
                report = apply_inventory(registry, inventory)
                click.echo(f"{path}: {format_import_report(report)}")
        finally:
            registry.close()


@main.group()
def instance() -> None:
    """List, show and remove instances."""


def _with_registry(obj: Ctx, fn: Callable[[Any], None]) -> None:
    with cli_errors():
        registry = obj.open_registry()
        try:
            fn(registry)
        finally:
            registry.close()


@instance.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def instance_list(obj: Ctx, as_json: bool) -> None:
    """One line per instance: uuid, name, network:ip of each port."""

    def body(registry: Any) -> None:
        rows = [_instance_summary(i) for i in registry.list_instances()]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            click.echo(f"{row['uuid']}  {row['name']:<20} {' '.join(row['addresses'])}")

    _with_registry(obj, body)


@main.command("export")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), help="Default: by -o's extension, else yaml.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE, not stdout.")
@pass_ctx
def export(obj: Ctx, fmt: str | None, output: Path | None) -> None:
    """Write the whole registry as an inventory that import accepts unchanged."""
    from meta169.inventory import Format, dump_inventory, export_inventory, save_inventory

    def body(registry: Any) -> None:
        inventory = export_inventory(registry)
        if output is None:
            click.echo(dump_inventory(inventory, cast(Format, fmt or "yaml")), nl=False)
        else:
            save_inventory(inventory, output, cast(Format | None, fmt))

    _with_registry(obj, body)


@instance.command("show")
@click.argument("uuid")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "inventory"]),
    default="json",
    show_default=True,
    help="inventory: a YAML document that import accepts.",
)
@pass_ctx
def instance_show(obj: Ctx, uuid: str, fmt: str) -> None:
    """Everything the registry holds for one instance, in inventory form."""
    from meta169.inventory import Inventory, dump_inventory, instance_to_dict

    def body(registry: Any) -> None:
        found = registry.get_instance(uuid)
        if fmt == "inventory":
            click.echo(dump_inventory(Inventory(instances=(found,))), nl=False)
        else:
            click.echo(json.dumps(instance_to_dict(found), indent=2))

    _with_registry(obj, body)


@instance.command("rm")
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def instance_rm(obj: Ctx, uuids: tuple[str, ...]) -> None:
    """Remove instances (and their ports)."""

    def body(registry: Any) -> None:
        for uuid in uuids:
            registry.delete_instance(uuid)
            click.echo(f"removed {uuid}")

    _with_registry(obj, body)


@main.group()
def network() -> None:
    """List networks."""


@network.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def network_list(obj: Ctx, as_json: bool) -> None:
    """One line per network with its subnets."""

    def body(registry: Any) -> None:
        nets = registry.list_networks()
        rows = [{"id": n.id, "project_id": n.project_id, "subnets": [str(s.cidr) for s in n.subnets]} for n in nets]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            click.echo(f"{row['id']:<20} {row['project_id']:<12} {' '.join(row['subnets'])}")

    _with_registry(obj, body)


@main.group()
def router() -> None:
    """List routers."""


@router.command("list")
@pass_ctx
def router_list(obj: Ctx) -> None:
    """One line per router with its networks."""

    def body(registry: Any) -> None:
        for r in registry.list_routers():
            click.echo(f"{r.id:<20} {' '.join(r.network_ids)}")

    _with_registry(obj, body)


def _instance_summary(inst: Any) -> dict[str, Any]:
    return {
        "uuid": inst.uuid,
        "name": inst.name,
        "hostname": inst.hostname,
        "addresses": [f"{p.network_id}:{ip}" for p in inst.ports for ip in p.ips],
    }


main.lazy_commands.update(
    {
        "lab": "meta169.lab.cli:lab",
        "identity": "meta169.identity.cli:identity",
        "query": "meta169.client.cli:query",
        "doctor": "meta169.doctor.cli:doctor",
        "plumb": "meta169.plumbing.cli:plumb",
    }
)


def run_cli() -> None:  # pragma: no cover - console entry
    main(prog_name=os.path.basename(sys.argv[0]) or "meta169")
