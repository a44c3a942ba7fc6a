"""The QEMU command line: safe networking, NVDIMM wiring, virtio-serial ports, no shell strings."""

from pathlib import Path

import pytest

from testbed.nvdimm import NvdimmSpec
from testbed.qemu_cmdline import ConfigError, QemuCommandLine, RunPaths, SerialPort, VMConfig

MiB = 1 << 20


def _config(**kw) -> VMConfig:
    base = dict(name="t1", kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"),
                root_disk=Path("/img/root.img"))
    return VMConfig(**{**base, **kw})


def _argv(config: VMConfig, accel: str = "tcg", port: int = 40022) -> list[str]:
    return QemuCommandLine(config, RunPaths(Path("/run/t1")), accel=accel, ssh_port=port).argv()


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_user_network_is_restricted_and_forwards_ssh_on_loopback_only():
    netdevs = _values(_argv(_config()), "-netdev")
    assert netdevs == ["user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"]


def test_qmp_is_a_unix_socket_in_the_state_dir():
    assert _values(_argv(_config()), "-qmp") == ["unix:/run/t1/qmp.sock,server=on,wait=off"]


def test_root_disk_is_reached_through_the_per_vm_overlay_only():
    drives = _values(_argv(_config()), "-drive")
    assert len(drives) == 1 and drives[0].startswith("file=/run/t1/root-overlay.qcow2,")
    assert "/img/root.img" not in " ".join(_argv(_config()))


def test_nvdimms_get_machine_flag_slots_backends_and_labels():
    nv = [NvdimmSpec(Path("/d/a.img"), 256 * MiB), NvdimmSpec(Path("/d/b.img"), 16 * MiB)]
    argv = _argv(_config(nvdimms=nv, memory_mib=512))
    assert _values(argv, "-machine") == ["pc,nvdimm=on,accel=tcg"]
    mem = _values(argv, "-m")[0]
    assert mem.startswith("512M,slots=4,maxmem=")
    assert int(mem.split("maxmem=")[1].rstrip("M")) * MiB >= 512 * MiB + 272 * MiB + 256 * 1024
    objects = _values(argv, "-object")
    assert objects == [
        f"memory-backend-file,id=nvmem0,share=on,mem-path=/d/a.img,size={256 * MiB + 131072}",
        f"memory-backend-file,id=nvmem1,share=on,mem-path=/d/b.img,size={16 * MiB + 131072}",
    ]
    devices = _values(argv, "-device")
    assert "nvdimm,id=nvdimm0,memdev=nvmem0,label-size=131072" in devices
    assert "nvdimm,id=nvdimm1,memdev=nvmem1,label-size=131072" in devices


def test_no_nvdimm_means_no_nvdimm_machine_option():
    argv = _argv(_config())
    assert _values(argv, "-machine") == ["pc,accel=tcg"]
    assert _values(argv, "-m") == ["1024M"]


def test_virtio_serial_ports_are_file_chardevs_with_guest_names():
    ports = [SerialPort("acks", Path("/r/acks.log")), SerialPort("events", Path("/r/ev.log"))]
    argv = _argv(_config(serial_ports=ports))
    assert "virtio-serial-pci,id=vser0" in _values(argv, "-device")
    assert "file,id=vport0,path=/r/acks.log" in _values(argv, "-chardev")
    assert "virtserialport,bus=vser0.0,chardev=vport1,name=events" in _values(argv, "-device")


def test_kvm_uses_host_cpu_and_tcg_max():
    assert _values(_argv(_config(), accel="kvm"), "-cpu") == ["host"]
    assert _values(_argv(_config(), accel="tcg"), "-cpu") == ["max"]


def test_append_is_one_argv_element_never_a_shell_string():
    argv = _argv(_config(append="console=ttyS0 init=/x; rm -rf /"))
    assert argv[argv.index("-append") + 1] == "console=ttyS0 init=/x; rm -rf /"
    assert argv[0] == "qemu-system-x86_64" and all(isinstance(a, str) for a in argv)


@pytest.mark.parametrize("bad", [
    dict(name="a,b"), dict(name="../x"), dict(name=""),
    dict(kernel=Path("/img/vm,linuz")),
    dict(nvdimms=[NvdimmSpec(Path("/d/a,share=off"), 16 * MiB)]),
    dict(serial_ports=[SerialPort("a,b", Path("/r/x"))]),
    dict(serial_ports=[SerialPort("ok", Path("/r/x,append=on"))]),
])
def test_option_injection_through_commas_is_rejected(bad):
    with pytest.raises(ConfigError):
        _argv(_config(**bad))


def test_accel_must_be_resolved_before_building():
    with pytest.raises(ConfigError):
        _argv(_config(), accel="auto")
