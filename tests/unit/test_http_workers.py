"""What a server's main process makes of its workers' reports (meta169.http.workers.Reports)."""

from __future__ import annotations

import pytest

from meta169.http.workers import ALIVE, LEAVING, READY, Reports

# (reports fed in order, all_ready after them, take_alive after them)
CASES = [
    ((), False, False),
    (((1, READY),), False, False),
    (((1, READY), (2, READY)), True, True),
    (((1, READY + ALIVE), (2, READY)), True, True),
    # A ping before the ready report does not count as ready.
    (((1, ALIVE), (2, READY)), False, False),
    # A worker gone before or after it was ready: never ready, never alive.
    (((1, b""), (2, READY)), False, False),
    (((1, READY), (2, READY), (2, b"")), False, False),
]


@pytest.mark.parametrize(("reports", "all_ready", "alive"), CASES)
def test_workers_reports_table(reports: tuple[tuple[int, bytes], ...], all_ready: bool, alive: bool) -> None:
    state = Reports.of([1, 2])
    for pid, data in reports:
        state.feed(pid, data)
    assert state.all_ready is all_ready
    assert state.take_alive() is alive


def test_workers_every_worker_must_report_again_each_round() -> None:
    state = Reports.of([1, 2])
    state.feed(1, READY)
    state.feed(2, READY)
    assert state.take_alive()
    state.feed(1, ALIVE)
    assert not state.take_alive()  # worker 2 said nothing this round
    state.feed(1, ALIVE)
    state.feed(2, ALIVE + ALIVE)
    assert state.take_alive()


def test_workers_without_workers_the_main_process_alone_decides() -> None:
    state = Reports.of([])
    assert state.all_ready
    assert state.take_alive() and state.take_alive()


def test_workers_a_worker_that_said_it_stops_is_leaving_not_crashed() -> None:
    state = Reports.of([1, 2])
    state.feed(1, READY)
    state.feed(2, READY)
    state.feed(1, LEAVING)
    state.feed(1, b"")
    state.feed(2, b"")
    assert state.leaving == {1}
    assert state.lost == {1, 2}
