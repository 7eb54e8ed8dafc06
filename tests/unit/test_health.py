"""Readiness checks: ready only when every check that was set is ok."""

from __future__ import annotations

from meta169.health import Health


def test_health_ready_until_a_check_fails_and_again_when_it_recovers() -> None:
    health = Health()
    assert health.ready and health.report() == {"ready": True, "checks": {}}
    health.set("registry", True)
    health.set("listener 127.0.0.1:8775", False, "not bound")
    assert not health.ready
    assert [c.name for c in health.failing()] == ["listener 127.0.0.1:8775"]
    body = health.report()
    assert body["ready"] is False and body["checks"]["listener 127.0.0.1:8775"]["detail"] == "not bound"
    health.set("listener 127.0.0.1:8775", True)
    assert health.ready


def test_health_since_changes_only_with_the_state() -> None:
    health = Health()
    health.set("poll", False, "stale")
    first = health.get("poll")
    assert first is not None
    health.set("poll", False, "still stale")
    again = health.get("poll")
    assert again is not None and again.since == first.since and again.detail == "still stale"
    health.clear("poll")
    assert health.get("poll") is None and health.ready
