"""Online resize of a Disk LUN: growth, the unit attention, and what is refused."""

from __future__ import annotations

import struct

import pytest

from istgt.lu.backends import MemoryBackend
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from istgt.scsi.sbc import DiskDevice
from tests.unit.test_scsi_disk import NEXUS, OTHER, cdb16, expect_check, make_lu, make_lun, run

BL = 512
READ_CAPACITY_16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
TUR = bytes(6)


def capacity(device, nexus=NEXUS) -> int:
    task = run(device, READ_CAPACITY_16, nexus=nexus)
    assert task.status == ScsiStatus.GOOD
    return struct.unpack_from(">Q", bytes(task.data_in))[0] + 1


def device_with(blocks=1024, size=0):
    device = DiskDevice(make_lu(), make_lun(size=size), MemoryBackend(blocks * BL))
    for nexus in (NEXUS, OTHER):
        run(device, TUR, nexus=nexus)        # the power-on unit attentions
    return device


def test_growth_is_announced_to_every_nexus_then_served():
    device = device_with()
    assert device.resize(2048 * BL + 100) == 2048       # rounded down to whole blocks
    for nexus in (NEXUS, OTHER):
        expect_check(run(device, TUR, nexus=nexus), SenseKey.UNIT_ATTENTION,
                     Asc.CAPACITY_DATA_HAS_CHANGED)
        assert capacity(device, nexus) == 2048
    data = b"\x42" * BL
    assert run(device, cdb16(0x8A, 2047, 1), data).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb16(0x88, 2047, 1)).data_in) == data


def test_shrinking_is_refused_and_the_same_size_changes_nothing():
    device = device_with()
    with pytest.raises(ValueError):
        device.resize(512 * BL)
    assert device.resize(1024 * BL) == 1024
    assert run(device, TUR).status == ScsiStatus.GOOD     # no unit attention
    assert capacity(device) == 1024


def test_only_an_auto_sized_lun_follows_its_store():
    fixed = device_with(size=1024 * BL)
    fixed.backend._data.extend(bytes(1024 * BL))          # the file grew underneath
    fixed.notice_growth()
    assert capacity(fixed) == 1024
    auto = device_with(size=None)
    auto.backend._data.extend(bytes(1024 * BL))
    auto.notice_growth()
    expect_check(run(auto, TUR), SenseKey.UNIT_ATTENTION, Asc.CAPACITY_DATA_HAS_CHANGED)
    assert capacity(auto) == 2048
