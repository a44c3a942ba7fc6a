"""Shared fixtures for VM tests: the image (built through the cache when missing), one booted
guest shared by a module, and a guard that no QEMU started here outlives the session.

QEMU missing is a failure, never a skip: CI must not pass green without having booted anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmhelpers import make_vm, our_qemus

from testbed import image as image_mod
from testbed.vm import VM

VM_TEST_TIMEOUT_S = 900  # a hung guest fails its test instead of eating the CI budget


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def vm_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every VM file of this session lives under here; at the end no QEMU may reference it."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run bin/bootstrap (VM tests never skip)")
    base = tmp_path_factory.mktemp("vms")
    os.environ["TESTBED_RUNTIME_DIR"] = str(base / "run")
    os.environ["TESTBED_DATA_DIR"] = str(base / "data")
    os.environ["TESTBED_SNAPSHOT_CACHE"] = str(base / "snapshots")  # first run stores, later hit
    yield base
    left = our_qemus(str(base))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes outlived the VM tests: {left}"


@pytest.fixture(scope="session")
def image(vm_base: Path) -> image_mod.Image:
    return image_mod.build()


@pytest.fixture(scope="module")
def booted(image: image_mod.Image, vm_base: Path) -> Iterator[VM]:
    """One guest with a 256 MiB NVDIMM and an 'acks' virtio-serial port, shared by a module."""
    vm = make_vm(image, vm_base, f"shared{int(time.time() * 1000) % 100000}", nvdimm_mib=256,
                 ports=("acks",))
    try:
        vm.start()
        vm.wait_for_ssh(120)
        yield vm
    finally:
        vm.cleanup()
