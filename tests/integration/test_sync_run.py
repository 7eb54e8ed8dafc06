"""The service around a source's watch (meta169.sources.run): what the service manager
hears and when, driven by a watch of the test's own (the seam run_watch takes) in
this process, with a real notify socket and real signals.

The libvirt and OpenStack watches behind it are tested in test_sync_libvirt.py and
test_sync_openstack.py; their units, as systemd starts them, in test_systemd_units.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta169.errors import ConfigError, SourceError
from meta169.inventory import Change, ImportPlan
from meta169.sdnotify import Notifier
from meta169.sources.reconcile import SyncResult
from meta169.sources.run import WatchConfig, run_watch
from tests.integration.notify import Manager, manager_at

SOURCE = "openstack:test"
Fields = dict[str, str]


def result(revision: int) -> SyncResult:
    plan = ImportPlan((Change("add", "instance", "00000000-0000-4000-8000-000000000001", "a"),))
    return SyncResult(SOURCE, plan, plan.report(revision))


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """run_watch leaves SIGHUP ignored, as a service's edge wants; not this process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with manager_at(tmp_path / "notify") as made:
        yield made


def drive(
    watch: Callable[..., None],
    manager: Manager,
    *,
    on_message: Callable[[Fields], bool],
    stall: float = 60.0,
    watchdog_usec: int | None = None,
) -> list[Fields]:
    """run_watch(watch) here, while a thread reads what it notifies and calls
    ``on_message`` with each message; once that returns True (or after 15 s) the
    thread sends this process SIGTERM, as systemctl stop would. Every message."""
    done = threading.Event()

    def listen() -> None:
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline and not done.is_set():
                fields = manager.receive(0.05)
                if fields is not None and on_message(fields):
                    break
        finally:
            if not done.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        run_watch(
            watch,
            WatchConfig(source=SOURCE, stall=stall, stop_timeout=2.0),
            notifier=Notifier(str(manager.path), watchdog_usec),
        )
    finally:
        done.set()
        listener.join(5)
    return [*manager.messages, *manager.drain()]


def statuses(messages: list[Fields]) -> list[str]:
    return [m["STATUS"] for m in messages if "STATUS" in m]


def test_sync_run_ready_only_after_the_first_successful_sync_then_stops_on_sigterm(manager: Manager) -> None:
    def watch(stop: threading.Event, _wake: threading.Event, on_result: Any, on_error: Any) -> None:
        on_error(SourceError("cannot list servers: 503", source=SOURCE))
        time.sleep(0.2)
        on_result(result(7))
        stop.wait()

    messages = drive(watch, manager, on_message=lambda m: "READY" in m)
    ready = [i for i, m in enumerate(messages) if "READY" in m]
    assert len(ready) == 1, messages
    assert messages[ready[0]] == {"READY": "1", "STATUS": f"{SOURCE} in sync at registry revision 7"}
    before = statuses(messages[: ready[0]])
    assert before == [
        f"{SOURCE}: first sync",
        f"waiting for a first successful sync (1 failed): {SOURCE}: cannot list servers: 503",
    ]
    assert messages[-1] == {"STOPPING": "1", "STATUS": "stopping (SIGTERM)"}


def test_sync_run_failures_after_ready_are_statuses_not_a_stop(manager: Manager) -> None:
    def watch(stop: threading.Event, _wake: threading.Event, on_result: Any, on_error: Any) -> None:
        on_result(result(1))
        for _ in range(2):
            on_error(SourceError("cannot list ports: timed out", source=SOURCE))
        on_result(result(2))
        stop.wait()

    messages = drive(watch, manager, on_message=lambda m: m.get("STATUS", "").endswith("revision 2"))
    assert statuses(messages)[1:] == [
        f"{SOURCE} in sync at registry revision 1",
        f"sync failed (1 in a row), the registry keeps what it holds: {SOURCE}: cannot list ports: timed out",
        f"sync failed (2 in a row), the registry keeps what it holds: {SOURCE}: cannot list ports: timed out",
        f"{SOURCE} in sync at registry revision 2",
        "stopping (SIGTERM)",
    ]


def test_sync_run_sighup_wakes_the_watch(manager: Manager) -> None:
    def watch(stop: threading.Event, wake: threading.Event, on_result: Any, _on_error: Any) -> None:
        on_result(result(1))
        while not stop.is_set():
            if wake.wait(0.05):
                wake.clear()
                on_result(result(2))

    def on_message(fields: Fields) -> bool:
        if "READY" in fields:
            os.kill(os.getpid(), signal.SIGHUP)
        return fields.get("STATUS", "").endswith("revision 2")

    messages = drive(watch, manager, on_message=on_message)
    assert f"{SOURCE} in sync at registry revision 2" in statuses(messages)


def test_sync_run_a_stuck_watch_stops_the_watchdog_pings(manager: Manager) -> None:
    hang = threading.Event()

    def watch(stop: threading.Event, _wake: threading.Event, on_result: Any, _on_error: Any) -> None:
        on_result(result(1))
        hang.wait(5)  # a call to a source that does not return
        stop.wait()

    seen: list[Fields] = []

    def on_message(fields: Fields) -> bool:
        seen.append(fields)
        return "stuck" in fields.get("STATUS", "")

    # Pings every 0.05 s; no sync ended for 0.5 s is stuck.
    messages = drive(watch, manager, on_message=on_message, stall=0.5, watchdog_usec=100_000)
    hang.set()
    stuck = next(i for i, m in enumerate(messages) if "stuck" in m.get("STATUS", ""))
    assert messages[stuck]["STATUS"].startswith("no sync ended for "), messages[stuck]
    pings_before = [m for m in messages[:stuck] if m.get("WATCHDOG") == "1"]
    assert len(pings_before) >= 5, messages
    assert not [m for m in messages[stuck:] if m.get("WATCHDOG")], messages


def test_sync_run_a_watch_that_raises_ends_the_service_with_its_error(manager: Manager) -> None:
    def watch(_stop: threading.Event, _wake: threading.Event, _on_result: Any, _on_error: Any) -> None:
        raise ConfigError("openstack:test: cloud test was not found")

    with pytest.raises(ConfigError, match="was not found"):
        drive(watch, manager, on_message=lambda _m: False)
    assert not [m for m in manager.messages if "READY" in m]


def test_sync_run_metrics_address_in_use_is_a_configuration_error(manager: Manager) -> None:
    import socket

    from meta169.http.listen import ListenAddress

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = WatchConfig(source=SOURCE, stall=60, metrics_listen=ListenAddress(host="127.0.0.1", port=port))

        def watch(*_args: Any) -> None:
            raise AssertionError("the watch must not start")

        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_watch(watch, config, notifier=Notifier(str(manager.path)))


def test_sync_run_a_repeated_error_is_logged_once_a_minute(manager: Manager, caplog: pytest.LogCaptureFixture) -> None:
    def watch(stop: threading.Event, _wake: threading.Event, on_result: Any, on_error: Any) -> None:
        for _ in range(5):  # libvirtd down: a reconnect every 2 s
            on_error(SourceError("cannot connect: no socket", source=SOURCE))
        on_error(SourceError("cannot list domains: timed out", source=SOURCE))
        on_result(result(1))
        stop.wait()

    with caplog.at_level("WARNING", "meta169.sources"):
        drive(watch, manager, on_message=lambda m: "READY" in m)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"{SOURCE}: cannot connect: no socket",
        f"{SOURCE}: cannot list domains: timed out (6 failed in a row)",
    ]
    assert f"{SOURCE}: in sync again after 6 failed syncs" in caplog.text
