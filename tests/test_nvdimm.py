"""NVDIMM sizing rules and crash-image copies (host only)."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.ndctl import device_path
from testbed.nvdimm import (
    MiB,
    NvdimmError,
    NvdimmSpec,
    copy_crash_image,
    create_backing,
    parse_size,
    round_region,
    validate,
)


def test_backing_holds_region_plus_label_area():
    spec = NvdimmSpec(Path("/x"), 256 * MiB)
    assert spec.label_size == 128 * 1024
    assert spec.backing_size == 256 * MiB + 128 * 1024


@pytest.mark.parametrize("size", [0, -16 * MiB, 8 * MiB, 16 * MiB + 4096, 100 * MiB])
def test_region_must_be_a_multiple_of_16_mib(size):
    with pytest.raises(NvdimmError, match="16 MiB"):
        validate(size)


@pytest.mark.parametrize("label", [0, 64 * 1024, 128 * 1024 + 1])
def test_label_area_at_least_128k_and_page_aligned(label):
    with pytest.raises(NvdimmError):
        NvdimmSpec(Path("/x"), 16 * MiB, label)


@given(st.integers(min_value=1, max_value=1 << 40))
def test_round_region_is_the_smallest_valid_size_not_below(size):
    r = round_region(size)
    validate(r)
    assert r >= size and r - size < 16 * MiB


@pytest.mark.parametrize("text,expected", [
    ("256M", 256 * MiB), ("1G", 1 << 30), ("16MiB", 16 * MiB), ("4096", 4096), ("2g", 2 << 30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "1.5G", "12X", "-1M"])
def test_parse_size_rejects(text):
    with pytest.raises(NvdimmError):
        parse_size(text)


def test_backing_is_sparse_and_kept_when_it_exists(tmp_path):
    spec = NvdimmSpec(tmp_path / "nv.img", 32 * MiB)
    create_backing(spec)
    assert spec.backing.stat().st_size == spec.backing_size
    assert spec.backing.stat().st_blocks * 512 < MiB
    with open(spec.backing, "r+b") as f:
        f.write(b"media")
    create_backing(spec)
    assert spec.backing.read_bytes()[:5] == b"media"


def test_existing_backing_of_another_size_is_refused(tmp_path):
    (tmp_path / "nv.img").write_bytes(b"x")
    with pytest.raises(NvdimmError, match="expected"):
        create_backing(NvdimmSpec(tmp_path / "nv.img", 16 * MiB))


def test_crash_image_copy_is_identical_and_sparse(tmp_path):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(5000))
        f.seek(64 * MiB - 10)
        f.write(b"0123456789")
    dst = copy_crash_image(src, tmp_path / "crash" / "dst.img")
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 4 * MiB


@pytest.mark.parametrize("ns,path", [
    ({"dev": "namespace0.0", "mode": "fsdax", "blockdev": "pmem0"}, "/dev/pmem0"),
    ({"dev": "namespace0.2", "mode": "sector", "blockdev": "pmem0.2s"}, "/dev/pmem0.2s"),
    ({"dev": "namespace0.1", "mode": "devdax", "chardev": "dax0.1"}, "/dev/dax0.1"),
    ({"dev": "namespace0.1", "mode": "devdax",
      "daxregion": {"devices": [{"chardev": "dax0.1"}]}}, "/dev/dax0.1"),
])
def test_device_path_from_ndctl_json(ns, path):
    assert device_path(ns) == path
