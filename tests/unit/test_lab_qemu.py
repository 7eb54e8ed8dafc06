"""A lab VM as a QEMU guest, apart from a running guest: the plan's QEMU VMs, QEMU's
command line and SMBIOS, the guest image's recipe and cache, the guest agent's
protocol (against a fake agent on a real Unix socket) and the doctor bundle."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import uuid as uuidlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meta169.errors import CommandFailed, ConfigError, LabError
from meta169.lab import agent, image, lifecycle, qemu, status
from meta169.lab import plan as lp
from meta169.lab.state import LabState, Ledger
from meta169.lab.supervise import Supervisor, marker
from meta169.plumbing.command import CommandResult

STATE = Path("/run/meta169-lab/q")
IMAGE = Path("/var/cache/meta169/guest-image/debian12-0000")


def _config(*guests: str, vms: int = 2) -> lp.LabConfig:
    return lp.LabConfig(
        name="q",
        state_dir=STATE,
        vms_per_network=vms,
        python="/usr/bin/python3",
        qemu=tuple(lp.QemuGuest.parse(g) for g in guests),
        guest_image=IMAGE if guests else None,
    )


def _plan(*guests: str) -> lp.LabPlan:
    return lp.plan_lab(_config(*guests))


# --- the plan's QEMU VMs ----------------------------------------------------------------------------


def test_lab_qemu_guest_parses_vm_and_datasource() -> None:
    assert lp.QemuGuest.parse("a1") == lp.QemuGuest("a1", "openstack")
    assert lp.QemuGuest.parse("b1=ec2") == lp.QemuGuest("b1", "ec2")
    assert lp.QemuGuest.parse("a2", "ec2") == lp.QemuGuest("a2", "ec2")
    with pytest.raises(ConfigError, match="datasource"):
        lp.QemuGuest.parse("a1=azure")


@pytest.mark.parametrize(
    ("guests", "image_dir", "message"),
    [
        (("a1", "a1=ec2"), IMAGE, "named twice"),
        (("a1",), None, "guest image"),
    ],
)
def test_lab_qemu_config_rejects(guests: tuple[str, ...], image_dir: Path | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lp.LabConfig(name="q", qemu=tuple(lp.QemuGuest.parse(g) for g in guests), guest_image=image_dir)


def test_lab_qemu_plan_rejects_a_vm_the_lab_has_not() -> None:
    with pytest.raises(ConfigError, match="no VM c1"):
        lp.plan_lab(lp.LabConfig(name="q", qemu=(lp.QemuGuest("c1"),), guest_image=IMAGE))
    with pytest.raises(ConfigError, match="no VM a3"):
        lp.plan_lab(lp.LabConfig(name="q", vms_per_network=2, qemu=(lp.QemuGuest("a3"),), guest_image=IMAGE))


def test_lab_qemu_plan_marks_the_kind_and_datasource_of_each_vm() -> None:
    plan = _plan("a1", "b1=ec2")
    kinds = {vm.name: (vm.kind, vm.datasource) for vm in plan.vms}
    assert kinds == {"a1": ("qemu", "openstack"), "a2": ("netns", None), "b1": ("qemu", "ec2"), "b2": ("netns", None)}
    assert [vm.name for vm in plan.qemu_vms] == ["a1", "b1"]
    # The namespaces, MACs and addresses are those of the bare VMs they replace.
    bare = lp.plan_lab(_config())
    for vm in plan.vms:
        twin = bare.vm(vm.name)
        assert (vm.netns, vm.mac, vm.ip) == (twin.netns, twin.mac, twin.ip)
    assert plan.namespaces == bare.namespaces


def test_lab_qemu_ec2_guest_uuid_is_what_cloud_init_takes_for_aws() -> None:
    plan = _plan("a1", "b1=ec2")
    ec2, nova = plan.vm("b1"), plan.vm("a1")
    assert ec2.uuid.startswith("ec2") and str(uuidlib.UUID(ec2.uuid)) == ec2.uuid
    assert not nova.uuid.startswith("ec2")
    assert nova.uuid == lp.plan_lab(_config()).vm("a1").uuid


def test_lab_qemu_ec2_guest_requires_imdsv2_tokens() -> None:
    plan = _plan("a1", "b1=ec2")
    options = {vm.name: lp.instance(plan, vm).metadata_options for vm in plan.vms}
    assert options["b1"] is not None and options["b1"].http_tokens == "required"
    assert options["a1"] is None and options["a2"] is None


def test_lab_qemu_user_data_script_writes_its_mark() -> None:
    plan = _plan("a1")
    data = lp.instance(plan, plan.vm("a1")).user_data
    assert data is not None and data.startswith(b"#cloud-config\n")
    config = yaml.safe_load(data)
    assert config["hostname"] == "a1"
    (command,) = config["runcmd"]
    assert command[:2] == ["sh", "-c"]
    assert lp.user_data_mark("q", "a1") in command[2] and lp.USER_DATA_MARK in command[2]


def test_lab_qemu_config_round_trips_through_the_state_file() -> None:
    config = _config("a1", "b1=ec2")
    assert lp.LabConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in _config().to_json().items() if k not in ("qemu", "guest_image")}
    assert lp.LabConfig.from_json(old) == _config()  # state files written before QEMU guests


def test_lab_qemu_marker_is_swept_and_is_a_whole_argument() -> None:
    plan = _plan("a1", "b1=ec2")
    for vm in plan.qemu_vms:
        mark = marker(plan, f"qemu-{vm.name}")
        assert mark in lp.process_markers(plan)
        assert mark in qemu.qemu_argv(plan, vm, image.GuestImage(IMAGE))
        assert mark.startswith(str(STATE) + "/")
    assert str(plan.paths.qemu_pid_file("a2")) not in lp.process_markers(plan)


# --- QEMU's command line ----------------------------------------------------------------------------


def _argv(vm: str = "a1", *guests: str) -> list[str]:
    plan = _plan(*(guests or (vm,)))
    return qemu.qemu_argv(plan, plan.vm(vm), image.GuestImage(IMAGE))


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_lab_qemu_argv_runs_tcg_with_no_network_but_the_tap() -> None:
    argv = _argv()
    assert _option(argv, "-accel") == ["tcg"]
    assert _option(argv, "-netdev") == [f"tap,id=net0,ifname={qemu.GUEST_TAP},script=no,downscript=no"]
    assert "-nic" not in argv and "-net" not in argv and "-nodefaults" in argv
    assert not any(a.startswith("user") or "hostfwd" in a for a in argv)  # no user-mode network
    assert "-monitor" not in argv and not any(a.startswith("tcp:") for a in argv)


def test_lab_qemu_argv_nic_has_the_plans_mac() -> None:
    plan = _plan("a1")
    argv = qemu.qemu_argv(plan, plan.vm("a1"), image.GuestImage(IMAGE))
    assert f"virtio-net-pci,netdev=net0,mac={plan.vm('a1').mac},romfile=" in _option(argv, "-device")


def test_lab_qemu_argv_boots_the_images_kernel_on_a_serial_console() -> None:
    argv = _argv()
    assert _option(argv, "-kernel") == [str(IMAGE / "vmlinuz")]
    assert _option(argv, "-initrd") == [str(IMAGE / "initrd.img")]
    (cmdline,) = _option(argv, "-append")
    assert {"console=ttyS0", "root=/dev/vda", "net.ifnames=0"} <= set(cmdline.split())
    (drive,) = _option(argv, "-drive")
    assert drive.startswith(f"file={STATE}/vm-a1/disk.qcow2,format=qcow2,")
    assert f"file,id=console,path={STATE}/vm-a1/console.log" in _option(argv, "-chardev")


def test_lab_qemu_argv_agent_socket_is_the_labs() -> None:
    argv = _argv()
    assert f"socket,id=qga,path={STATE}/vm-a1/qga.sock,server=on,wait=off" in _option(argv, "-chardev")
    assert "virtserialport,chardev=qga,name=org.qemu.guest_agent.0" in _option(argv, "-device")


def _smbios_fields(argv: list[str]) -> dict[str, str]:
    (value,) = _option(argv, "-smbios")
    kind, *fields = value.split(",")
    assert kind == "type=1"
    return dict(f.split("=", 1) for f in fields)


def test_lab_qemu_smbios_is_novas_for_an_openstack_guest() -> None:
    plan = _plan("a1")
    fields = _smbios_fields(qemu.qemu_argv(plan, plan.vm("a1"), image.GuestImage(IMAGE)))
    # ds-identify's dscheck_OpenStack matches the product name.
    assert fields["product"] == "OpenStack Nova" and fields["manufacturer"] == "OpenStack Foundation"
    assert fields["uuid"] == fields["serial"] == plan.vm("a1").uuid


def test_lab_qemu_smbios_says_aws_for_an_ec2_guest() -> None:
    plan = _plan("b1=ec2")
    fields = _smbios_fields(qemu.qemu_argv(plan, plan.vm("b1"), image.GuestImage(IMAGE)))
    # ds-identify's ec2_identify_platform: uuid and serial start with ec2 and are equal.
    assert fields["uuid"].lower().startswith("ec2") and fields["uuid"].lower() == fields["serial"].lower()
    assert fields["uuid"] == plan.vm("b1").uuid
    assert fields["product"] != "OpenStack Nova"


def test_lab_qemu_overlay_is_copy_on_write_over_the_cached_rootfs() -> None:
    argv = qemu.overlay_argv(image.GuestImage(IMAGE), STATE / "vm-a1" / "disk.qcow2")
    assert argv[:2] == ["qemu-img", "create"]
    assert _option(argv, "-b") == [str(IMAGE / "rootfs.ext4")] and _option(argv, "-F") == ["raw"]
    assert argv[-1] == str(STATE / "vm-a1" / "disk.qcow2")


def test_lab_qemu_wire_bridges_the_leg_and_the_tap_inside_the_vms_namespace() -> None:
    plan = _plan("a1")
    commands: list[list[str]] = []

    def record(argv: Any, *, input: str | None = None, check: bool = True) -> CommandResult:
        commands.append(list(argv))
        return CommandResult(tuple(argv), 0, "", "")

    qemu.wire(plan.vm("a1"), runner=record)
    assert commands and all(c[:3] == ["ip", "-n", plan.vm("a1").netns] for c in commands)
    joined = [" ".join(c[3:]) for c in commands]
    assert f"tuntap add dev {qemu.GUEST_TAP} mode tap" in joined
    assert f"link set dev {qemu.GUEST_TAP} master {qemu.GUEST_BRIDGE}" in joined
    assert f"link set dev eth0 master {qemu.GUEST_BRIDGE}" in joined


def test_lab_qemu_steps_wire_start_and_wait_for_the_guests() -> None:
    plan = _plan("a1", "b1=ec2")
    ledger = Ledger(LabState(plan.config), plan.paths.state, persist=False)
    names = [name for name, _ in lifecycle.steps(plan, ledger, Supervisor(plan, ledger), runner=_no_commands)]
    assert names.index("wire QEMU guest a1") > names.index("wire tenant b (isolated)")
    assert names.index("start QEMU guests") > names.index("start dnsmasq for net-b")
    assert names[-1] == "wait for QEMU guests to boot"
    plain = lp.plan_lab(_config())
    ledger = Ledger(LabState(plain.config), plain.paths.state, persist=False)
    assert not any("QEMU" in n for n, _ in lifecycle.steps(plain, ledger, Supervisor(plain, ledger), _no_commands))


def _no_commands(argv: Any, *, input: str | None = None, check: bool = True) -> CommandResult:
    raise AssertionError("listing the steps must run nothing")


def test_lab_qemu_status_shows_the_kind_console_and_agent() -> None:
    plan = _plan("a1")
    assert status.describe_vm(plan.vm("a2"))["kind"] == "netns"
    assert status.describe_vm(plan.vm("a1"))["kind"] == "qemu"
    described = qemu.describe(plan, plan.vm("a1"))
    assert described["console"] == str(STATE / "vm-a1" / "console.log")
    assert described["agent_socket"] == str(STATE / "vm-a1" / "qga.sock")
    assert described["datasource"] == "openstack"


def test_lab_qemu_remove_overlays_deletes_disks_and_sockets_only(tmp_path: Path) -> None:
    plan = lp.plan_lab(lp.LabConfig(name="q", state_dir=tmp_path, qemu=(lp.QemuGuest("a1"),), guest_image=IMAGE))
    files = qemu.files(plan, plan.vm("a1"))
    files.directory.mkdir()
    for path in (files.overlay, files.agent_socket, files.pid_file, files.console):
        path.write_text("x")
    assert qemu.remove_overlays(plan) == []
    assert not any(p.exists() for p in (files.overlay, files.agent_socket, files.pid_file))
    assert files.console.exists()  # the console log stays until lab down removes the files


def test_lab_qemu_image_of_names_what_is_missing(tmp_path: Path) -> None:
    plan = lp.plan_lab(lp.LabConfig(name="q", qemu=(lp.QemuGuest("a1"),), guest_image=tmp_path))
    with pytest.raises(LabError, match="vmlinuz is missing"):
        qemu.image_of(plan)


# --- the guest image --------------------------------------------------------------------------------


def test_lab_image_recipe_digest_follows_what_shapes_the_image() -> None:
    base = image.Recipe()
    assert base.digest() == image.Recipe().digest()
    assert len(base.digest()) == 16 and base.name == f"debian12-{base.digest()}"
    changed = [
        image.Recipe(packages=(*image.PACKAGES, "curl")),
        image.Recipe(keep_modules=image.KEEP_MODULES[:-1]),
        image.Recipe(customize_hook=image.CUSTOMIZE_HOOK + "true\n"),
        image.Recipe(rootfs_mib=2048),
        image.Recipe(version=image.RECIPE_VERSION + 1),
    ]
    assert len({base.digest(), *(r.digest() for r in changed)}) == len(changed) + 1


def test_lab_image_recipe_has_what_the_guest_needs() -> None:
    needed = {"linux-image-amd64", "systemd-sysv", "cloud-init", "qemu-guest-agent", "isc-dhcp-client"}
    assert needed <= set(image.Recipe().packages)
    with pytest.raises(LabError):
        image.Recipe(packages=())


def test_lab_image_mmdebstrap_is_minbase_without_docs(tmp_path: Path) -> None:
    recipe = image.Recipe()
    argv = image.mmdebstrap_argv(recipe, tmp_path / "root", tmp_path / "hooks", "http://mirror.example/debian")
    assert argv[0] == "mmdebstrap" and "--variant=minbase" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root"), "http://mirror.example/debian"]
    assert f"--include={','.join(recipe.packages)}" in argv
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv
    assert f"--customize-hook={tmp_path / 'hooks' / 'customize'}" in argv


def test_lab_image_hooks_are_executable_with_the_module_list(tmp_path: Path) -> None:
    image.write_hooks(image.Recipe(), tmp_path)
    customize = tmp_path / "customize"
    assert customize.stat().st_mode & 0o111
    text = customize.read_text()
    assert "$KEEP_MODULES" not in text and "drivers/net/virtio_net.ko" in text
    assert "MODULES=list" in (tmp_path / "essential").read_text()


def test_lab_image_mkfs_makes_ext4_from_the_tree(tmp_path: Path) -> None:
    argv = image.mkfs_argv(image.Recipe(rootfs_mib=1024), tmp_path / "root", tmp_path / "rootfs.ext4")
    assert argv[0] == "mkfs.ext4" and argv[argv.index("-d") + 1] == str(tmp_path / "root")
    assert argv[-2:] == [str(tmp_path / "rootfs.ext4"), "1024M"]


def test_lab_image_cache_finds_only_a_complete_image(tmp_path: Path) -> None:
    recipe = image.Recipe()
    assert image.find_image(tmp_path, recipe) is None
    directory = image.images_dir(tmp_path) / recipe.name
    directory.mkdir(parents=True)
    for name in (image.KERNEL, image.INITRD):
        (directory / name).write_bytes(b"x")
    (directory / image.MANIFEST).write_text(json.dumps({"name": recipe.name}))
    assert image.find_image(tmp_path, recipe) is None  # no root filesystem
    (directory / image.ROOTFS).write_bytes(b"x")
    found = image.find_image(tmp_path, recipe)
    assert found is not None and found.directory == directory and found.manifest["name"] == recipe.name
    assert image.find_image(tmp_path, image.Recipe(rootfs_mib=4096)) is None  # another recipe


# --- the guest agent's protocol ------------------------------------------------------------------------


def test_lab_agent_encode_is_one_json_line() -> None:
    assert agent.encode("guest-ping") == b'{"execute":"guest-ping"}\n'
    assert json.loads(agent.encode("guest-exec-status", {"pid": 7})) == {
        "execute": "guest-exec-status",
        "arguments": {"pid": 7},
    }


@pytest.mark.parametrize("split", [1, 2, 5, 13, 1000])
def test_lab_agent_reply_buffer_yields_replies_across_any_split(split: int) -> None:
    wire = '{"return": {}}\n{"return": {"pid": 12}}\n{"return": "ünï"}\n'.encode()
    buf = agent.ReplyBuffer()
    got: list[Any] = []
    for at in range(0, len(wire), split):
        buf.feed(wire[at : at + split])
        got += list(buf.replies())
    assert got == [{"return": {}}, {"return": {"pid": 12}}, {"return": "ünï"}]


def test_lab_agent_reply_buffer_drops_what_precedes_the_delimiter() -> None:
    buf = agent.ReplyBuffer()
    buf.feed(b'{"return": 1}\n{"retu')
    assert not buf.after_delimiter()
    buf.feed(b'\xff{"return": 99}\n')
    assert buf.after_delimiter()
    assert list(buf.replies()) == [{"return": 99}]


def test_lab_agent_reply_buffer_refuses_what_is_not_json() -> None:
    buf = agent.ReplyBuffer()
    buf.feed(b"login: \n")
    with pytest.raises(LabError, match="not JSON"):
        list(buf.replies())


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"error": {"class": "GenericError", "desc": "Guest agent command failed"}}, "command failed"),
        ({"retrun": 1}, "no return value"),
        ([1], "not an object"),
    ],
)
def test_lab_agent_result_of_refuses_errors(reply: Any, message: str) -> None:
    with pytest.raises(LabError, match=message):
        agent.result_of(reply, "guest-exec")


def test_lab_agent_exec_arguments_carry_stdin_and_environment() -> None:
    args = agent.exec_arguments(["ip", "route"], input=b"x\n", env={"LANG": "C.UTF-8"})
    assert args == {"path": "ip", "arg": ["route"], "capture-output": True,
                    "input-data": base64.b64encode(b"x\n").decode(), "env": ["LANG=C.UTF-8"]}  # fmt: skip
    with pytest.raises(LabError):
        agent.exec_arguments([])


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"exited": True, "exitcode": 0, "out-data": base64.b64encode(b"a1\n").decode()}, 0),
        ({"exited": True, "exitcode": 3}, 3),
        ({"exited": True, "signal": 9}, -9),
    ],
)
def test_lab_agent_exec_status_maps_onto_a_command_result(status: dict[str, Any], code: int) -> None:
    result = agent.exec_status(status, ["hostname"])
    assert result is not None and result.returncode == code and result.argv == ("hostname",)
    assert result.stdout == (base64.b64decode(status.get("out-data", "")).decode())


def test_lab_agent_exec_status_of_a_running_command_is_none() -> None:
    assert agent.exec_status({"exited": False}, ["sleep", "9"]) is None


class FakeAgent:
    """qemu-guest-agent's side of the socket: sync, exec, exec-status, file writes.

    Before the first sync it sends a stale reply, as a channel an earlier client
    left behind holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, bytes] = {}
        self.execs: list[dict[str, Any]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b'{"return": {"pid": 666}}\n')  # stale, from "an earlier client"
        reader = conn.makefile("rb")
        handles: dict[int, str] = {}
        while line := reader.readline():
            request = json.loads(line.lstrip(b"\xff"))
            command, args = request["execute"], request.get("arguments", {})
            if command == "guest-sync-delimited":
                conn.sendall(b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
                continue
            conn.sendall(json.dumps({"return": self._answer(command, args, handles)}).encode() + b"\n")

    def _answer(self, command: str, args: dict[str, Any], handles: dict[int, str]) -> Any:
        if command == "guest-exec":
            self.execs.append(args)
            return {"pid": 100 + len(self.execs)}
        if command == "guest-exec-status":
            spec = self.execs[args["pid"] - 101]
            out = " ".join([spec["path"], *spec["arg"]]).encode()
            code = 1 if spec["path"] == "false" else 0
            return {"exited": True, "exitcode": code, "out-data": base64.b64encode(out).decode()}
        if command == "guest-file-open":
            handles[len(handles) + 1] = args["path"]
            self.files[args["path"]] = b""
            return len(handles)
        if command == "guest-file-write":
            self.files[handles[args["handle"]]] += base64.b64decode(args["buf-b64"])
            return {"count": 0, "eof": False}
        if command in ("guest-file-close", "guest-ping"):
            return {}
        raise AssertionError(f"unexpected {command}")


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "qga.sock")
    try:
        yield fake
    finally:
        fake.close()


def test_lab_agent_session_syncs_past_stale_replies_and_runs_commands(fake_agent: FakeAgent) -> None:
    where = agent.AgentSocket(fake_agent.path, timeout=5)
    with agent.GuestAgent(where, sync_timeout=5) as session:
        result = session.exec(["ip", "-j", "route"], env={"LANG": "C.UTF-8"})
    assert result == CommandResult(("ip", "-j", "route"), 0, "ip -j route", "")
    assert fake_agent.execs[0]["env"] == ["LANG=C.UTF-8"]


def test_lab_agent_runner_checks_the_exit_code(fake_agent: FakeAgent) -> None:
    run_inside = agent.AgentRunner(agent.AgentSocket(fake_agent.path, timeout=5))
    assert run_inside(["true"]).returncode == 0
    assert run_inside(["false"], check=False).returncode == 1
    with pytest.raises(CommandFailed):
        run_inside(["false"])


def test_lab_agent_writes_a_file_in_chunks(fake_agent: FakeAgent) -> None:
    data = bytes(range(256)) * 700  # several guest-file-write calls
    with agent.GuestAgent(agent.AgentSocket(fake_agent.path, timeout=5)) as session:
        session.write_file("/run/x.zip", data)
        session.write_file("/run/empty", b"")
    assert fake_agent.files == {"/run/x.zip": data, "/run/empty": b""}


def test_lab_agent_ping_is_false_without_an_agent(tmp_path: Path) -> None:
    assert not agent.ping(agent.AgentSocket(tmp_path / "absent.sock"), timeout=0.5)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.closing(silent):
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen(1)  # QEMU accepts while the guest's agent is not running yet
        assert not agent.ping(agent.AgentSocket(tmp_path / "silent.sock"), timeout=0.5)


# --- the guest doctor's bundle -------------------------------------------------------------------------


def test_lab_qemu_doctor_bundle_is_the_package_without_compiled_code() -> None:
    data, digest = qemu.doctor_bundle()
    assert qemu.doctor_bundle()[1] == digest  # same sources, same digest: copied once per version
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"meta169/__main__.py", "meta169/doctor/cli.py", "meta169/doctor/guest.py"} <= set(names)
    assert not any(n.endswith((".so", ".pyc")) or "__pycache__" in n for n in names)
