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
from typing import Any, TypeVar, cast

import click

from meta169.config import DEFAULT_CONFIG_PATH, apply_to_command, assign_envvars, exposed_password_warning, load_config
from meta169.errors import ConfigError, Conflict
from meta169.exits import EXIT_REGISTRY, cli_errors, fail


class Ctx:
    """What the top-level group hands every subcommand: where the registry is."""

    def __init__(self, registry_url: str | None, registry_password_file: Path | None = None) -> None:
        self._registry_url = registry_url
        self._password_file = registry_password_file
        self._joined: str | None = None

    @property
    def configured_registry_url(self) -> str:
        """The registry URL as configured (or the default), without the password file's password."""
        from meta169.registry import default_registry_url

        if self._registry_url:
            return self._registry_url
        return default_registry_url(euid=os.geteuid(), home=Path.home(), xdg_data_home=os.environ.get("XDG_DATA_HOME"))

    @property
    def registry_url(self) -> str:
        """The URL to connect with: the password file's password joined here, never in argv."""
        if self._joined is None:
            url = self.configured_registry_url
            if self._password_file is not None:
                from meta169.config import with_password
                from meta169.secretfile import read_secret_file

                url = with_password(url, read_secret_file(self._password_file, what="registry password-file"))
            self._joined = url
        return self._joined

    def open_registry(self, *, create: bool = False) -> Any:
        """Open the registry; a SQLite file that does not exist is an error unless
        ``create`` (import), and so is its directory unless it is the default one."""
        from meta169.registry import default_registry_url, open_registry

        default = default_registry_url(
            euid=os.geteuid(), home=Path.home(), xdg_data_home=os.environ.get("XDG_DATA_HOME")
        )
        is_default = self.configured_registry_url == default
        return open_registry(self.registry_url, create=create, create_directory=create and is_default)


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


class MainGroup(LazyGroup):
    """The top-level group: every option of a configured command also comes from its
    META169_* variable and its section of the configuration file (:mod:`meta169.config`).

    The file is read by the eager ``--config`` option before the other top-level
    options; the section of the subcommand that runs is resolved when it is chosen,
    so no other subcommand is imported.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        assign_envvars(None, self)
        return super().parse_args(ctx, args)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and command is not None and not ctx.resilient_parsing:
            with cli_errors():
                apply_to_command(ctx, name, command)
        return name, command, rest


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="META169_CONFIG",
    metavar="FILE",
    is_eager=True,
    expose_value=False,
    callback=load_config,
    help=f"Configuration file (TOML) [env META169_CONFIG; default: {DEFAULT_CONFIG_PATH}, read when it exists].",
)
@click.option(
    "--registry",
    "registry_url",
    envvar="META169_REGISTRY",
    metavar="URL",
    help="Registry URL: sqlite:///path.db, postgresql://..., memory:// "
    "[env META169_REGISTRY; default: a SQLite file in the data directory].",
)
@click.option(
    "--registry-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="PostgreSQL password (file, mode 0600), joined to the registry URL in the process, never in argv.",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text (no time of their own under systemd's journal) or one JSON object each.",
)
@click.version_option(package_name="meta169")
@click.pass_context
def main(
    ctx: click.Context, registry_url: str | None, registry_password_file: Path | None, verbose: int, log_format: str
) -> None:
    """meta169: the instance metadata service at 169.254.169.254, and its network path.

    Every option can also be set in the configuration file (meta169 config show) or
    in META169_[COMMAND_]OPTION; a flag wins over the environment, which wins over the file.
    """
    from meta169.logs import setup as setup_logging

    level = logging.WARNING - 10 * min(verbose, 2)
    setup_logging(level, "json" if log_format == "json" else "text")
    warning = exposed_password_warning(ctx, "registry_url")
    if warning is not None:
        if log_format == "json":
            logging.getLogger("meta169.cli").warning("%s", warning)
        else:
            click.echo(f"meta169: warning: {warning}", err=True)
    ctx.obj = Ctx(registry_url, registry_password_file)


def _announcer() -> Callable[[str], None]:
    """How a command says what an operator (and the lab) waits for, such as serve's
    "listening on": a line on stderr, or with ``--log-format json`` a line of the
    lifecycle log (logged at every level), so that a JSON log holds only JSON."""
    if click.get_current_context().find_root().params.get("log_format") != "json":
        return lambda text: click.echo(text, err=True)
    from meta169.logs import LIFECYCLE_LOGGER

    lifecycle = logging.getLogger(LIFECYCLE_LOGGER)
    return lambda text: lifecycle.info("%s", text)


# -- options the daemons share ----------------------------------------------------------------
# serve, proxy and admin take these; each is declared once here, with the help that differs
# where the daemons do (proxy's metrics port is in the host's namespace, not a guest's).

_Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _metrics_listen_option(where: str = "") -> _Decorator:
    return click.option(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"Serve /metrics (Prometheus), /healthz and /readyz here{where} [default: off].",
    )


def _allow_empty_option(help_text: str) -> _Decorator:
    return click.option("--allow-empty", is_flag=True, help=help_text)


def _drain_timeout_option(in_flight: str = "finish") -> _Decorator:
    return click.option(
        "--drain-timeout",
        type=click.FloatRange(min=0),
        default=10.0,
        show_default=True,
        help=f"On SIGTERM, seconds to let requests in flight {in_flight} before closing them.",
    )


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
    "--registry-listen/--no-registry-listen",
    default=True,
    show_default=True,
    help="PostgreSQL: hear of registry changes as they commit (LISTEN/NOTIFY); polling stays as the fallback. "
    "Off behind a pooler that does not pass notifications on (PgBouncer in transaction mode).",
)
@click.option(
    "--site-cache-size",
    type=click.IntRange(min=1),
    default=4_000,
    show_default=True,
    help="Rendered sites kept in memory (about 30 KB each); the oldest go first and render again when asked.",
)
@click.option(
    "--prerender/--no-prerender",
    default=True,
    show_default=True,
    help="Render sites ahead: at start and for every instance a registry change brings (up to --site-cache-size).",
)
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
@_metrics_listen_option()
@click.option("--access-log", is_flag=True, help="Log one line per request (logger meta169.access).")
@click.option(
    "--access-log-sample",
    type=click.FloatRange(0.0, 1.0),
    default=1.0,
    show_default=True,
    metavar="RATE",
    help="With --access-log: the share of requests logged, chosen at random (0..1).",
)
@_allow_empty_option(
    "Start even if the registry holds no instances (every guest gets 404 until an import); "
    "warns every minute and /readyz fails while it is empty."
)
@_drain_timeout_option()
@pass_ctx
def serve(obj: Ctx, /, workers: int, **params: Any) -> None:
    """Serve the OpenStack and EC2 metadata trees.

    SIGHUP reloads the rate limit, the --vendor-data file and the log level without
    dropping connections; SIGTERM stops accepting and drains (--drain-timeout).
    """
    from meta169.api.server import run
    from meta169.health import Health
    from meta169.sdnotify import Notifier

    with cli_errors():
        if workers < 1:
            raise ConfigError("--workers must be >= 1")
        config = _serve_config(obj, _log_level(click.get_current_context().find_root().params), **params)
        if config.identity_key_dir is not None:  # fail before binding and forking, not in every worker
            from meta169.identity import load_identity_key

            load_identity_key(config.identity_key_dir)
        specs = config.listeners
        health = Health()

        say = _announcer()

        def ready(addresses: list[Any]) -> None:
            for spec, address in zip(specs, addresses, strict=True):
                say(f"meta169 serve: listening on {address} ({spec.binding.scope})")

        run(
            config,
            workers=workers,
            on_ready=ready,
            notifier=Notifier.from_environ(),
            health=health,
            reload=_rebuilder(lambda ctx_obj, level, p: _serve_config(ctx_obj, level, **_without(p, "workers"))),
        )


def _serve_config(
    obj: Ctx,
    log_level: int,
    *,
    listens: tuple[str, ...],
    network_id: str | None,
    router_id: str | None,
    proxy_mode: bool,
    vendor_data_file: Path | None,
    poll_interval: float,
    registry_listen: bool,
    site_cache_size: int,
    prerender: bool,
    proxy_secret_file: Path | None,
    neutron_secret_file: Path | None,
    token_key_file: Path | None,
    http_tokens: str,
    hop_limit: int,
    rate_limit: str,
    vendordata_dynamic: tuple[str, ...],
    vendordata_timeout: float,
    identity_key_dir: Path | None,
    metrics_listen: str | None,
    access_log: bool,
    access_log_sample: float,
    allow_empty: bool,
    drain_timeout: float,
) -> Any:
    """serve's ServeConfig from its parameters: at start, and again on SIGHUP."""
    from meta169.api.config import ServeConfig
    from meta169.api.tokens import load_key_ring
    from meta169.api.vendordata import DynamicTarget
    from meta169.http.listen import Binding, ListenerSpec, metrics_listen_address, parse_listen
    from meta169.model import MetadataOptions
    from meta169.secretfile import read_secret_file

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
    config = ServeConfig(
        registry_url=obj.registry_url,
        listeners=tuple(specs),
        static_vendor_data=vendor,
        poll_interval=poll_interval,
        registry_listen=registry_listen,
        site_cache_size=site_cache_size,
        prerender=prerender,
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
        metrics_listen=metrics_listen_address(metrics_listen),
        access_log_sample=access_log_sample if access_log else None,
        allow_empty=allow_empty,
        drain_timeout=drain_timeout,
        log_level=log_level,
    )
    if any(s.binding.kind == "neutron" for s in specs) and config.neutron_secret is None:
        raise ConfigError("a =neutron listener needs --neutron-secret-file (Nova refuses an empty secret too)")
    return config


T = TypeVar("T")


def _log_level(root_params: dict[str, Any]) -> int:
    """The root logger's level main() sets from -v."""
    return logging.WARNING - 10 * min(int(root_params.get("verbose") or 0), 2)


def _without(params: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in names}


def _rebuilder(build: Callable[[Ctx, int, dict[str, Any]], T]) -> Callable[[], T]:
    """What SIGHUP calls: the running command's configuration built again as a fresh
    start would build it, from the same command line with the environment and the
    configuration file read anew. Any error is a ConfigError (the server keeps its
    running configuration and logs it)."""
    current = click.get_current_context()
    name = current.info_name or ""
    prog = current.find_root().info_name
    args = sys.argv[1:]

    def rebuild() -> T:
        try:
            with main.make_context(prog, list(args)) as root:
                # The group's callback runs again: root.meta says it is a reload.
                root.meta["meta169.reload"] = True
                assert main.callback is not None
                root.invoke(main.callback, **root.params)
                _, command, rest = main.resolve_command(root, [name, *root.args])
                assert command is not None
                with command.make_context(name, rest, parent=root) as sub:
                    return build(root.find_object(Ctx) or Ctx(None), _log_level(root.params), dict(sub.params))
        except click.ClickException as exc:
            raise ConfigError(f"reload: {exc.format_message()}") from exc
        except (click.exceptions.Exit, SystemExit) as exc:
            # cli_errors() in the group already printed the error and asked to exit.
            raise ConfigError("reload: the configuration is invalid (see the error above)") from exc

    return rebuild


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
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    required=True,
    metavar="unix:PATH|HOST:PORT",
    help="Where meta169 serve listens. Repeatable: requests go to the healthy upstream with the fewest "
    "outstanding, and one that fails before replying is retried on another.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Shared secret for TCP upstreams (file, mode 0600); required for TCP.",
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
    help="Seconds to wait for serve's reply (waiting for a connection included) before answering the guest 504.",
)
@click.option(
    "--upstream-queue",
    type=click.IntRange(min=0),
    default=4096,
    show_default=True,
    help="Requests that may wait for a connection to serve when every upstream's 256 are busy; past it, 503.",
)
@click.option(
    "--upstream-check-interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between health checks of each upstream (skipped while it answers requests).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes, each with every listener (SO_REUSEPORT: the kernel spreads the guests' connections) "
    "and its own connections to serve: a boot storm's CPU on several cores.",
)
@_metrics_listen_option(", in the host's namespace")
@_allow_empty_option("With --from-registry: start even if the registry holds no instances.")
@_drain_timeout_option("get their replies")
@pass_ctx
def proxy(obj: Ctx, /, workers: int, **params: Any) -> None:
    """Per-namespace metadata proxy: stamp caller identity, forward to serve.

    SIGHUP reads the listener file (and the registry) again at once and applies
    changed --listen flags and log level; SIGTERM stops accepting and drains.
    """
    from meta169.health import Health
    from meta169.proxy.run import run_proxy
    from meta169.sdnotify import Notifier

    with cli_errors():
        config = _proxy_config(obj, _log_level(click.get_current_context().find_root().params), **params)
        say = _announcer()
        run_proxy(
            config,
            on_ready=lambda n: say(f"meta169 proxy: {n} listeners up"),
            notifier=Notifier.from_environ(),
            workers=workers,
            health=Health(),
            reload=_rebuilder(lambda ctx_obj, level, p: _proxy_config(ctx_obj, level, **_without(p, "workers"))),
        )


def _proxy_config(
    obj: Ctx,
    log_level: int,
    *,
    upstreams: tuple[str, ...],
    secret_file: Path | None,
    listener_file: Path | None,
    from_registry: bool,
    listens: tuple[str, ...],
    upstream_timeout: float,
    upstream_queue: int,
    upstream_check_interval: float,
    metrics_listen: str | None,
    allow_empty: bool,
    drain_timeout: float,
) -> Any:
    """proxy's ProxyConfig from its parameters: at start, and again on SIGHUP."""
    from meta169.http.listen import metrics_listen_address
    from meta169.proxy.run import ProxyConfig, parse_static_listener, parse_upstream

    if not (listener_file or from_registry or listens):
        raise ConfigError("give --listeners FILE, --from-registry or at least one --listen")
    specs = tuple(dataclasses.replace(parse_upstream(u), reply_timeout=upstream_timeout) for u in upstreams)
    secret = None
    if secret_file is not None:
        from meta169.secretfile import read_secret_file

        secret = read_secret_file(secret_file, what="--secret-file")
    elif any(spec.is_tcp for spec in specs):
        raise ConfigError("a TCP --upstream needs --secret-file (per-request HMAC); use unix:PATH otherwise")
    return ProxyConfig(
        upstreams=specs,
        queue_limit=upstream_queue,
        check_interval=upstream_check_interval,
        secret=secret,
        static=tuple(parse_static_listener(x) for x in listens),
        listener_file=listener_file,
        registry_url=obj.registry_url if from_registry else None,
        metrics_listen=metrics_listen_address(metrics_listen),
        allow_empty=allow_empty,
        drain_timeout=drain_timeout,
        log_level=log_level,
    )


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
@_metrics_listen_option()
@_allow_empty_option("Start even if the registry holds no instances (to fill it through this API).")
@_drain_timeout_option()
@click.option(
    "--max-body-mib",
    type=click.IntRange(min=1, max=1024),
    default=4,
    show_default=True,
    help="Largest request body in MiB: an import of 100,000 instances is about 50 MiB of JSON.",
)
@pass_ctx
def admin(obj: Ctx, /, **params: Any) -> None:
    """Serve the authenticated admin API (list, show, create, update, delete, import).

    SIGHUP reads the token file again and applies the log level; SIGTERM drains.
    """
    from meta169.admin.run import run_admin
    from meta169.health import Health
    from meta169.sdnotify import Notifier

    with cli_errors():
        config = _admin_config(obj, _log_level(click.get_current_context().find_root().params), **params)
        say = _announcer()
        run_admin(
            config,
            on_ready=lambda host, port: say(f"meta169 admin: listening on {host}:{port}"),
            notifier=Notifier.from_environ(),
            health=Health(),
            reload=_rebuilder(lambda ctx_obj, level, p: _admin_config(ctx_obj, level, **p)),
        )


def _admin_config(
    obj: Ctx,
    log_level: int,
    *,
    listen: str,
    token_file: Path,
    metrics_listen: str | None,
    allow_empty: bool,
    drain_timeout: float,
    max_body_mib: int,
) -> Any:
    """admin's AdminConfig from its parameters: at start, and again on SIGHUP."""
    from meta169.admin.run import AdminConfig
    from meta169.http.listen import metrics_listen_address, parse_listen
    from meta169.secretfile import read_secret_file

    return AdminConfig(
        registry_url=obj.registry_url,
        address=parse_listen(listen),
        token=read_secret_file(token_file, what="--token-file"),
        allow_empty=allow_empty,
        drain_timeout=drain_timeout,
        log_level=log_level,
        metrics_listen=metrics_listen_address(metrics_listen),
        max_body_bytes=max_body_mib << 20,
    )


# -- registry administration --------------------------------------------------------------------


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--prune",
    is_flag=True,
    help="Make the registry equal to the files: remove the instances they do not list, "
    "and the networks and routers they do not list once nothing uses them.",
)
@click.option("--dry-run", is_flag=True, help="List what would be added, changed and removed; write nothing.")
@pass_ctx
def import_(obj: Ctx, files: tuple[Path, ...], prune: bool, dry_run: bool) -> None:
    """Load YAML or JSON inventory files (idempotent: re-import updates).

    Creates a missing SQLite registry file (mode 0600), and its directory (0700)
    only when it is the default data directory.
    """
    _import(obj, files, prune=prune, dry_run=dry_run)


def _import(obj: Ctx, files: tuple[Path, ...], *, prune: bool, dry_run: bool) -> None:
    from meta169.inventory import (
        apply_inventory,
        apply_plan,
        format_import_report,
        format_plan,
        load_inventory,
        plan_inventory,
    )

    with cli_errors():
        inventories = [load_inventory(f) for f in files]  # validate all before writing any
        registry = obj.open_registry(create=not dry_run)
        try:
            if dry_run:
                # Several files are planned as one inventory, as --prune reads them.
                click.echo(format_plan(plan_inventory(registry, inventories, prune=prune)))
            elif prune:
                plan = plan_inventory(registry, inventories, prune=True)
                report = apply_plan(registry, plan)
                for change in plan.changes:
                    if change.action == "remove":
                        click.echo(f"removed {str(change).removeprefix('remove ')}")
                click.echo(f"{', '.join(str(f) for f in files)}: {format_import_report(report)}")
            else:
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
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many instances (one page), in uuid order.",
)
@click.option("--marker", metavar="UUID", help="Start after this uuid: the last one of the previous page.")
@click.option("--all", "every", is_flag=True, help="Every instance, read from the registry a page at a time.")
@pass_ctx
def instance_list(obj: Ctx, as_json: bool, limit: int, marker: str | None, every: bool) -> None:
    """One line per instance: uuid, name, network:ip of each port.

    Pages as Nova's list APIs do: --limit, then --marker with the last uuid shown.
    """
    from meta169.registry import iter_instances

    def body(registry: Any) -> None:
        if every:
            rows = (_instance_summary(i) for i in iter_instances(registry, page=limit, marker=marker))
        else:
            rows = (_instance_summary(i) for i in registry.list_instances(limit=limit, marker=marker))
        last, shown = None, 0
        if as_json:
            click.echo("[", nl=False)
        for row in rows:
            if as_json:
                click.echo(("," if shown else "") + "\n  " + json.dumps(row), nl=False)
            else:
                click.echo(f"{row['uuid']}  {row['name']:<20} {' '.join(row['addresses'])}")
            last, shown = row["uuid"], shown + 1
        if as_json:
            click.echo("\n]" if shown else "]")
        if not every and shown == limit:
            click.echo(f"{shown} shown; for the next page: meta169 instance list --marker {last}", err=True)

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


# `show` prints one entry: JSON (the admin API's body) or an inventory document.
_show_format = click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "inventory"]),
    default="json",
    show_default=True,
    help="inventory: a YAML document that import accepts.",
)


def _show(obj: Ctx, key: str, read: Callable[[Any], Any], fmt: str) -> None:
    """Print the entry ``read`` gets from the registry, as the inventory lists it under
    ``key`` (instances, networks, routers), in the ``--format`` of ``show``."""
    from meta169.inventory import Inventory, dump_inventory, instance_to_dict, network_to_dict, router_to_dict

    to_dict: dict[str, Callable[[Any], dict[str, Any]]] = {
        "instances": instance_to_dict,
        "networks": network_to_dict,
        "routers": router_to_dict,
    }

    def body(registry: Any) -> None:
        found = read(registry)
        if fmt == "inventory":
            entries: dict[str, Any] = {key: (found,)}
            click.echo(dump_inventory(Inventory(**entries)), nl=False)
        else:
            click.echo(json.dumps(to_dict[key](found), indent=2))

    _with_registry(obj, body)


def _remove(obj: Ctx, kind: str, idents: tuple[str, ...], delete: Callable[[Any, str], None]) -> None:
    """Remove each of ``idents`` in turn: ``removed ID`` for each, exit 3 at the first
    one that is absent (NotFound) or still used (Conflict, naming what uses it)."""

    def body(registry: Any) -> None:
        for ident in idents:
            try:
                delete(registry, ident)
            except Conflict as exc:
                fail(f"cannot remove {kind} {ident}: {exc}", EXIT_REGISTRY)
            click.echo(f"removed {ident}")

    _with_registry(obj, body)


@instance.command("show")
@click.argument("uuid")
@_show_format
@pass_ctx
def instance_show(obj: Ctx, uuid: str, fmt: str) -> None:
    """Everything the registry holds for one instance, in inventory form."""
    _show(obj, "instances", lambda registry: registry.get_instance(uuid), fmt)


@instance.command("rm")
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def instance_rm(obj: Ctx, uuids: tuple[str, ...]) -> None:
    """Remove instances (and their ports)."""
    _remove(obj, "instance", uuids, lambda registry, uuid: registry.delete_instance(uuid))


@main.group()
def network() -> None:
    """List, show and remove networks."""


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


@network.command("show")
@click.argument("network_id", metavar="ID")
@_show_format
@pass_ctx
def network_show(obj: Ctx, network_id: str, fmt: str) -> None:
    """Everything the registry holds for one network, in inventory form."""
    _show(obj, "networks", lambda registry: registry.get_network(network_id), fmt)


@network.command("rm")
@click.argument("network_ids", metavar="ID...", nargs=-1, required=True)
@pass_ctx
def network_rm(obj: Ctx, network_ids: tuple[str, ...]) -> None:
    """Remove networks (and their subnets).

    A network an instance's port or a router still uses is not removed: the error
    names them. Remove those instances, or the router, first.
    """
    _remove(obj, "network", network_ids, lambda registry, ident: registry.delete_network(ident))


@main.group()
def router() -> None:
    """List, show and remove routers."""


@router.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def router_list(obj: Ctx, as_json: bool) -> None:
    """One line per router with its networks."""

    def body(registry: Any) -> None:
        rows = [{"id": r.id, "networks": list(r.network_ids)} for r in registry.list_routers()]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            click.echo(f"{row['id']:<20} {' '.join(row['networks'])}")

    _with_registry(obj, body)


@router.command("show")
@click.argument("router_id", metavar="ID")
@_show_format
@pass_ctx
def router_show(obj: Ctx, router_id: str, fmt: str) -> None:
    """Everything the registry holds for one router, in inventory form."""
    _show(obj, "routers", lambda registry: registry.get_router(router_id), fmt)


@router.command("rm")
@click.argument("router_ids", metavar="ID...", nargs=-1, required=True)
@pass_ctx
def router_rm(obj: Ctx, router_ids: tuple[str, ...]) -> None:
    """Remove routers (their networks stay)."""
    _remove(obj, "router", router_ids, lambda registry, ident: registry.delete_router(ident))


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
        "config": "meta169.config.cli:config",
        # sync FILE | file FILE | libvirt | openstack: the registry made to match one source.
        "sync": "meta169.sources.cli:sync",
    }
)


def run_cli() -> None:  # pragma: no cover - console entry
    main(prog_name=os.path.basename(sys.argv[0]) or "meta169")
