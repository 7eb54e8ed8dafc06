"""``meta169 doctor`` against a real ``meta169 serve`` on loopback.

Guest side: the live probes (pointed at loopback with --url; the default 169.254.169.254
is never used here) land in the bundle and drive the findings; --collect and --offline
agree. Host side: serve reachable, the proxy's secret accepted or not (the real HMAC over
TCP), and whether the registry resolves a caller.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving import ServeProcess, imported_registry, run_cli, start_serve
from tests.processes import free_port

ALPHA = "11111111-1111-4111-8111-111111111111"
INVENTORY = f"""
networks:
  - id: net-d
    subnets: [{{cidr: 127.0.0.0/24}}]
  - id: net-empty
    subnets: [{{cidr: 127.0.0.0/24}}]
instances:
  - uuid: {ALPHA}
    name: alpha
    ports: [{{network: net-d, mac: "fa:16:3e:00:00:01", ips: [127.0.0.1]}}]
"""
SECRET = b"doctor-test-secret-0123456789abcdef"


def secret_file(path: Path, value: bytes) -> Path:
    path.write_bytes(value)
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("doctor")
    url = imported_registry(tmp, INVENTORY)
    return url


@pytest.fixture(scope="module")
def served(registry_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("serve")
    good = secret_file(tmp / "serve.secret", SECRET)
    srv = start_serve(registry_url, ["127.0.0.1:0=network:net-d", "127.0.0.1:0=network:net-empty",
                                     "127.0.0.1:0=proxy"], "--proxy-secret-file", str(good))  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def url_of(srv: ServeProcess, index: int) -> str:
    host, port = srv.addresses[index]
    return f"http://{host}:{port}"


def doctor(registry_url: str, *args: str) -> tuple[int, dict[str, object]]:
    result: subprocess.CompletedProcess[str] = run_cli(registry_url, "doctor", "--json", *args, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def finding_ids(report: dict[str, object]) -> list[str]:
    return [f["id"] for f in report["findings"]]  # type: ignore[index, union-attr]


def path_states(report: dict[str, object]) -> dict[str, str]:
    return {h["hop"]: h["state"] for h in report["path"]}  # type: ignore[index, union-attr]


PROBE_IDS = {"metadata-no-answer", "metadata-refused", "metadata-server-error", "metadata-forbidden",
             "metadata-not-found", "imdsv2-required", "imdsv2-rejected", "imdsv2-unavailable"}  # fmt: skip


def test_doctor_live_collect_then_offline_with_a_healthy_service(
    served: ServeProcess, registry_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    result = run_cli(registry_url, "doctor", "--collect", str(out), "--url", url_of(served, 0), check=False)
    assert result.returncode == 0, result.stderr
    probes = {p["name"]: p for p in json.loads((out / "probes.json").read_text())}
    assert probes["tcp"]["outcome"] == "ok"
    assert (probes["openstack"]["status"], probes["ec2"]["status"], probes["imdsv2"]["status"]) == (200, 200, 200)
    assert "ipv6" not in probes  # only with the real metadata address
    assert (out / "meta.json").exists() and (out / "env.json").exists()
    _, report = doctor(registry_url, "--offline", str(out))
    assert not PROBE_IDS & set(finding_ids(report))
    states = path_states(report)
    assert (states["proxy"], states["server"], states["registry"]) == ("ok", "ok", "ok")


def test_doctor_live_refused_breaks_the_proxy_hop(registry_url: str) -> None:
    code, report = doctor(registry_url, "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 1
    assert "metadata-refused" in finding_ids(report)
    assert report["broken_hop"] in ("guest", "route", "proxy")  # this machine's own routes may come first
    assert path_states(report)["proxy"] == "broken"


def test_doctor_live_unknown_instance_breaks_the_registry_hop(served: ServeProcess, registry_url: str) -> None:
    code, report = doctor(registry_url, "--url", url_of(served, 1))
    assert code == 1
    assert "metadata-not-found" in finding_ids(report)
    finding = next(f for f in report["findings"] if f["id"] == "metadata-not-found")  # type: ignore[union-attr]
    assert any("HTTP 404" in e for e in finding["evidence"])
    assert path_states(report)["registry"] == "broken"


def test_doctor_live_no_probes_sends_nothing(registry_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = run_cli(registry_url, "doctor", "--collect", str(out), "--no-probes", check=False)
    assert result.returncode == 0, result.stderr
    assert not (out / "probes.json").exists()


def test_doctor_live_usage_errors_exit_2(registry_url: str, tmp_path: Path) -> None:
    assert run_cli(registry_url, "doctor", "--host", "--offline", str(tmp_path), check=False).returncode == 2
    assert run_cli(registry_url, "doctor", "--offline", str(tmp_path / "missing"), check=False).returncode == 2
    assert run_cli(registry_url, "doctor", "--host", "--ip", "10.0.0.1", check=False).returncode == 2


# --- host side ------------------------------------------------------------------------------------


def host_doctor(registry_url: str, *args: str) -> tuple[int, dict[str, object]]:
    return doctor(registry_url, "--host", *args)


def test_doctor_host_live_accepts_the_shared_secret(served: ServeProcess, registry_url: str, tmp_path: Path) -> None:
    host, port = served.addresses[2]
    good = secret_file(tmp_path / "proxy.secret", SECRET)
    code, report = host_doctor(registry_url, "--upstream", f"{host}:{port}", "--secret-file", str(good),
                               "--network", "net-d", "--ip", "127.0.0.1")  # fmt: skip
    assert (code, finding_ids(report)) == (0, [])
    states = path_states(report)
    assert (states["server"], states["registry"]) == ("ok", "ok")


def test_doctor_host_live_secret_mismatch(served: ServeProcess, registry_url: str, tmp_path: Path) -> None:
    host, port = served.addresses[2]
    bad = secret_file(tmp_path / "proxy.secret", b"a-different-secret-0123456789")
    code, report = host_doctor(registry_url, "--upstream", f"{host}:{port}", "--secret-file", str(bad))
    assert code == 1
    assert finding_ids(report)[0] == "secret-mismatch"
    assert report["broken_hop"] == "server"


def test_doctor_host_live_server_unreachable(registry_url: str) -> None:
    code, report = host_doctor(registry_url, "--upstream", f"unix:/nonexistent/meta169-{os.getpid()}.sock")
    assert code == 1
    assert finding_ids(report) == ["server-unreachable"]


def test_doctor_host_live_unknown_instance(served: ServeProcess, registry_url: str, tmp_path: Path) -> None:
    host, port = served.addresses[2]
    good = secret_file(tmp_path / "proxy.secret", SECRET)
    code, report = host_doctor(registry_url, "--upstream", f"{host}:{port}", "--secret-file", str(good),
                               "--network", "net-d", "--ip", "127.0.0.77")  # fmt: skip
    assert code == 1
    assert finding_ids(report) == ["unknown-instance"]


def test_doctor_live_files_root_and_extra_leases(registry_url: str, tmp_path: Path) -> None:
    """A lab VM or a container: config files under another root, the lease file elsewhere."""
    root = tmp_path / "vmroot"
    (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
    (root / "etc/sysconfig/network").write_text("NETWORKING=yes\nNOZEROCONF=yes\n")
    lease = tmp_path / "vm-a1" / "dhclient-eth0.leases"
    lease.parent.mkdir()
    lease.write_text('lease {\n  interface "eth0";\n  fixed-address 10.0.0.11;\n'
                     "  option rfc3442-classless-static-routes 32,169,254,169,254,10,0,0,1;\n}\n")  # fmt: skip
    out = tmp_path / "bundle"
    result = run_cli(registry_url, "doctor", "--collect", str(out), "--no-probes", "--files-root", str(root),
                     "--lease", str(lease), check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "files/etc/sysconfig/network").read_text().endswith("NOZEROCONF=yes\n")
    assert (out / "files" / str(lease).lstrip("/")).read_text() == lease.read_text()


def test_doctor_host_discovers_the_config_files_proxy(served: ServeProcess, registry_url: str, tmp_path: Path) -> None:
    # The config file names the proxy's upstream (this serve, over TCP with the shared
    # secret) and its listener file, whose namespace does not exist on this host.
    host, port = served.addresses[2]
    namespace = f"qrouter-m169t-{os.getpid()}-absent"
    listeners = tmp_path / "listeners.json"
    listeners.write_text(json.dumps({"listeners": [{"netns": namespace, "address": "0.0.0.0", "router": "r1"}]}))
    config = tmp_path / "meta169.toml"
    config.write_text(f'[proxy]\nupstream = "{host}:{port}"\nlisteners = "{listeners}"\n'
                      f'secret-file = "{secret_file(tmp_path / "proxy.secret", SECRET)}"\n')  # fmt: skip
    result = run_cli(registry_url, "--config", str(config), "doctor", "--json", "--host",
                     "--state-root", str(tmp_path), "--only", namespace, check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert finding_ids(report) == ["netns-missing"]
    assert report["discovered"] == [
        f"config {config} [proxy]: namespaces {namespace}; listener file {listeners}; upstream {host}:{port}; "
        f"secret file {tmp_path / 'proxy.secret'}"
    ]
    server = next(h for h in report["path"] if h["hop"] == "server")  # type: ignore[union-attr]
    assert server["state"] == "ok" and "signed with the proxy's secret" in server["detail"], server
